"""Load a checkpoint's LLaMA `tokenizer.model` as a transformers tokenizer that encodes exactly like SentencePiece.

Why the pipeline is built here instead of calling `LlamaTokenizer.from_pretrained` / `AutoTokenizer`:
on transformers 5.x every tokenizer is a `tokenizers`-backed one (the SentencePiece "slow" class is gone), and the
conversion from `tokenizer.model` it performs does not reproduce SentencePiece on the supported versions:

* `LlamaTokenizer` (5.17 and 5.24) ignores the model's normalizer spec and adds the dummy-prefix space with a
  `Metaspace` pre-tokenizer, which skips that space when the text already starts with one: `" hi"` gives `▁hi`
  where SentencePiece gives `▁▁hi`; no `legacy` / `add_prefix_space` / `from_slow` value changes this. Models that
  collapse whitespace or normalize with NFKC (OpenLLaMA v1 style) also diverge on spaces, tabs and full-width text.
* The generic `TokenizersBackend` conversion is exact on 5.24 but on 5.17 adds no dummy prefix and no BPE merges.
* With only `tokenizer.model` in the folder, neither adds BOS (`add_bos_token` defaults to False in 5.x).

So the `tokenizers` pipeline is assembled from the SentencePiece model proto itself (its normalizer spec, its pieces
and their scores) and handed to transformers' `PreTrainedTokenizerFast`; the result is an ordinary transformers
tokenizer (batching, padding, `save_pretrained`) that behaves the same on every supported transformers version.
`tokenizer.model` is the single source of truth: a `tokenizer.json` / `tokenizer_config.json` next to it is not read,
as 5.x `LlamaTokenizer` would rebuild its own (inexact) pipeline from them anyway.

Reading the proto needs the `protobuf` package (as does every SentencePiece conversion in transformers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longllama.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
SPACE_MARK = "\u2581"  # "▁": how SentencePiece writes a space inside pieces

# SentencePiece piece types used here (sentencepiece_model.proto, ModelProto.SentencePiece.Type)
_NORMAL, _USER_DEFINED, _UNUSED = 1, 4, 5
_BPE_MODEL_TYPE = 2  # TrainerSpec.ModelType.BPE


def load_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Return the tokenizer of `model_dir/tokenizer.model`: `encode(text)` is `[BOS] + SentencePiece ids`, no EOS."""
    model_file = _find_model_file(Path(model_dir))
    proto = _read_proto(model_file)
    _check_supported(proto, model_file)
    trainer = proto.trainer_spec
    special = _special_tokens(proto)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(proto),
        name_or_path=str(model_dir),
        add_bos_token=True,
        add_eos_token=False,
        # Without this a prompt containing the text "</s>" would turn into the EOS id; SentencePiece reads it as text.
        split_special_tokens=True,
        # transformers' clean-up would eat spaces before punctuation, breaking the decode round trip.
        clean_up_tokenization_spaces=False,
        **special,
    )
    logger.debug("loaded %s: %d pieces, bos=%s eos=%s", model_file, len(proto.pieces), trainer.bos_id, trainer.eos_id)
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, *, bos: bool = True) -> list[int]:
    """Token ids of `text` for generation: BOS (unless `bos=False`) then the text's pieces, never EOS."""
    if not isinstance(text, str):
        raise InputError(f"prompt must be a str, got {type(text).__name__}; decode it to text first")
    if not text:
        raise InputError("prompt is empty; pass some text to continue from")
    # Prepend BOS here rather than through the tokenizer's post-processor, so the result does not depend on how a
    # tokenizer loaded elsewhere was configured (add_bos_token / add_eos_token).
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if bos:
        if tokenizer.bos_token_id is None:
            raise InputError("this tokenizer has no BOS token; call encode_prompt with bos=False")
        ids.insert(0, tokenizer.bos_token_id)
    if not ids:
        raise InputError(f"prompt {text[:40]!r} encodes to no tokens (only whitespace?); pass some visible text")
    return ids


def _find_model_file(model_dir: Path) -> Path:
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist; pass the folder holding the checkpoint")
    model_file = model_dir / TOKENIZER_FILE
    if not model_file.is_file():
        raise CheckpointError(
            f"{model_file} is missing; copy the checkpoint's SentencePiece {TOKENIZER_FILE} into {model_dir}"
        )
    return model_file


def _read_proto(model_file: Path) -> Any:
    try:
        # sentencepiece ships the generated message classes; they need the protobuf runtime.
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise ImportError(f"{TOKENIZER_FILE} needs the 'protobuf' package ({exc}); pip install protobuf") from exc
    except Exception as exc:  # protobuf's VersionError (not an ImportError): runtime older than sentencepiece's gencode
        raise ImportError(f"protobuf cannot load sentencepiece's classes ({exc}); pip install -U protobuf") from exc
    from google.protobuf.message import DecodeError

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except (DecodeError, OSError) as exc:
        raise CheckpointError(f"{model_file} is not a readable SentencePiece model ({exc}); re-download it") from exc
    if not proto.pieces:
        raise CheckpointError(f"{model_file} holds no SentencePiece vocabulary; re-download it")
    return proto


def _check_supported(proto: Any, model_file: Path) -> None:
    """Refuse models this pipeline cannot encode exactly like SentencePiece, rather than give different ids."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _BPE_MODEL_TYPE:
        raise CheckpointError(f"{model_file} is not a BPE SentencePiece model, as LLaMA's is; use a LLaMA one")
    # Unused pieces are merged then re-split by SentencePiece, user-defined ones matched before merging, a suffix
    # space moves the dummy prefix to the end: LLaMA tokenizers use none of these, and `tokenizers` BPE has no match.
    odd = sum(piece.type in (_USER_DEFINED, _UNUSED) for piece in proto.pieces)
    if odd or trainer.treat_whitespace_as_suffix:
        raise CheckpointError(
            f"{model_file} has user-defined/unused pieces or suffix whitespace (unsupported); use a LLaMA one"
        )
    if norm.add_dummy_prefix and not norm.escape_whitespaces:
        raise CheckpointError(f"{model_file} adds a dummy prefix without escaping spaces, unsupported")


def _build_backend(proto: Any) -> Tokenizer:
    trainer = proto.trainer_spec
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    model = BPE(
        vocab=vocab,
        merges=_merges_by_score(proto),
        unk_token=trainer.unk_piece,
        # SentencePiece emits one <unk> for a run of unknown characters.
        fuse_unk=True,
        byte_fallback=trainer.byte_fallback,
        dropout=None,
    )
    backend = Tokenizer(model)
    backend.normalizer = _normalizer(proto.normalizer_spec)
    # No pre-tokenizer: SentencePiece encodes the whole normalized text as one sequence; its training-time splits
    # (digits, scripts, whitespace) already shaped the vocabulary, so no piece crosses them.
    backend.pre_tokenizer = None
    backend.decoder = _decoder(proto)
    return backend


def _merges_by_score(proto: Any) -> list[tuple[str, str]]:
    """BPE merges ordered like SentencePiece applies them: the pair whose joined piece scores highest goes first.

    SentencePiece stores no merge list; at each step it joins the adjacent pair whose concatenation is a normal
    piece with the best score. Listing, for every normal piece, each split into two normal pieces, best score first
    (piece id breaking ties), gives `tokenizers` BPE the same priorities.
    """
    normal = {piece.piece: (piece.score, index) for index, piece in enumerate(proto.pieces) if piece.type == _NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for text, (score, index) in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _normalizer(spec: Any) -> normalizers.Normalizer:
    """The SentencePiece normalizer, in its order: character map, leading and repeated spaces, space escaping, dummy
    prefix, trailing spaces."""
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # Only " " counts here (after the character map), not tabs or newlines. \A, not ^: in the `tokenizers`
        # (Oniguruma) regex syntax ^ and $ match at every line.
        steps.append(normalizers.Replace(Regex(r"\A +"), ""))
        steps.append(normalizers.Replace(Regex(r" {2,}"), " "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE_MARK))
    if spec.add_dummy_prefix:
        # Prepend (unlike the Metaspace pre-tokenizer transformers uses) always adds the mark, even before a
        # leading space, and adds nothing to an empty text: both as SentencePiece does.
        steps.append(normalizers.Prepend(SPACE_MARK))
    if spec.remove_extra_whitespaces:
        # SentencePiece trims the end last, on escaped spaces: a literal "▁" there goes too, and so does the dummy
        # prefix of a text that is nothing but "▁" marks.
        trailing = SPACE_MARK if spec.escape_whitespaces else " "
        steps.append(normalizers.Replace(Regex(f"{trailing}+\\z"), ""))
    return normalizers.Sequence(steps)


def _decoder(proto: Any) -> decoders.Decoder:
    steps: list[decoders.Decoder] = [decoders.Replace(SPACE_MARK, " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        # Drop the one space the dummy prefix put in front; after Fuse the text is a single string.
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _special_tokens(proto: Any) -> dict[str, str]:
    """unk/bos/eos/pad token strings at the ids the SentencePiece model assigns (pad is -1, i.e. absent, for LLaMA)."""
    trainer = proto.trainer_spec
    named = {
        "unk_token": trainer.unk_id,
        "bos_token": trainer.bos_id,
        "eos_token": trainer.eos_id,
        "pad_token": trainer.pad_id,
    }
    return {name: proto.pieces[index].piece for name, index in named.items() if 0 <= index < len(proto.pieces)}
