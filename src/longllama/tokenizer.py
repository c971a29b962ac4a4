"""Load a checkpoint's LLaMA `tokenizer.model` as a transformers tokenizer that encodes exactly like SentencePiece,
and write the transformers files (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) that make
`AutoTokenizer.from_pretrained(folder)` give the same tokenizer.

Why the pipeline is built here instead of calling `LlamaTokenizer.from_pretrained` / `AutoTokenizer` on a folder
that holds only `tokenizer.model`: on transformers 5.x every tokenizer is a `tokenizers`-backed one (the
SentencePiece "slow" class is gone), and the conversion from `tokenizer.model` it performs does not reproduce
SentencePiece on the supported versions:

* `LlamaTokenizer` (5.17 and 5.24) ignores the model's normalizer spec and adds the dummy-prefix space with a
  `Metaspace` pre-tokenizer, which skips that space when the text already starts with one: `" hi"` gives `▁hi`
  where SentencePiece gives `▁▁hi`; no `legacy` / `add_prefix_space` / `from_slow` value changes this. Models that
  collapse whitespace or normalize with NFKC (OpenLLaMA v1 style) also diverge on spaces, tabs and full-width text.
  Given a `tokenizer.json`, `LlamaTokenizer` still rebuilds that pipeline and keeps only the vocabulary.
* The generic `TokenizersBackend` conversion is exact on 5.24 but on 5.17 adds no dummy prefix and no BPE merges.
* With only `tokenizer.model` in the folder, neither adds BOS (`add_bos_token` defaults to False in 5.x).

So the `tokenizers` pipeline is assembled from the SentencePiece model proto itself (its normalizer spec, its pieces
and their scores). `load_tokenizer` always builds it from `tokenizer.model`, the single source of truth for this
package's own loader (CLI, training, evaluation); files beside it are not read.

How AutoTokenizer gets the same tokenizer (the options weighed):

* A folder's `tokenizer.json` is that pipeline serialized (BOS added by its post-processor) and its
  `tokenizer_config.json` names `tokenizer_class: LongLlamaTokenizer`. Without `import longllama`, every supported
  transformers version (5.17 to 5.25) falls back to its generic `TokenizersBackend` for an unknown class name,
  which loads `tokenizer.json` as it is: the same ids, pad token, context length and chat template. Naming
  `LlamaTokenizer` or leaving the class out would instead rebuild the inexact pipeline above.
* `import longllama` registers `LongLlamaTokenizer` for that name and for `model_type: longllama` (a folder without
  `tokenizer_config.json`). It adds what plain transformers cannot: `save_pretrained` also writes `tokenizer.model`
  (so `longllama generate --model` reopens the folder), a folder with only `tokenizer.model` loads exactly, and
  `apply_chat_template(..., tokenize=True)` tokenizes the conversation the way the fine-tuning code did (below).
  A registered class alone would leave plain AutoTokenizer users with the inexact conversion, and files alone would
  not carry `tokenizer.model` through `save_pretrained`: both are used.

`write_tokenizer_files(folder)` writes the three files next to `tokenizer.model`: the shipped model folders hold them
(`scripts/tokenizer_files.py` regenerates them; a test checks they equal a fresh build) and so does every folder
this package writes (conversions, training exports).

Pad token: LLaMA's SentencePiece model has no pad piece; the folder's `config.json` names `pad_token_id` 0 (LLaMA's
`<unk>`), so that piece becomes the pad token, as the fine-tuning code pads with it. Padding is on the left, as
batched generation needs. `model_max_length` is the usable context the folder's config reports
(`max_position_embeddings`, not the attention window `context_window`); without a `config.json` transformers'
default (no limit) stays.

Chat template: the instruct checkpoints' chat format (docs/finetuning.md, `sharegpt-3b-v1.1`): BOS, the system text
(`CHAT_SYSTEM_PROMPT`, or the conversation's leading system message verbatim), per user turn `"\nUSER: " + text`,
per assistant turn `"\nASSISTANT: " + text + EOS`, and `"\nASSISTANT: "` as the generation prompt. Models without
chat training (the small shipped one) carry the same template. The instruction formats of the fine-tuning
templates are named templates beside it (`apply_chat_template(..., chat_template="openorca-3b")`, and
`code-7b-instruct-mathinstruct` / `code-7b-instruct-openorca`): an optional system message (OpenOrca's system
prompt), one user message, optionally the answer. The fine-tuning code tokenizes each of those pieces on
its own (each gets SentencePiece's dummy-prefix space, so `"USER: " + "hi"` becomes `USER: ▁` then `▁hi`); tokenizing
the joined text instead merges across the joints (`▁▁` then `hi` for LLaMA), ids the model never saw.
`LongLlamaTokenizer.apply_chat_template(..., tokenize=True)` therefore renders the template with a segment marker
and tokenizes each segment on its own: the ids equal the fine-tuning code's for the same conversation (every named
template too). The plain
`TokenizersBackend` (transformers without `import longllama`) tokenizes the joined text; since our tokenizer keeps
the text `</s>` as text, that path also misses the BOS/EOS ids: import longllama for chat ids.

Reading the proto needs the `protobuf` package (as does every SentencePiece conversion in transformers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import BatchEncoding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longllama.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# What write_tokenizer_files writes beside tokenizer.model.
TRANSFORMERS_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
SPACE_MARK = "\u2581"  # "▁": how SentencePiece writes a space inside pieces

# SentencePiece piece types used here (sentencepiece_model.proto, ModelProto.SentencePiece.Type)
_NORMAL, _USER_DEFINED, _UNUSED = 1, 4, 5
_BPE_MODEL_TYPE = 2  # TrainerSpec.ModelType.BPE


CHAT_SYSTEM_PROMPT = (
    "A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted as ASSISTANT:). "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
)
USER_PREFIX = "\nUSER: "
ASSISTANT_PREFIX = "\nASSISTANT: "
AI_TASK_PROMPT = (
    "You are an AI assistant. User will you give you a task. "
    "Your goal is to complete the task as faithfully as you can.\n\n"
)

# Template variables only LongLlamaTokenizer passes; elsewhere they render as nothing, leaving the plain text.
_SEGMENT_VAR, _SPECIAL_VAR = "segment_break", "special_mark"
# Characters no chat text is expected to hold; a conversation that holds them is refused, not mis-split.
_SEGMENT_MARK = "\x00\x1elongllama-segment\x1e\x00"
_SPECIAL_MARK = "\x00\x1flongllama-special\x1f\x00"


def _jinja_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is also a valid Jinja one


def _template(lines: list[str]) -> str:
    """Join template lines after the lines that read the two marker variables: `mark` separates the segments the
    fine-tuning code tokenized one by one, `special` flags BOS/EOS segments."""
    head = [
        f"{{%- set mark = {_SEGMENT_VAR} | default('') -%}}",
        f"{{%- set special = {_SPECIAL_VAR} | default('') -%}}",
    ]
    # Every tag trims the whitespace around it, so the line breaks are for readers of the saved template only.
    return "\n".join(head + lines) + "\n"


def _chat_template() -> str:
    """The chat format of the module docstring (fine-tuning templates sharegpt-3b-v1.1, code-7b-instruct-sharegpt)."""
    user, assistant, system = map(_jinja_string, (USER_PREFIX, ASSISTANT_PREFIX, CHAT_SYSTEM_PROMPT))
    return _template(
        [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}",
            "{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system = {system} -%}}",
            "{%- set turns = messages -%}",
            "{%- endif -%}",
            "{{- special + bos_token + mark + system -}}",
            "{%- for message in turns -%}",
            "{%- if message['role'] == 'user' -%}",
            f"{{{{- mark + {user} + mark + message['content'] -}}}}",
            "{%- elif message['role'] == 'assistant' -%}",
            f"{{{{- mark + {assistant} + mark + message['content'] + mark + special + eos_token -}}}}",
            "{%- else -%}",
            "{{- raise_exception('LongLLaMA chats hold user and assistant turns after an optional first system "
            "message; got the role ' + message['role']) -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            f"{{{{- mark + {assistant} -}}}}",
            "{%- endif -%}",
        ]
    )


def _instruction_template(*, system: bool, pre_question: str, post_question: str) -> str:
    """An instruction format (docs/finetuning.md): BOS, then one segment [system + "\\n"] + pre_question + question +
    post_question, then the answer and EOS as segments of their own. The answer follows the question directly, so
    the generation prompt adds nothing."""
    pre, post = _jinja_string(pre_question), _jinja_string(post_question)
    system_lines = (
        [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set prompt = messages[0]['content'] + '\\n' -%}{%- set turns = messages[1:] -%}",
            "{%- else -%}{%- set prompt = '\\n' -%}{%- set turns = messages -%}{%- endif -%}",
        ]
        if system
        else ["{%- set prompt = '' -%}{%- set turns = messages -%}"]
    )
    return _template(
        [
            *system_lines,
            "{%- if not turns or turns | length > 2 or turns[0]['role'] != 'user' or (turns | length == 2 and "
            "turns[1]['role'] != 'assistant') -%}",
            "{{- raise_exception('this instruction format takes "
            + ("an optional system message, " if system else "")
            + "one user message and optionally the assistant answer') -}}",
            "{%- endif -%}",
            f"{{{{- special + bos_token + mark + prompt + {pre} + turns[0]['content'] + {post} -}}}}",
            "{%- if turns | length == 2 -%}",
            "{{- mark + turns[1]['content'] + mark + special + eos_token -}}",
            "{%- endif -%}",
        ]
    )


# Named as the fine-tuning templates they reproduce (TEMPLATES in the sft data module); "default" is the chat.
CHAT_TEMPLATES = {
    "default": _chat_template(),
    "openorca-3b": _instruction_template(system=True, pre_question="", post_question="\n"),
    "code-7b-instruct-mathinstruct": _instruction_template(
        system=False, pre_question=AI_TASK_PROMPT, post_question="\nAnswer: "
    ),
    "code-7b-instruct-openorca": _instruction_template(system=False, pre_question=AI_TASK_PROMPT, post_question=" "),
}
CHAT_TEMPLATE = CHAT_TEMPLATES["default"]

# apply_chat_template arguments that shape the tokenized output rather than the rendered text.
_OUTPUT_OPTIONS = ("padding", "truncation", "max_length", "return_tensors", "return_dict")


class LongLlamaTokenizer(PreTrainedTokenizerFast):
    """The exact SentencePiece pipeline as a transformers tokenizer (see the module docstring).

    Loads from `tokenizer.json` when the folder has one, else builds the pipeline from `tokenizer.model`;
    `save_pretrained` writes `tokenizer.model` too; `apply_chat_template(tokenize=True)` tokenizes the chat the way the
    fine-tuning code does. `import longllama` registers it with AutoTokenizer."""

    vocab_files_names = {"vocab_file": TOKENIZER_FILE, "tokenizer_file": TOKENIZER_JSON}
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        """The backend for from_pretrained: tokenizer.json as it is (the base class would keep only its vocabulary
        for a subclass), else the pipeline built from tokenizer.model with this package's settings."""
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        if kwargs.get("tokenizer_object") is not None:
            return kwargs
        vocab_file = kwargs.get("vocab_file")
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            kwargs["tokenizer_object"] = Tokenizer.from_file(tokenizer_file)
        elif vocab_file is not None and os.path.isfile(vocab_file):
            backend, settings = _settings(Path(vocab_file).parent)
            kwargs = {**settings, **kwargs, "tokenizer_object": backend}
        else:
            raise CheckpointError(
                f"no {TOKENIZER_JSON} or {TOKENIZER_FILE} found for LongLlamaTokenizer; copy the checkpoint's "
                f"{TOKENIZER_FILE} into the folder"
            )
        return kwargs

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        files = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        folder = Path(save_directory)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        written = [folder / f"{prefix}{SPECIAL_TOKENS_MAP}"]
        _write_text(written[0], _json_text(_special_tokens_map(self)))
        source = getattr(self, "vocab_file", None)
        if source and os.path.isfile(source):
            written.append(folder / f"{prefix}{TOKENIZER_FILE}")
            _copy_file(Path(source), written[-1])
        else:
            # The loaders of this package read tokenizer.model only; say so rather than leave a folder they refuse.
            logger.warning(
                "saved %s without %s (this tokenizer was not loaded from one): copy the checkpoint's %s there "
                "before using the folder with longllama",
                folder,
                TOKENIZER_FILE,
                TOKENIZER_FILE,
            )
        return (*files, *map(str, written))

    def apply_chat_template(self, conversation: Any, *args: Any, tokenize: bool = True, **kwargs: Any) -> Any:
        """transformers' apply_chat_template; with `tokenize=True` each segment of the chat format (system text,
        turn prefixes, turn texts) is tokenized on its own, as the fine-tuning data code does."""
        if not tokenize:
            return super().apply_chat_template(conversation, *args, tokenize=False, **kwargs)
        options = {name: kwargs.pop(name) for name in _OUTPUT_OPTIONS if name in kwargs}
        for unsupported in ("return_assistant_tokens_mask", "tokenizer_kwargs"):
            if kwargs.pop(unsupported, None):
                raise InputError(
                    f"{unsupported} is not supported by LongLlamaTokenizer.apply_chat_template(tokenize=True); "
                    "render with tokenize=False and tokenize the text yourself"
                )
        _refuse_marks(conversation)
        rendered = super().apply_chat_template(
            conversation, *args, tokenize=False, **{_SEGMENT_VAR: _SEGMENT_MARK, _SPECIAL_VAR: _SPECIAL_MARK}, **kwargs
        )
        batched = not isinstance(rendered, str)
        rows = [self._segment_ids(text) for text in (rendered if batched else [rendered])]
        return self._chat_output(rows, batched=batched, **options)

    def _segment_ids(self, rendered: str) -> list[int]:
        ids: list[int] = []
        for segment in rendered.split(_SEGMENT_MARK):
            if segment.startswith(_SPECIAL_MARK):
                token = segment[len(_SPECIAL_MARK) :]
                ids.append(self.convert_tokens_to_ids(token))
            else:
                ids += self.encode(segment, add_special_tokens=False)
        return ids

    def _chat_output(
        self,
        rows: list[list[int]],
        *,
        batched: bool,
        padding: Any = False,
        truncation: Any = False,
        max_length: int | None = None,
        return_tensors: Any = None,
        return_dict: bool = True,
    ) -> Any:
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            rows = [row[:limit] for row in rows]  # asked for by the caller, as transformers does
        if not return_dict and return_tensors is None:
            return rows if batched else rows[0]
        if padding or return_tensors is not None:
            encoded = self.pad(
                {"input_ids": rows}, padding=padding, max_length=max_length, return_tensors=return_tensors
            )
        else:
            masks = [[1] * len(row) for row in rows]
            encoded = BatchEncoding(
                {"input_ids": rows if batched else rows[0], "attention_mask": masks if batched else masks[0]}
            )
        return encoded if return_dict else encoded["input_ids"]


def _refuse_marks(conversation: Any) -> None:
    def texts(value: Any) -> Any:
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            for item in value.values():
                yield from texts(item)
        elif isinstance(value, Sequence):
            for item in value:
                yield from texts(item)

    for text in texts(conversation):
        if _SEGMENT_MARK in text or _SPECIAL_MARK in text:
            raise InputError("a chat message holds LongLlamaTokenizer's internal segment marker; remove it")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> LongLlamaTokenizer:
    """Return the tokenizer of `model_dir/tokenizer.model`: `encode(text)` is `[BOS] + SentencePiece ids`, no EOS.

    Pad token and `model_max_length` come from `model_dir/config.json` when there is one (module docstring)."""
    backend, settings = _settings(Path(model_dir))
    return LongLlamaTokenizer(tokenizer_object=backend, name_or_path=str(model_dir), **settings)


def tokenizer_files(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The text of the transformers tokenizer files (TRANSFORMERS_FILES) for `model_dir/tokenizer.model` and its
    `config.json`: the same on every supported transformers version."""
    backend, settings = _settings(Path(model_dir))
    # The tokenizer adds the BOS post-processor and the special tokens to its copy of the backend.
    tokenizer = LongLlamaTokenizer(tokenizer_object=backend, **settings)
    config = {"tokenizer_class": LongLlamaTokenizer.__name__, **settings}
    config.pop("vocab_file")  # the folder's own tokenizer.model, found by name
    return {
        TOKENIZER_JSON: tokenizer.backend_tokenizer.to_str(pretty=True) + "\n",
        TOKENIZER_CONFIG: _json_text(config),
        SPECIAL_TOKENS_MAP: _json_text(_special_tokens_map(tokenizer)),
    }


def write_tokenizer_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json next to `model_dir/tokenizer.model`
    (each file atomically), replacing older ones; run it after config.json is in place. Returns the paths."""
    folder = Path(model_dir)
    written = []
    for name, text in tokenizer_files(folder).items():
        _write_text(folder / name, text)
        written.append(folder / name)
    return written


def _settings(model_dir: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The backend pipeline and the tokenizer settings (all JSON values except the backend) for a folder."""
    model_file = _find_model_file(model_dir)
    proto = _read_proto(model_file)
    _check_supported(proto, model_file)
    special = _special_tokens(proto)
    config = _read_config(model_dir)
    if "pad_token" not in special:
        pad = config.get("pad_token_id")
        if isinstance(pad, int) and 0 <= pad < len(proto.pieces):
            special["pad_token"] = proto.pieces[pad].piece
    settings: dict[str, Any] = {
        "vocab_file": str(model_file),
        "add_bos_token": True,
        "add_eos_token": False,
        # Without this a prompt containing the text "</s>" would turn into the EOS id; SentencePiece reads it as text.
        "split_special_tokens": True,
        # transformers' clean-up would eat spaces before punctuation, breaking the decode round trip.
        "clean_up_tokenization_spaces": False,
        # Batched generation continues every row at the right edge.
        "padding_side": "left",
        # transformers' list form of named templates, which every supported version reads.
        "chat_template": [{"name": name, "template": text} for name, text in CHAT_TEMPLATES.items()],
        **special,
    }
    context = _usable_context(model_dir, config)
    if context is not None:
        settings["model_max_length"] = context
    logger.debug("read %s: %d pieces, special tokens %s", model_file, len(proto.pieces), special)
    return _build_backend(proto), settings


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); re-copy the checkpoint's config.json") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-copy the checkpoint's config.json")
    return raw


def _usable_context(model_dir: Path, raw: Mapping[str, Any]) -> int | None:
    """The context a model folder's config reports as usable (what lm-eval and pipelines read), if it has one."""
    if raw.get("model_type") == "longllama":
        from longllama.config import LongLlamaConfig

        return int(LongLlamaConfig.from_pretrained(model_dir).max_position_embeddings)
    value = raw.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _special_tokens_map(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name) is not None}


def _json_text(value: Mapping[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _copy_file(source: Path, target: Path) -> None:
    if target.exists() and target.resolve() == source.resolve():
        return
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(source, temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, *, bos: bool = True) -> list[int]:
    """Token ids of `text` for generation: BOS (unless `bos=False`) then the text's pieces, never EOS."""
    return encode_prompts(tokenizer, [text], bos=bos)[0]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, bos: bool = True) -> list[list[int]]:
    """encode_prompt of each text, in one call of the tokenizer: a fast tokenizer encodes the texts on several
    threads (prompts of millions of tokens take seconds each), with the same ids as one at a time."""
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"prompt must be a str, got {type(text).__name__}; decode it to text first")
        if not text:
            raise InputError("prompt is empty; pass some text to continue from")
    if bos and tokenizer.bos_token_id is None:
        raise InputError("this tokenizer has no BOS token; call encode_prompt with bos=False")
    # Prepend BOS here rather than through the tokenizer's post-processor, so the result does not depend on how a
    # tokenizer loaded elsewhere was configured (add_bos_token / add_eos_token).
    # verbose=False: transformers would warn of "indexing errors" past model_max_length; windows read any length.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for text, ids in zip(texts, encoded):
        ids = ([tokenizer.bos_token_id] if bos else []) + list(ids)
        if not ids:
            raise InputError(f"prompt {text[:40]!r} encodes to no tokens (only whitespace?); pass some visible text")
        out.append(ids)
    return out


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
