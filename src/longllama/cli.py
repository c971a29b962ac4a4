"""The `longllama` command line: subcommands as plain typed functions, user errors as one line on stderr.

`longllama generate --model DIR --prompt TEXT` loads a checkpoint folder and its `tokenizer.model`, reads the prompt
into the model's memory (a progress bar on stderr shows tokens/s) and streams the continuation to stdout.
`longllama train CONFIG.yaml [--set KEY=VALUE | --KEY VALUE ...] [--resume]` trains from a YAML config (configs/);
`longllama finetune ...` is the same with mode finetune; `--lora` on either trains peft LoRA adapters only.
Under `torchrun --nproc_per_node N` with `parallel: ddp` or `fsdp2` the processes train together.
`longllama passkey --model DIR [--lengths 4096,16384] [--depths 0,0.5,1]` runs the passkey retrieval test
(docs/evaluation.md#passkey-retrieval)
over prompt lengths (in tokens) and key depths, prints the accuracy table and can save JSON results and a plot.
`longllama kv --model DIR [--lengths 4096,16384] [--pairs 8]` is the same over key-value lines: one key asked among
several hidden ones (docs/evaluation.md#key-value-retrieval).
`longllama perplexity --model DIR --data FILE.jsonl [--contexts 0,1k,4k,16k,64k]` scores the same target tokens of
held-out documents after contexts of each length, prints perplexity per context length and can save JSON and a plot.
Every `LongLlamaError` (and an unreadable prompt file) ends the command with `longllama: error: <message>` on stderr
and exit status 2, as argparse does for usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Self, TextIO

from longllama import timings
from longllama.choices import MEM_RETRIEVALS, QUANTIZATIONS
from longllama.errors import InputError, LongLlamaError
from longllama.serve.config import ServeConfig

logger = logging.getLogger(__name__)

PROG = "longllama"
EXIT_USAGE = 2  # argparse's status for usage errors; user errors share it
DTYPES = ("auto", "float32", "bfloat16", "float16")
MEM_DTYPE_CHOICES = ("float32", "bfloat16", "float16", "int8")  # --mem-dtype: how memory layers store keys/values
SERVE_DEFAULTS = ServeConfig()  # `longllama serve`'s option defaults are the server's own
PASSKEY_LENGTHS = (4096, 16384)  # prompt tokens of `passkey` and `kv` without --lengths
REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for the bytes of a character not complete yet


class CliError(LongLlamaError):
    """A command-line value that cannot be used (missing --model, unavailable device...)."""


class _ParsedOptions:
    """A dataclass of command options that main gathers from the parsed arguments into one object."""

    @classmethod
    def take(cls, args: dict[str, Any]) -> Self:
        """The options among parsed arguments `args` (by name), removed from them."""
        return cls(**{f.name: args.pop(f.name) for f in dataclasses.fields(cls) if f.name in args})


@dataclasses.dataclass(frozen=True)
class LoadOptions(_ParsedOptions):
    """How a command loads its model: the options every model command shares (_add_model_arguments,
    _add_load_options, _eval_options), gathered once from the parsed arguments (`take`) and handed to load_model.
    None: the checkpoint's own setting. `mem_layers` replaces the checkpoint's memory layers ([]: no memory),
    `mem_top_k` 0 is dense memory, `quantize` the weights' quantization after the move to `device`, `plan` KEY=VALUE
    changes of the execution plan, `verbose` prints the plan (and the commands their timings)."""

    dtype: str = "auto"
    device: str = "auto"
    mem_attention_grouping: tuple[int, int] | None = None
    mem_layers: list[int] | None = None
    mem_top_k: int | None = None
    compile_elementwise: bool | None = None
    plan: list[str] | None = None
    verbose: bool = False
    quantize: str | None = None
    mem_dtype: str | None = None
    mem_retrieval: str | None = None
    mem_blocks: int | None = None
    mem_super_size: int | None = None
    mem_recent_blocks: int | None = None
    mem_offload: bool | None = None


@dataclasses.dataclass(frozen=True)
class SweepOptions(_ParsedOptions):
    """What the needle commands (passkey, kv) share besides the model and their own prompt settings (_add_lengths,
    _add_sweep_options): prompt lengths in tokens (None: PASSKEY_LENGTHS), trials per length (and depth) with seeds
    seed .. seed + trials - 1, how many are read together (`batch`), the local context (None: the model's own), and
    the --out and --plot files."""

    lengths: list[int] | None = None
    trials: int = 10
    seed: int = 0
    batch: int = 1
    last_context_length: int | None = None
    out: str | None = None
    plot: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Streaming text


class TextStreamer:
    """Writes generated text to a stream as tokens come, for `generate(streamer=...)`.

    Decoding token by token would lose information SentencePiece only recovers from context: a piece's leading space
    (decoders drop the space at the start of a text) and characters split over several byte pieces. So the ids seen
    since the last complete write are decoded together, behind an anchor token (BOS) that keeps the first piece from
    being treated as the start of the text; only the text not written yet is printed, and text ending in U+FFFD (an
    incomplete character) is held back until the next token completes it (or the end).
    """

    def __init__(self, tokenizer, out: TextIO, *, skip_prompt: bool = True):
        self.tokenizer = tokenizer
        self.out = out
        self._skip_next = skip_prompt  # generate() passes the prompt to the first put()
        self._skip_ids = set(tokenizer.all_special_ids)  # EOS etc. are not text
        bos = tokenizer.bos_token_id
        self._anchor = [] if bos is None else [bos]
        self._anchor_text = self._decode(self._anchor)
        self._pending: list[int] = []  # ids decoded together (since the last point where everything was written)
        self._written = 0  # characters of the pending ids' text already written
        self.text = ""  # everything written, for callers that want it
        self.tokens = 0

    def put(self, tokens) -> None:
        if self._skip_next:
            self._skip_next = False
            return
        ids = [int(t) for t in tokens.reshape(-1).tolist()]
        self.tokens += len(ids)
        self._pending.extend(i for i in ids if i not in self._skip_ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        if self.text and not self.text.endswith("\n"):
            self._write("\n")  # leave the terminal on a fresh line; not part of `text`
        self.out.flush()

    def _flush(self, *, final: bool) -> None:
        text = self._pending_text()
        ready = text if final else text.rstrip(REPLACEMENT_CHAR)
        if len(ready) > self._written:
            new = ready[self._written :]
            self._write(new)
            self.text += new
            self._written = len(ready)
        if ready == text:
            # Nothing held back: later pieces decode the same without the earlier ones, so start afresh (this keeps
            # each decode short instead of re-decoding everything generated).
            self._pending, self._written = [], 0

    def _pending_text(self) -> str:
        if not self._pending:
            return ""
        text = self._decode(self._anchor + self._pending)
        return text[len(self._anchor_text) :] if text.startswith(self._anchor_text) else text

    def _decode(self, ids: list[int]) -> str:
        # Keep special tokens so the anchor is decoded as itself (and then cut off); the others are filtered in put().
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class PromptProgress:
    """A tqdm bar for reading the prompt; called with the number of prompt tokens processed so far."""

    def __init__(self, total: int, out: TextIO):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="reading prompt", unit="tok", file=out, leave=True, dynamic_ncols=True)

    def __call__(self, tokens_done: int) -> None:
        self.bar.update(tokens_done - self.bar.n)
        if tokens_done >= self.bar.total:
            self.close()

    def close(self) -> None:
        if not self.bar.disable:
            self.bar.close()
            self.bar.disable = True


# --------------------------------------------------------------------------------------------------------------------
# Subcommands


def generate(
    *,
    model: str | None,
    prompt: str | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    last_context_length: int | None = None,
    load: LoadOptions | None = None,
) -> int:
    """Continue a prompt with a LongLLaMA checkpoint, streaming the new text to stdout."""
    import torch

    from longllama.tokenizer import encode_prompt, load_tokenizer

    folder = _model_folder(model)
    load = load or LoadOptions()
    torch_device = resolve_device(load.device)
    settings = sampling_settings(temperature, top_p=top_p, top_k=top_k)
    with timings.timed("setup", "tokenizer and prompt"):  # before the model: a bad one fails in a second
        text = read_prompt(prompt, prompt_file)
        tokenizer = load_tokenizer(_tokenizer_folder(folder))
        ids = encode_prompt(tokenizer, text, bos=True)
    lm = load_model(folder, load)
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=torch_device)
    streamer = TextStreamer(tokenizer, sys.stdout)
    progress = PromptProgress(len(ids), sys.stderr)
    try:
        lm.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=streamer,
            progress=progress,
            last_context_length=last_context_length,
            max_new_tokens=max_new_tokens,
            **settings,
        )
    finally:
        progress.close()
    _print_timings(load.verbose)
    return 0


def sampling_settings(temperature: float, *, top_p: float | None, top_k: int | None) -> dict:
    """generate() settings: temperature 0 is greedy decoding; top-p / top-k only shape sampling."""
    if temperature == 0:
        if top_p is not None or top_k is not None:
            logger.warning("--top-p/--top-k only apply when sampling: pass --temperature > 0 to use them")
        return {"do_sample": False}
    settings = {"do_sample": True, "temperature": temperature}
    if top_p is not None:
        settings["top_p"] = top_p
    if top_k is not None:
        settings["top_k"] = top_k
    return settings


# --------------------------------------------------------------------------------------------------------------------
# Inputs: model folder, device, prompt, model loading


# The project's own small LongLLaMA (configs/small-fot.yaml), shipped inside the package: the default --model.
SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "small"


# Its chat-tuned variant (configs/small-chat.yaml): LoRA adapters over it, merged at load; the chat commands' default.
SHIPPED_CHAT_MODEL = SHIPPED_MODEL.parent / "small-chat"
# Names --model takes for the shipped folders (a folder of that name in the working directory comes first).
SHIPPED_NAMES = {"small": SHIPPED_MODEL, "small-chat": SHIPPED_CHAT_MODEL}
LORA_INSTALL = "pip install 'longllama[lora]'"


def _model_folder(model: str | None) -> Path:
    if model is None:
        if (SHIPPED_MODEL / "config.json").is_file():
            print(f"{PROG}: no --model given: using the shipped small model ({SHIPPED_MODEL})", file=sys.stderr)
            return SHIPPED_MODEL
        raise CliError(
            "no model given: pass --model DIR with a LongLLaMA checkpoint folder "
            "(config.json, weights and tokenizer.model)"
        )
    folder = Path(model).expanduser()
    if not folder.is_dir() and model in SHIPPED_NAMES and SHIPPED_NAMES[model].is_dir():
        return SHIPPED_NAMES[model]
    if not folder.is_dir():
        raise CliError(
            f"--model {model}: no such folder; pass the path of a local LongLLaMA checkpoint folder "
            f"(or a shipped name: {', '.join(SHIPPED_NAMES)})"
        )
    return folder


def _chat_model_folder(model: str | None, template: str | None) -> tuple[Path, str | None]:
    """(folder, template) of the chat commands: without --model the chat-tuned model when it is shipped and peft is
    installed; without peft the base model, whose answers need plain continuation (template 'none' unless given)."""
    if model is not None or not is_adapter_folder(SHIPPED_CHAT_MODEL):
        return _model_folder(model), template
    try:
        import peft  # noqa: F401
    except ImportError:
        print(
            f"{PROG}: warning: the chat-tuned model needs peft ({LORA_INSTALL}); using the base model"
            + (" with --template none" if template is None else ""),
            file=sys.stderr,
        )
        return _model_folder(None), "none" if template is None else template
    print(f"{PROG}: no --model given: using the shipped chat model ({SHIPPED_CHAT_MODEL})", file=sys.stderr)
    return SHIPPED_CHAT_MODEL, template


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter folder (adapter_config.json, no config.json of its own): adapters over a base model."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: Path) -> Path:
    """The base model folder of an adapter folder: its base_model_name_or_path, relative to the adapter folder
    unless absolute."""
    import json

    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{folder}/adapter_config.json is unreadable ({exc}): export the adapters again") from None
    path = Path(str(base)).expanduser()
    path = path if path.is_absolute() else (folder / path).resolve()
    if not (path / "config.json").is_file():
        raise CliError(
            f"{folder}: the adapters' base model {base} is not a LongLLaMA folder here: set base_model_name_or_path "
            "in adapter_config.json to the base folder (absolute, or relative to the adapter folder)"
        )
    return path


def _tokenizer_folder(folder: Path) -> Path:
    return adapter_base(folder) if is_adapter_folder(folder) else folder


def resolve_device(name: str):
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' as a torch.device, checked against this machine."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise CliError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            choices = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise CliError(f"--device {name}: this machine has {count} CUDA device(s); use {choices}")
    return device


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text, from --prompt or from a UTF-8 file ('-' reads stdin), taken as is (no stripping)."""
    if prompt_file is None:
        if not prompt:
            raise InputError("the prompt is empty: pass some text with --prompt TEXT or --prompt-file FILE")
        return prompt
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CliError(f"prompt file {prompt_file} does not exist: check the --prompt-file path") from None
        except OSError as exc:
            raise CliError(
                f"cannot read prompt file {prompt_file} ({exc.strerror or exc}): pass a readable text file"
            ) from None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"prompt file {prompt_file} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
            ) from None
    if not text:
        raise InputError(f"prompt file {prompt_file} is empty: write the prompt text into it")
    return text


def load_model(folder: Path, options: LoadOptions | None = None, *, transformers_model: bool = False):
    """The model in `folder` as `options` say (LoadOptions; default: the checkpoint as stored, on CUDA when
    available), in eval mode: a plain-PyTorch lm.LongLlamaLM, which spares the seconds of importing transformers'
    model classes, or LongLlamaForCausalLM with `transformers_model` (libraries that take a PreTrainedModel), and
    for what only transformers loads (LoRA adapters, quantized folders, .bin weights). The plan changes are checked
    before the weights load; the quantization is applied after the move to the device (its layout is the
    device's)."""
    import torch

    from longllama.plan import check_changes, parse_overrides

    o = options or LoadOptions()
    device = resolve_device(o.device)
    if o.dtype not in DTYPES:  # argparse checks too; this guards calls from Python
        raise CliError(f"--dtype {o.dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    changes = parse_overrides(o.plan)
    check_changes(changes)  # a bad field or value fails before minutes of loading
    overrides: dict[str, Any] = {}
    if o.mem_attention_grouping is not None:
        overrides["mem_attention_grouping"] = tuple(o.mem_attention_grouping)
    if o.mem_layers is not None:
        overrides["mem_layers"] = list(o.mem_layers)
    if o.mem_top_k is not None:
        overrides["mem_top_k"] = o.mem_top_k or None
    for key in (
        "compile_elementwise",
        "mem_dtype",
        "mem_retrieval",
        "mem_blocks",
        "mem_super_size",
        "mem_recent_blocks",
        "mem_offload",
    ):
        if getattr(o, key) is not None:
            overrides[key] = getattr(o, key)
    from longllama import quantize as quantization

    quantize = quantization.check_quantization(o.quantize)
    if overrides.get("mem_retrieval") == "blocks" and "mem_top_k" not in overrides:
        overrides["mem_top_k"] = None  # the two ways of reading the memory exclude each other; the flag wins
    torch_dtype = "auto" if o.dtype == "auto" else getattr(torch, o.dtype)
    adapter = folder if is_adapter_folder(folder) else None
    if adapter is not None:
        folder = adapter_base(adapter)
    if quantization.is_quantized_folder(folder):  # quantized layouts are tied to a device: load straight there
        from longllama import LongLlamaForCausalLM

        overrides["device_map"] = str(device)
        model = LongLlamaForCausalLM.from_pretrained(folder, dtype=torch_dtype, **overrides)
    else:
        plain = not (transformers_model or adapter is not None)
        model = _load_weights(folder, torch_dtype, torch.device(device), overrides, plain=plain)
    if adapter is not None:
        model = _merge_adapter(model, adapter)
    model = model.to(device).eval()
    if quantize != "none" and model.config.quantization != quantize:
        quantization.quantize_model(model, quantize)  # after the move: the layout is chosen for the device
    if changes:
        model.set_plan(**changes)
    if o.verbose:
        print(f"{PROG}: {model.plan}", file=sys.stderr)
    return model


def _load_weights(folder: Path, dtype, device, overrides: dict, *, plain: bool):
    """The model's weights read once, straight onto `device` (checkpoint.load_pretrained), into lm.LongLlamaLM
    where `plain`, else LongLlamaForCausalLM; else by transformers' from_pretrained and moved (other layouts; its
    one-line errors); the seconds logged (longllama.timings)."""
    import torch

    from longllama.checkpoint import load_pretrained

    if plain:
        from longllama.lm import LongLlamaLM as cls
    else:
        from longllama import LongLlamaForCausalLM as cls
    with timings.timed("load", f"weights of {folder.name}", f"safetensors straight to {device}") as info:
        try:
            model = load_pretrained(cls, folder, dtype=dtype, device=device, **overrides)
        except (LongLlamaError, torch.OutOfMemoryError):
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError):  # from_pretrained words the error
            model = None
        if model is None:
            from longllama import LongLlamaForCausalLM

            info["source"] = "from_pretrained, then moved"
            model = LongLlamaForCausalLM.from_pretrained(folder, dtype=dtype, **overrides).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return model


def _print_timings(verbose: bool) -> None:
    """With --verbose: what this process loaded, compiled, tuned or configured, and when (longllama.timings)."""
    if verbose:
        print(f"{PROG}: timings (seconds since the process started; kind; seconds; what)", file=sys.stderr)
        print(timings.report(), file=sys.stderr)
        note = bytecode_note()
        if note:
            print(f"{PROG}: note: {note}", file=sys.stderr)


def bytecode_note() -> str | None:
    """A line for --verbose where this Python writes no bytecode: every process then compiles the libraries' sources
    again (about 2 s of a command's start on a GPU machine: docs/cold-start.md), and how to stop it; else None."""
    if not sys.flags.dont_write_bytecode:
        return None
    import sysconfig

    return (
        "this Python writes no bytecode (PYTHONDONTWRITEBYTECODE or -B), so every process compiles torch's and "
        "transformers' sources again: unset it, or compile them once with "
        f"`python -m compileall -q {sysconfig.get_paths()['purelib']}`"
    )


def _merge_adapter(model, adapter: Path):
    """`model` with the LoRA adapters of folder `adapter` added into its weights (peft's merge_and_unload)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise CliError(f"{adapter} holds LoRA adapters, which need peft: {LORA_INSTALL}") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    # Document memories fingerprint a model by its folder's files; the base folder's would not tell the two apart.
    merged.config._name_or_path = str(adapter)
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing and dispatch


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _layer_list(text: str) -> list[int]:
    if text.strip().lower() in ("none", "[]", ""):
        return []
    values = [_parse(int, part.strip(), "a layer index") for part in text.strip("[]").split(",") if part.strip()]
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text}: layer indices must be >= 0")
    return sorted(set(values))


def _positive_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _parse(int, text, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _temperature(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be 0 (greedy) or a positive number (sampling)")
    return value


def _probability(text: str) -> float:
    value = _parse(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def _grouping(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        heads, queries = (int(p) for p in parts)
    except ValueError:
        heads = queries = 0
    if heads < 1 or queries < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be two positive integers HEADS,QUERIES, e.g. 4,2048")
    return heads, queries


def _parse(kind: Callable[[str], object], text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LongLLaMA: long-context LLaMA inference and training.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_generate(commands)
    _add_convert(commands)
    _add_train(commands)
    _add_passkey(commands)
    _add_kv(commands)
    _add_perplexity(commands)
    _add_eval(commands)
    _add_memory(commands)
    _add_chat(commands)
    _add_serve(commands)
    _add_tune(commands)
    return parser


def train(
    *,
    config: str,
    overrides: list[str] | None = None,
    resume: bool | str = False,
    mode: str | None = None,
    lora: bool = False,
) -> int:
    """Train LongLLaMA from a YAML config (see configs/): FoT pre-training or instruction fine-tuning, as the
    config's `mode` says. `--set KEY=VALUE` (or `--KEY VALUE`) overrides a setting, e.g. `--set steps=10` or
    `--optim.lr 3e-4`; `--resume` continues from the newest checkpoint in out_dir. `--lora` trains LoRA adapters
    only (peft; settings lora.rank, lora.alpha, lora.targets, lora.dropout, lora.export=merged|adapter)."""
    from longllama.training import loop
    from longllama.training.config import load_config

    overrides = list(overrides or ())
    if lora:
        overrides.insert(0, "lora.enabled=true")  # explicit --set lora.enabled=... still wins
    settings = load_config(config, overrides=overrides, mode=mode)
    if resume:
        settings.resume = resume
    result = loop.train(settings)
    if result.main:
        print(f"trained to step {result.step}; model in {result.export_dir or settings.out_dir}")
    return 0


def finetune(*, config: str, overrides: list[str] | None = None, resume: bool | str = False, lora: bool = False) -> int:
    """Instruction / chat fine-tuning: `train` with mode finetune (`--lora`: LoRA adapters only)."""
    return train(config=config, overrides=overrides, resume=resume, mode="finetune", lora=lora)


def _add_train(commands) -> None:
    helps = {
        "train": "train or fine-tune from a YAML config (FoT pre-training, DDP / FSDP2 under torchrun)",
        "finetune": "instruction / chat fine-tuning from a YAML config (train with mode finetune)",
    }
    for name, func in (("train", train), ("finetune", finetune)):
        p = commands.add_parser(name, help=helps[name], description=func.__doc__)
        p.add_argument("config", help="YAML config file (e.g. configs/tiny-pretrain.yaml)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            metavar="KEY=VALUE",
            help="override a setting (dotted keys, YAML values); repeatable. --KEY VALUE works too",
        )
        p.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=False,
            metavar="CHECKPOINT",
            help="continue from the newest checkpoint in out_dir (or from CHECKPOINT)",
        )
        p.add_argument(
            "--lora",
            action="store_true",
            help="train LoRA adapters only (needs peft: pip install 'longllama[lora]'); settings under lora.*, "
            "e.g. --lora.rank 16 --lora.export adapter",
        )
        p.set_defaults(func=func)


def _option_overrides(tokens: list[str]) -> list[str]:
    """Trailing `--KEY VALUE` / `--KEY=VALUE` / `--FLAG` arguments of train as KEY=VALUE overrides."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise argparse.ArgumentError(None, f"unexpected argument {token!r}: overrides are --KEY VALUE")
        key = token[2:]
        if "=" in key:
            out.append(key)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append(f"{key}={tokens[i + 1]}")
            i += 2
        else:
            out.append(f"{key}=true")
            i += 1
    return out


def convert(
    *,
    src: str,
    dst: str,
    to: str,
    mem_layers: list[int] | None = None,
    last_context_length: int | None = None,
    mem_dtype: str = "bfloat16",
    dtype: str | None = None,
) -> int:
    """Convert a checkpoint folder: `safetensors` (.bin -> safetensors, same model), `longllama` (a transformers
    LLaMA folder -> LongLLaMA with the chosen memory layers) or `llama` (LongLLaMA -> plain LLaMA)."""
    from longllama import checkpoint

    if dtype is not None and to != "safetensors":
        return _fail("--dtype works with --to safetensors; convert first, then cast with --to safetensors --dtype")
    if to == "safetensors":
        import torch

        checkpoint.convert_to_safetensors(src, dst, dtype=None if dtype is None else getattr(torch, dtype))
    elif to == "longllama":
        if mem_layers is None:
            return _fail("--to longllama needs --mem-layers, e.g. --mem-layers 6,12,18")
        checkpoint.llama_to_longllama(
            src, dst, mem_layers=mem_layers, last_context_length=last_context_length, mem_dtype=mem_dtype
        )
    else:
        checkpoint.longllama_to_llama(src, dst)
    print(f"wrote {dst}")
    return 0


def _int_list(text: str) -> list[int]:
    return _parse(lambda t: [int(x) for x in t.split(",") if x.strip()], text, "a comma-separated list of integers")


def _add_convert(commands) -> None:
    p = commands.add_parser(
        "convert", help="convert checkpoint folders (safetensors, LLaMA <-> LongLLaMA)", description=convert.__doc__
    )
    p.add_argument("src", help="source checkpoint folder")
    p.add_argument("dst", help="destination folder (must not exist or be empty); written atomically")
    p.add_argument("--to", required=True, choices=["safetensors", "longllama", "llama"], help="what to make")
    p.add_argument("--mem-layers", type=_int_list, metavar="I,J,...", help="memory layers (with --to longllama)")
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="final window kept in the local cache (with --to longllama; default: half the window)",
    )
    p.add_argument(
        "--mem-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="storage dtype of the memory (with --to longllama)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="cast the weights (with --to safetensors), e.g. bfloat16 to halve a float32 checkpoint",
    )
    p.set_defaults(func=convert)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device and --mem-attention-grouping: how every model-running command loads its model."""
    p.add_argument(
        "--model",
        metavar="DIR",
        help="LongLLaMA checkpoint folder (config.json, weights, tokenizer.model); "
        "default: the small model shipped with the package",
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: as stored in the checkpoint)")
    p.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}", help="where to run (auto: CUDA when available)"
    )
    p.add_argument(
        "--mem-attention-grouping",
        type=_grouping,
        metavar="H,Q",
        help="memory attention in chunks of H heads and Q queries, to bound its memory use (e.g. 1,2048)",
    )
    p.add_argument(
        "--mem-layers",
        type=_layer_list,
        metavar="I,J,...|none",
        help="use these layers as memory layers instead of the checkpoint's ('none': no memory at all)",
    )
    p.add_argument(
        "--mem-top-k",
        type=_non_negative_int,
        metavar="K",
        help="kNN memory: each query of a memory layer attends to its K best memory keys only "
        "(0: dense; default: the checkpoint's mem_top_k)",
    )
    p.add_argument(
        "--compile",
        dest="compile_elementwise",
        action=argparse.BooleanOptionalAction,
        help="run RMSNorm, RoPE, SwiGLU and the merges through torch.compile instead of the Triton kernels that "
        "serve them on GPUs by default (default: off; seconds of compiling in every new process: docs/cold-start.md)",
    )
    p.add_argument(
        "--plan",
        action="append",
        metavar="KEY=VALUE",
        help="change one execution choice of the model's plan (repeatable), e.g. memory_kernel=cudnn or "
        "window_group_tokens=4096; --verbose shows them all",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the execution plan (kernels, widths, grouping), and at the end what was loaded, compiled, "
        "tuned or read from the cache, with its seconds",
    )
    _add_load_options(p)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    """--quantize, --mem-dtype, --mem-retrieval, --mem-blocks and --mem-offload: how the model's weights and memory
    are stored and read (every model command)."""
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="weight-only quantization of the linear layers (int8: torchao's; int4: grouped 4-bit codes read in place "
        "by the decoding kernels; the [quant] extra; docs/quantization.md)",
    )
    p.add_argument(
        "--mem-dtype",
        choices=MEM_DTYPE_CHOICES,
        help="how memory layers store keys and values (int8: 8 bits and a scale per token and head; default: the "
        "checkpoint's mem_dtype)",
    )
    p.add_argument(
        "--mem-retrieval",
        choices=MEM_RETRIEVALS,
        help="how memory layers read the memory: dense (every key) or blocks (each group of queries reads only its "
        "--mem-blocks best blocks of keys; docs/retrieval.md; default: the checkpoint's mem_retrieval)",
    )
    p.add_argument(
        "--mem-blocks",
        type=_positive_int,
        metavar="N",
        help="with --mem-retrieval blocks: memory blocks (of mem_block_size keys, 64 by default) read per group "
        "of queries (default: the checkpoint's mem_blocks, 64)",
    )
    p.add_argument(
        "--mem-super-size",
        type=_non_negative_int,
        metavar="S",
        help="with --mem-retrieval blocks: rank superblocks of S blocks first, then only the blocks of the best of "
        "them (0: every block is ranked; default: the checkpoint's mem_super_size, 0)",
    )
    p.add_argument(
        "--mem-recent-blocks",
        type=_non_negative_int,
        metavar="R",
        help="with --mem-retrieval blocks: R of the --mem-blocks blocks a group reads are always the memory's most "
        "recent ones (default: the checkpoint's mem_recent_blocks, 0)",
    )
    p.add_argument(
        "--mem-offload",
        action="store_true",
        default=None,
        help="keep the memory in page-locked CPU memory, so its size is bounded by CPU memory, not the GPU's; with "
        "--mem-retrieval blocks only the chosen blocks are read, over the bus (docs/retrieval.md)",
    )
    p.set_defaults(load_options=True)  # main gathers the loading options into one LoadOptions (`load`)


def _add_generate(commands) -> None:
    p = commands.add_parser(
        "generate", help="continue a prompt, streaming the text to stdout", description=generate.__doc__
    )
    _add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    source.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file ('-': stdin)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N", help="at most N new tokens (256)")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help="0 (default): greedy decoding; > 0: sample at this temperature",
    )
    p.add_argument("--top-p", type=_probability, metavar="P", help="nucleus sampling: keep the top P of probability")
    p.add_argument("--top-k", type=_non_negative_int, metavar="K", help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for repeatable sampling")
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="prompt tokens kept in the local context (default: the model's config)",
    )
    p.set_defaults(func=generate)


def passkey(
    *,
    model: str | None,
    depths: list[float | None] | None = None,
    sweep: SweepOptions | None = None,
    load: LoadOptions | None = None,
) -> int:
    """Passkey retrieval (docs/evaluation.md#passkey-retrieval): hide a pass key in filler text at each prompt length
    (in tokens) and key depth,
    greedy-decode the answer and count exact matches. Prints accuracy per length and depth; --out saves every trial
    as JSON, --plot draws accuracy against length and a length x depth heatmap."""
    from longllama.evals import passkey as task

    sweep = sweep or SweepOptions()
    return _sweep(
        task,
        model,
        sweep,
        load,
        check_lengths=functools.partial(task.check_lengths, seed=sweep.seed),
        run=functools.partial(task.run_passkey, depths=depths),
        settings={"depths": depths},
    )


def kv(
    *,
    model: str | None,
    pairs: int | None = None,
    sweep: SweepOptions | None = None,
    load: LoadOptions | None = None,
) -> int:
    """Key-value retrieval (docs/evaluation.md#key-value-retrieval): hide --pairs 'key: value' lines at random places
    in filler text of each prompt length (in tokens), ask for one key's value, greedy-decode it and count exact
    matches. Prints accuracy per length; --out saves every trial as JSON, --plot draws accuracy against length."""
    from longllama.evals import kv as task

    sweep = sweep or SweepOptions()
    pairs = task.DEFAULT_PAIRS if pairs is None else pairs
    return _sweep(
        task,
        model,
        sweep,
        load,
        check_lengths=functools.partial(task.check_lengths, seed=sweep.seed, pairs=pairs),
        run=functools.partial(task.run_kv, pairs=pairs),
        settings={"pairs": pairs},
    )


def _sweep(
    task,
    model: str | None,
    sweep: SweepOptions,
    load: LoadOptions | None,
    *,
    check_lengths: Callable[..., None],
    run: Callable[..., list[dict]],
    settings: dict[str, Any],
) -> int:
    """The body of the needle commands: `check_lengths(tokenizer, lengths)` before the model loads (that can take
    minutes), `run(model, tokenizer, lengths=..., trials=..., ...)` for the records, saved to --out after every
    batch, then `task`'s table, JSON and plot. The record's settings name the task (its module's name) and add
    `settings`, what only it takes."""
    from longllama.evals import records as eval_records
    from longllama.tokenizer import load_tokenizer

    folder = _model_folder(model)
    load = load or LoadOptions()
    torch_device = resolve_device(load.device)
    lengths = sweep.lengths or list(PASSKEY_LENGTHS)
    out_path = _output_file(sweep.out, "--out")
    plot_path = _output_file(sweep.plot, "--plot")
    if plot_path is not None:
        eval_records.plot_format(plot_path)
    # Everything that can fail without the model is checked before loading it: that can take minutes.
    with timings.timed("setup", "tokenizer and prompts"):
        tokenizer = load_tokenizer(_tokenizer_folder(folder))
        check_lengths(tokenizer, lengths)
    # The model's own (1024 for the released checkpoints, as docs/evaluation.md#passkey-retrieval uses) unless given.
    last_context_length = _last_context_length(folder, sweep.last_context_length)
    lm = load_model(folder, load)
    settings = {
        "task": task.__name__.rpartition(".")[2],
        "model": str(folder),
        "lengths": lengths,
        **settings,
        "trials": sweep.trials,
        "seed": sweep.seed,
        "batch": sweep.batch,
        "last_context_length": last_context_length,
        "dtype": load.dtype,
        "device": str(torch_device),
        "mem_attention_grouping": load.mem_attention_grouping,
        "mem_layers": load.mem_layers,
        "mem_top_k": load.mem_top_k,
        "plan": lm.plan.to_dict(),
    }

    def save_so_far(records: list[dict]) -> None:  # a run killed or cut by a time limit keeps its finished trials
        eval_records.save_results(out_path, records, task.summarize(records), settings={**settings, "complete": False})

    records = run(
        lm,
        tokenizer,
        lengths=lengths,
        trials=sweep.trials,
        seed0=sweep.seed,
        last_context_length=last_context_length,
        progress=True,
        on_record=save_so_far if out_path is not None else None,
        batch=sweep.batch,
    )
    status = _report(task, records, {**settings, "complete": True}, out_path, plot_path)
    _print_timings(load.verbose)
    return status


def _last_context_length(folder: Path, given: int | None) -> int:
    """`given`, or the checkpoint config's last_context_length (read without loading the weights)."""
    if given is not None:
        return given
    from longllama.config import LongLlamaConfig

    return LongLlamaConfig.from_pretrained(folder).last_context_length


def _output_file(name: str | None, option: str) -> Path | None:
    """An output path whose folder exists and is writable, checked before a run that may take hours."""
    if name is None:
        return None
    import os

    path = Path(name).expanduser()
    if path.is_dir():
        raise CliError(f"{option} {name} is a folder: pass a file name")
    if not path.parent.is_dir():
        raise CliError(f"{option} {name}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise CliError(f"{option} {name}: folder {path.parent} is not writable; choose another place")
    return path


def _token_count(text: str) -> int:
    """A length in tokens: an integer, or with a k or m suffix (x1024: 4k = 4096; x1024^2: 1m = 1048576)."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    value = _parse(int, text[:-1] if scale > 1 else text, "a whole number of tokens (e.g. 4096, 4k or 1m)") * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 token")
    return value


def _lengths(text: str) -> list[int]:
    values = [_token_count(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} must list prompt lengths in tokens, e.g. 4096,16384")
    return sorted(set(values))


def _depths(text: str) -> list[float | None]:
    """Key depths in [0, 1] (0: key right after the instruction, 1: right before the question); 'none' (or
    'random') is the reference's random place (docs/evaluation.md#passkey-retrieval)."""
    values: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = None if part.lower() in ("none", "random") else _parse(float, part, "a depth in [0, 1] or 'none'")
        if value is not None and not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"depth {part} must be in [0, 1] (or 'none' for a random place)")
        if value not in values:
            values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} must list key depths, e.g. 0,0.5,1 or none")
    return values


def _add_passkey(commands) -> None:
    p = _needle_parser(commands, passkey, "passkey retrieval accuracy over prompt lengths and key depths")
    p.add_argument(
        "--depths",
        type=_depths,
        metavar="D,D,...|none",
        help="key depths in [0, 1], e.g. 0,0.5,1 (default: none, a random place per trial, as the reference did)",
    )
    _add_sweep_options(p, per="length and depth", plot="draw accuracy against length and a length x depth heatmap")


def _add_kv(commands) -> None:
    p = _needle_parser(commands, kv, "key-value retrieval accuracy (one key asked among several) over prompt lengths")
    p.add_argument("--pairs", type=_positive_int, metavar="N", help="key-value lines per prompt, one asked (8)")
    _add_sweep_options(p, per="length", plot="draw accuracy against length")


def _needle_parser(commands, func: Callable[..., int], summary: str) -> argparse.ArgumentParser:
    """The subparser of a needle command `func` (passkey, kv) with the model options and --lengths."""
    p = commands.add_parser(func.__name__, help=summary, description=func.__doc__)
    _add_model_arguments(p)
    _add_lengths(p)
    p.set_defaults(func=func)
    return p


def _add_lengths(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lengths",
        type=_lengths,
        metavar="N,N,...",
        help="prompt lengths in tokens, a k suffix meaning x1024, m x1024^2 (default: 4096,16384)",
    )


def _add_sweep_options(p: argparse.ArgumentParser, *, per: str, plot: str) -> None:
    """SweepOptions after --lengths and the task's own options: trials, seed, batch, local context, output files."""
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=10,
        metavar="N",
        help=f"prompts per {per}, seeds S .. S+N-1 (10)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="first seed of the prompt generator (0)")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        metavar="N",
        help=f"trials of one {per} read together (1): faster on a GPU; prompts are left-padded to the "
        "longest, so a shorter one's windows begin where its padding ends",
    )
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="prompt tokens kept in the local context (default: the model's config; 1024 for the "
        "released checkpoints, as the reference evaluation)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the settings, summary and every trial as JSON (rewritten "
        "after each trial: a run cut short keeps its finished trials)",
    )
    p.add_argument("--plot", metavar="FILE", help=f"{plot} (.png)")
    p.set_defaults(sweep_options=True)  # main gathers these into one SweepOptions (`sweep`)


def perplexity(
    *,
    model: str | None,
    data: str | None,
    contexts: list[int] | None = None,
    target_tokens: int = 512,
    max_docs: int | None = None,
    last_context_length: int | None = None,
    load: LoadOptions | None = None,
    out: str | None = None,
    plot: str | None = None,
) -> int:
    """Held-out perplexity against context length: for each document with at least max(C) + T tokens, the same T
    target tokens are scored after C tokens of context, for every C (one forward call each; the context beyond the
    final window goes to the memory). Prints mean NLL and perplexity per C; --out saves JSON, --plot a PNG."""
    from longllama.documents import iter_documents
    from longllama.evals import perplexity as task
    from longllama.tokenizer import load_tokenizer

    folder = _model_folder(model)
    if data is None:
        raise CliError(
            'no data given: pass --data FILE.jsonl with a "text" field (e.g. heldout.jsonl of '
            "scripts/prepare_corpus.py)"
        )
    texts = iter_documents(data, field="text")  # checks the file exists; reads nothing yet
    load = load or LoadOptions()
    torch_device = resolve_device(load.device)
    contexts = contexts or list(task.DEFAULT_CONTEXTS)
    out_path = _output_file(out, "--out")
    plot_path = _output_file(plot, "--plot")
    if plot_path is not None:
        task.plot_format(plot_path)
    # Everything that can fail without the model is checked before loading it: that can take minutes.
    lcl = _last_context_length(folder, last_context_length)
    contexts = task.check_settings(contexts, target_tokens=target_tokens, last_context_length=lcl)
    tokenizer = load_tokenizer(_tokenizer_folder(folder))
    documents = task.load_documents(texts, tokenizer, needed_tokens=contexts[-1] + target_tokens, max_docs=max_docs)
    lm = load_model(folder, load)
    records = task.run_perplexity(
        lm,
        documents,
        contexts=contexts,
        target_tokens=target_tokens,
        bos_id=tokenizer.bos_token_id,
        last_context_length=lcl,
        progress=True,
    )
    settings = {
        "model": str(folder),
        "data": str(data),
        "contexts": contexts,
        "target_tokens": target_tokens,
        "max_docs": max_docs,
        "last_context_length": lcl,
        "dtype": load.dtype,
        "device": str(torch_device),
        "mem_attention_grouping": load.mem_attention_grouping,
        "mem_layers": load.mem_layers,
        "mem_top_k": load.mem_top_k,
        "plan": lm.plan.to_dict(),
    }
    status = _report(task, records, settings, out_path, plot_path)
    _print_timings(load.verbose)
    return status


def _report(task, records: list[dict], settings: dict, out_path: Path | None, plot_path: Path | None) -> int:
    """An evaluation's table on stdout, then its JSON and plot files if asked for."""
    summary = task.summarize(records)
    print(task.format_table(summary))
    if out_path is not None:
        print(f"wrote {task.save_results(out_path, records, summary, settings=settings)}")
    if plot_path is not None:
        print(f"wrote {task.plot_summary(summary, plot_path)}")
    return 0


def _context_lengths(text: str) -> list[int]:
    """Context lengths in tokens, 0 allowed, a k suffix meaning x1024; sorted, without repeats."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        scale = 1024 if part.lower().endswith("k") else 1
        value = _parse(int, part[:-1] if scale > 1 else part, "a whole number of tokens (e.g. 0, 4096 or 4k)")
        if value < 0:
            raise argparse.ArgumentTypeError(f"context length {part} must be 0 or more tokens")
        values.append(value * scale)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} must list context lengths in tokens, e.g. 0,1k,4k")
    return sorted(set(values))


def _add_perplexity(commands) -> None:
    p = commands.add_parser(
        "perplexity",
        help="held-out perplexity of fixed target tokens against context length",
        description=perplexity.__doc__,
    )
    _add_model_arguments(p)
    p.add_argument("--data", metavar="FILE", help='documents: .jsonl with a "text" field (or .txt / .parquet)')
    p.add_argument(
        "--contexts",
        type=_context_lengths,
        metavar="C,C,...",
        help="context lengths in tokens, a k suffix meaning x1024 (default: 0,1k,4k,16k,64k)",
    )
    p.add_argument(
        "--target-tokens",
        type=_positive_int,
        default=512,
        metavar="T",
        help="tokens scored per document, the same for every context length (512)",
    )
    p.add_argument("--max-docs", type=_positive_int, metavar="N", help="evaluate at most N documents (default: all)")
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="tokens of the final window, more than --target-tokens (default: the model's config)",
    )
    p.add_argument("--out", metavar="FILE", help="write the settings, summary and per-document results as JSON")
    p.add_argument("--plot", metavar="FILE", help="draw perplexity against context length (.png)")
    p.set_defaults(func=perplexity)


def _add_eval(commands) -> None:
    import importlib

    from longllama.evals import EVAL_TASKS

    p = commands.add_parser(
        "eval",
        help="evaluation suites (" + ", ".join(EVAL_TASKS) + ")",
        description="Run an evaluation suite on a LongLLaMA checkpoint; each writes a JSON record with --out.",
    )
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK", parser_class=_Parser)
    tasks.required = True
    for module in EVAL_TASKS.values():
        importlib.import_module(module).add_parser(tasks, _eval_options)


def _eval_options(p: argparse.ArgumentParser) -> None:
    """The options every `longllama eval` task takes (model, device, precision, plan, output, limit, seed)."""
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the shipped small model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument(
        "--plan", action="append", metavar="KEY=VALUE", help="change an execution-plan field (see --verbose)"
    )
    p.add_argument(
        "--mem-top-k",
        type=_non_negative_int,
        metavar="K",
        help="kNN memory: each query of a memory layer attends to its K best memory keys (0: dense; default: the "
        "checkpoint's)",
    )
    p.add_argument("--verbose", action="store_true", help="print the execution plan")
    p.add_argument("--out", metavar="FILE.json", help="write the settings, summary and per-sample results as JSON")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate at most N samples per task")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    _add_load_options(p)


def eval_model(model: str | None, load: LoadOptions | None = None, *, transformers_model: bool = False):
    """(folder, model, tokenizer) for an evaluation: the checkpoint in `model` (the shipped one if None), loaded as
    `load` says (load_model; `transformers_model` for a PreTrainedModel)."""
    from longllama.tokenizer import load_tokenizer

    folder = _model_folder(model)
    tokenizer = load_tokenizer(_tokenizer_folder(folder))
    return folder, load_model(folder, load, transformers_model=transformers_model), tokenizer


def output_file(name: str | None, option: str = "--out") -> Path | None:
    """An output path whose folder exists and is writable (checked before the run)."""
    return _output_file(name, option)


# --------------------------------------------------------------------------------------------------------------------
# Document memories and chat (docs/chat.md)


def memory_build(
    *,
    model: str | None,
    files: list[str],
    out: str,
    template: str | None = None,
    system: str | None = None,
    last_context_length: int | None = None,
    load: LoadOptions | None = None,
) -> int:
    """Read document files into a memory once and save it (a folder) for `longllama chat --memory` or
    DocumentMemory.load; prints the token count and the path."""
    from longllama.document_memory import read_documents

    target = _memory_target(out)
    text, sources = read_documents(files)  # before the model: a bad file fails in a second
    folder, lm, tokenizer, template = _chat_model(model, template, system, load)
    memory = _read_into_memory(lm, tokenizer, text, sources, template, system, last_context_length)
    memory.save(target)
    print(f"{memory.tokens} tokens -> {target}")
    return 0


def memory_info(*, path: str) -> int:
    """Print a saved memory's manifest: what it was built from and with."""
    from longllama.document_memory import read_manifest

    manifest = read_manifest(Path(path).expanduser())
    settings = manifest["settings"]
    lines = [
        f"memory: {path} ({manifest['format']} version {manifest['version']})",
        f"tokens: {manifest['tokens']} (local cache {manifest.get('local_length')}, "
        f"memory {manifest.get('memory_length')})",
        f"template: {settings.get('template')}; system text: {settings.get('system')!r}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("template", "system")),
    ]
    fingerprint = manifest["model"]
    lines.append(f"model: {fingerprint.get('source')}; config sha256 {fingerprint.get('config_sha256')}")
    for weights in fingerprint.get("weights", []):
        lines.append(f"  weights {weights['name']}: {weights['bytes']} bytes, header {weights.get('header_sha256')}")
    lines.append("tokenizer: " + ", ".join(f"{k} {v}" for k, v in manifest["tokenizer"].items()))
    for source in manifest.get("sources", []):
        lines.append(f"source {source['name']}: {source['bytes']} bytes, sha256 {source['sha256']}")
    for name, entry in manifest["files"].items():
        if "sha256_chunks" in entry:
            checks = f"{len(entry['sha256_chunks'])} sha256 of {entry['chunk_bytes']} bytes each"
        else:
            checks = f"sha256 {entry.get('sha256')}"
        lines.append(f"file {name}: {entry['bytes']} bytes, {checks}")
    print("\n".join(lines))
    return 0


def chat(
    *,
    model: str | None,
    file: list[str] | None = None,
    memory: str | None = None,
    template: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    last_context_length: int | None = None,
    memory_recompute_layers: int = 0,
    load: LoadOptions | None = None,
) -> int:
    """Chat about documents: read --file(s) into memory once (or load a saved --memory), then answer questions with
    streamed text. Commands: /save PATH keeps the document memory, /reset starts the conversation over, /exit.
    With standard input not a terminal, each line is a question and each answer is printed on its own line."""
    import torch

    from longllama.document_memory import DocumentMemory, read_documents, read_manifest

    if file and memory:
        raise CliError("--file and --memory both given: read documents with --file, or load a saved --memory")
    if not file and not memory:
        raise CliError("nothing to chat about: pass --file F (repeatable) or --memory PATH (from memory build)")
    if memory:
        read_manifest(Path(memory).expanduser())  # a wrong path fails before the model loads
    else:
        text, sources = read_documents(file)
    folder, lm, tokenizer, template = _chat_model(model, template, system, load)
    if memory:
        document = DocumentMemory.load(
            memory, lm, tokenizer, template=template, system=system, recompute_layers=memory_recompute_layers
        )
        print(f"{PROG}: loaded {document.tokens} tokens from {memory}", file=sys.stderr)
    else:
        document = _read_into_memory(lm, tokenizer, text, sources, template, system, last_context_length)
    if seed is not None:
        torch.manual_seed(seed)
    settings = sampling_settings(temperature, top_p=top_p, top_k=None)
    conversation = document.conversation(max_new_tokens=max_new_tokens, **settings)
    _chat_loop(document, conversation, interactive=sys.stdin.isatty())
    return 0


def _chat_loop(document, conversation, *, interactive: bool) -> None:
    if interactive:
        print(f"{PROG}: ask about the document; /save PATH, /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "/exit":
                break
            if command == "/reset":
                conversation.reset()
                print(f"{PROG}: conversation reset", file=sys.stderr)
            elif command == "/save":
                if not argument.strip():
                    raise InputError("/save needs a path: /save PATH")
                saved = document.save(_memory_target(argument.strip()))
                print(f"{PROG}: saved {document.tokens} tokens to {saved}", file=sys.stderr)
            elif command.startswith("/") and command[1:].isalpha():
                raise InputError(f"unknown command {command}: use /save PATH, /reset or /exit")
            else:
                conversation.ask(line, on_text=_write_out)
                sys.stdout.write("\n")
                sys.stdout.flush()
        except LongLlamaError as exc:  # one bad turn does not end the chat
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _memory_target(path: str) -> Path:
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise CliError(f"{path}: folder {target.parent} does not exist; create it or choose another path")
    if target.exists() and not (target / "manifest.json").is_file():
        raise CliError(f"{path} exists and is not a saved document memory: choose another path")
    return target


def _chat_model(
    model: str | None, template: str | None, system: str | None, load: LoadOptions | None, *, chat_default: bool = True
):
    """(folder, model, tokenizer, template); the chat format is checked before the model loads. `chat_default`:
    without --model, the shipped chat model (and the template that suits the model chosen)."""
    from longllama.chat_format import chat_format
    from longllama.tokenizer import load_tokenizer

    folder, template = _chat_model_folder(model, template) if chat_default else (_model_folder(model), template)
    tokenizer = load_tokenizer(_tokenizer_folder(folder))
    chat_format(tokenizer, template, system=system)
    return folder, load_model(folder, load), tokenizer, template


def _read_into_memory(lm, tokenizer, text: str, sources, template, system, last_context_length):
    import time

    from longllama.document_memory import DocumentMemory

    bar: list[PromptProgress] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(PromptProgress(total, sys.stderr))
        bar[0](done)

    start = time.perf_counter()
    try:
        memory = DocumentMemory.build(
            lm,
            tokenizer,
            text,
            template=template,
            system=system,
            last_context_length=last_context_length,
            progress=progress,
            sources=sources,
        )
    finally:
        if bar:
            bar[0].close()
    seconds = time.perf_counter() - start
    print(
        f"{PROG}: read {memory.tokens} tokens in {seconds:.1f} s ({memory.tokens / max(seconds, 1e-9):.0f} tok/s)",
        file=sys.stderr,
    )
    return memory


def _add_document_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        metavar="NAME|none",
        help="chat template of the tokenizer (default: its default chat format); 'none': plain continuation, the "
        "document then the question as is (base models)",
    )
    p.add_argument("--system", metavar="TEXT", help="system text before the document (default: the template's)")
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="document tokens kept in the local context (default: the model's config)",
    )


def _add_memory(commands) -> None:
    p = commands.add_parser(
        "memory",
        help="document memories: read documents once, save, inspect",
        description="Document memories: documents read into the model's memory once, saved as a folder (docs/chat.md).",
    )
    actions = p.add_subparsers(metavar="ACTION", parser_class=_Parser)
    actions.required = True
    build = actions.add_parser("build", help="read files into a memory and save it", description=memory_build.__doc__)
    _add_model_arguments(build)
    build.add_argument("files", nargs="+", metavar="FILE", help="documents: text files (as is), .jsonl records")
    build.add_argument("--out", required=True, metavar="PATH", help="the memory folder to write (atomically)")
    _add_document_options(build)
    build.set_defaults(func=memory_build)
    info = actions.add_parser("info", help="print a saved memory's manifest", description=memory_info.__doc__)
    info.add_argument("path", metavar="PATH", help="a memory folder written by memory build or /save")
    info.set_defaults(func=memory_info)


def _add_chat(commands) -> None:
    p = commands.add_parser("chat", help="chat about documents read into memory once", description=chat.__doc__)
    _add_model_arguments(p)
    p.add_argument("--file", action="append", metavar="F", help="a document to read (repeatable)")
    p.add_argument("--memory", metavar="PATH", help="a saved document memory (memory build, /save)")
    _add_recompute_option(p)
    _add_document_options(p)
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, metavar="N", help="at most N tokens per answer (256)"
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T", help="0 (default): greedy; > 0: sampling"
    )
    p.add_argument("--top-p", type=_probability, metavar="P", help="nucleus sampling: keep the top P of probability")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for repeatable sampling")
    p.set_defaults(func=chat)


def serve(
    *,
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    memory_dir: str | None = None,
    queue: int = SERVE_DEFAULTS.queue,
    max_batch: int = SERVE_DEFAULTS.max_batch,
    batch_wait_ms: int = SERVE_DEFAULTS.batch_wait_ms,
    max_prompt_tokens: int = SERVE_DEFAULTS.max_prompt_tokens,
    max_tokens: int = SERVE_DEFAULTS.max_tokens,
    memory_budget: int = SERVE_DEFAULTS.memory_budget,
    prefix_cache_bytes: int = SERVE_DEFAULTS.prefix_cache_bytes,
    max_body_bytes: int = SERVE_DEFAULTS.max_body_bytes,
    max_upload_bytes: int = SERVE_DEFAULTS.max_upload_bytes,
    template: str | None = None,
    memory_recompute_layers: int = SERVE_DEFAULTS.memory_recompute_layers,
    load: LoadOptions | None = None,
) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat completions, streamed or not) with
    document memories: POST a document to /v1/memories once, then ask about it with "memory": ID (docs/serve.md)."""
    try:
        import uvicorn  # noqa: F401 - checked here, used by run_server

        from longllama.serve import ServeConfig, create_app, run_server
    except ImportError as exc:
        raise CliError(f"serve needs FastAPI and uvicorn ({exc}): pip install 'longllama[serve]'") from None
    import os

    api_key = api_key or os.environ.get("LONGLLAMA_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    if memory_dir is not None:
        folder_of_memories = Path(memory_dir).expanduser()
        if folder_of_memories.exists() and not folder_of_memories.is_dir():
            raise CliError(f"--memory-dir {memory_dir} is a file: pass a folder (it is created when missing)")
        memory_dir = str(folder_of_memories)
    folder, lm, tokenizer, _ = _chat_model(model, template, None, load, chat_default=False)
    if memory_recompute_layers > len(lm.config.mem_layers):
        raise CliError(
            f"--memory-recompute-layers {memory_recompute_layers}: the model has {len(lm.config.mem_layers)} memory "
            "layers; pass at most that"
        )
    config = ServeConfig(
        model_id=folder.resolve().name,
        api_key=api_key,
        memory_dir=memory_dir,
        queue=queue,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        memory_budget=memory_budget,
        prefix_cache_bytes=prefix_cache_bytes,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        template=template,
        memory_recompute_layers=memory_recompute_layers,
    )
    app = create_app(lm, tokenizer, config, model_thread=False)  # the model's work stays on this thread
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack on stderr (a server stuck somewhere)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    print(f"{PROG}: serving {config.model_id} on http://{host}:{port} (OpenAI API under /v1)", file=sys.stderr)
    try:
        run_server(app, host=host, port=port)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    print(f"{PROG}: stopped", file=sys.stderr)
    # The interpreter's exit runs the libraries' shutdown hooks (compile worker pools among them); one that hangs
    # keeps a stopped server alive: after 20 s, print where every thread is.
    faulthandler.dump_traceback_later(20, exit=False)
    return 0


def _add_recompute_option(p) -> None:
    p.add_argument(
        "--memory-recompute-layers",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="compute the first K memory layers' memories again from a saved memory's tokens while the others are "
        "read from disk (faster where the disk is slower than the GPU; 0, the default: read everything)",
    )


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with document memories", description=serve.__doc__
    )
    _add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_non_negative_int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $LONGLLAMA_API_KEY, which "
        "keeps the key out of process listings)",
    )
    p.add_argument(
        "--memory-dir", metavar="DIR", help="where memories are kept across restarts (default: a temporary folder)"
    )
    _add_recompute_option(p)
    d = SERVE_DEFAULTS
    for flag, kind, metavar, text in (
        ("--queue", _positive_int, "N", f"requests that may wait for the model ({d.queue}); more: 429"),
        ("--max-batch", _positive_int, "N", f"generations decoded together ({d.max_batch}); more wait in the queue"),
        (
            "--batch-wait-ms",
            _non_negative_int,
            "MS",
            f"an idle server's wait, after a request arrives, for others to read with it ({d.batch_wait_ms}; 0: none)",
        ),
        ("--max-prompt-tokens", _positive_int, "N", f"prompt tokens per request ({d.max_prompt_tokens})"),
        ("--max-tokens", _positive_int, "N", f"new tokens per request ({d.max_tokens})"),
        (
            "--memory-budget",
            _positive_int,
            "BYTES",
            f"bytes of memories kept loaded ({_bytes(d.memory_budget)}); the others are read from disk when used",
        ),
        (
            "--prefix-cache-bytes",
            _non_negative_int,
            "BYTES",
            "memory kept of recent prompts' whole windows, reused by prompts that start the same "
            f"({_bytes(d.prefix_cache_bytes)}; 0: off)",
        ),
        ("--max-body-bytes", _positive_int, "BYTES", f"request body limit ({_bytes(d.max_body_bytes)})"),
        ("--max-upload-bytes", _positive_int, "BYTES", f"memory upload limit ({_bytes(d.max_upload_bytes)})"),
    ):
        name = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, default=getattr(d, name), metavar=metavar, help=text)
    p.add_argument(
        "--template",
        metavar="NAME|none",
        help="chat format of chat requests and new memories (default: the tokenizer's); 'none': plain continuation",
    )
    p.set_defaults(func=serve)


def _bytes(n: int) -> str:
    """A byte count as help texts give it: 4 GiB, 64 MiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


TUNE_SHAPES = ("tiny", "3b", "code-7b")


def tune(
    *,
    model: str | None = None,
    shape: str | None = None,
    tokens: list[int] | None = None,
    new_tokens: int = 8,
    dtype: str = "bfloat16",
    device: str = "auto",
    out: str | None = None,
) -> int:
    """Autotune the decoding kernels on this GPU and save the choices as its table: Triton's autotuner compiles and
    times every configuration of the matrix-vector and decoding-attention kernels for the shapes of a model
    (--model, or --shape with random weights) after prompts of each --tokens length (memories of those lengths).
    Minutes. The table goes to the cache directory (docs/cold-start.md; later runs on this GPU prefer it to the
    shipped tables and the rule) or to --out."""
    import torch

    from longllama.fast import tuning

    if model is not None and shape is not None:
        raise CliError("--model and --shape both given: tune one model's shapes (a folder, or a named shape)")
    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise CliError(f"tune times kernels on a CUDA GPU, and the device is {torch_device}: run it on a GPU machine")
    out_path = _output_file(out, "--out")
    tokens = tokens or [4096, 32768]
    if shape is not None:
        lm = _random_model(shape, getattr(torch, dtype), torch_device)
    else:
        lm = load_model(_model_folder(model), LoadOptions(dtype=dtype, device=str(torch_device)))
    lm.set_plan(autotune=True)
    name = torch.cuda.get_device_name(torch_device)
    generator = torch.Generator().manual_seed(0)
    for n in tokens:
        ids = torch.randint(3, lm.config.vocab_size, (1, n), generator=generator).to(torch_device)
        with torch.no_grad():
            lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        print(f"tuned decoding after {n} tokens", file=sys.stderr)
    choices = tuning.tuned_choices()
    path = tuning.write(out_path or tuning.file_for(name), name, choices)
    tuned = [e for e in timings.events() if e.kind == "tune"]
    print(
        f"{sum(len(c[1]) for c in choices.values())} kernel configurations tuned on {name} in "
        f"{sum(e.seconds for e in tuned):.1f} s; wrote {path}"
    )
    return 0


def _random_model(shape: str, dtype, device):
    """A model of a named shape with random weights (normal, std 0.02), built straight on `device` in `dtype`."""
    import torch

    from longllama.config import preset
    from longllama.lm import LongLlamaLM

    with torch.device("meta"):
        lm = LongLlamaLM(preset(shape))
    lm = lm.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.02)
    return lm


def _add_tune(commands) -> None:
    p = commands.add_parser(
        "tune", help="autotune the decoding kernels on this GPU and save its table (minutes)", description=tune.__doc__
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="DIR", help="a model folder (default: the shipped model)")
    which.add_argument("--shape", choices=TUNE_SHAPES, help="a named shape with random weights (e.g. 3b)")
    p.add_argument(
        "--tokens",
        type=_lengths,
        metavar="N,N,...",
        help="prompt lengths to decode after (memories of these lengths; default 4096,32768; k / m suffixes)",
    )
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N", help="tokens decoded per prompt (8)")
    p.add_argument("--dtype", choices=[d for d in DTYPES if d != "auto"], default="bfloat16", help="weights dtype")
    p.add_argument("--device", default="auto", metavar="{auto,cuda,cuda:N}", help="the GPU to tune on")
    p.add_argument("--out", metavar="FILE", help="write the table here instead of the cache directory")
    p.set_defaults(func=tune)


def _quiet_libraries() -> None:
    """Library warnings still reach stderr through logging; transformers' progress bars and notices do not."""
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the `longllama` command; returns the exit status (0, or 2 for usage and user errors)."""
    parser = build_parser()
    try:
        namespace, extra = parser.parse_known_args(argv)
        args = vars(namespace)
        if extra:  # only train / finetune take free-form --KEY VALUE settings
            if "overrides" not in args:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            try:
                args["overrides"] = (args["overrides"] or []) + _option_overrides(extra)
            except argparse.ArgumentError as exc:
                parser.error(exc.message)
    except SystemExit as exc:  # --help, or a usage error already printed: return its status instead of exiting
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Callable[..., int] = args.pop("func")
    args.pop("command")
    if args.pop("load_options", False):  # a model command: its loading options as one object
        args["load"] = LoadOptions.take(args)
    if args.pop("sweep_options", False):  # passkey, kv: lengths, trials and output files as one object
        args["sweep"] = SweepOptions.take(args)
    from longllama import caches

    caches.configure()  # before any library compiles: they read their cache folders then
    load = args.get("load")
    timings.record("setup", "interpreter and arguments", timings.since_start())
    if load is not None:  # a model command
        with timings.timed("setup", "libraries (torch, transformers)"):
            import longllama.config  # noqa: F401 - imports both
    args.pop("eval_task", None)
    _quiet_libraries()
    try:
        return command(**args)
    except (LongLlamaError, OSError, ImportError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        return _fail(_one_line(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            return _fail(
                f"out of memory ({_one_line(exc)[:200]}): try --dtype bfloat16, a smaller "
                "--last-context-length or --mem-attention-grouping 1,1024"
            )
        raise


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _broken_pipe() -> int:
    """stdout was closed by a reader (`| head`): stop quietly, as Unix tools do."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
    except (OSError, ValueError):
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
