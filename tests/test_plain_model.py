"""The plain-PyTorch model the command line runs (lm.LongLlamaLM) computes what transformers' LongLlamaForCausalLM
computes, with the same parameters; and a command-line process imports none of transformers' model machinery nor
Dynamo, while `import longllama` still lets transformers' Auto classes load a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.checkpoint import load_pretrained
from longllama.config import preset
from longllama.lm import LongLlamaLM

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "longllama" / "models" / "small"
HEAVY = ("transformers.modeling_utils", "torch._dynamo", "torch._inductor", "longllama.hf")


def _fresh_python(code: str) -> dict:
    """Run `code` in a new interpreter (so nothing this test process imported counts) and return the JSON it
    prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_plain_model_equals_the_transformers_model():
    reference = LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    model = load_pretrained(LongLlamaLM, SHIPPED, dtype=torch.float32, device="cpu")
    assert type(model) is LongLlamaLM and not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    ids = torch.randint(3, 1000, (2, 700))  # longer than the 512-token window: memory is written and read
    with torch.no_grad():
        want, got = reference(ids), model(ids)
        assert torch.equal(got.logits, want.logits)
        follow = torch.randint(3, 1000, (2, 5))
        assert torch.equal(model(follow, cache=got.cache).logits, reference(follow, cache=want.cache).logits)
    settings = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(3)
    want_tokens = reference.generate(ids[:, :300], **settings)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids[:, :300], **settings), want_tokens)


def test_the_plain_model_ties_its_head_where_the_config_does():
    model = LongLlamaLM(preset("tiny", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = LongLlamaLM(preset("tiny", tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_a_command_line_process_imports_no_transformers_model_nor_dynamo(tmp_path):
    code = f"""
import json, sys, torch
from longllama import cli
folder = cli._model_folder(None)
model = cli.load_model(folder, cli.LoadOptions(device="cpu"))
from longllama.tokenizer import encode_prompt, load_tokenizer
ids = torch.tensor([encode_prompt(load_tokenizer(folder), "The grass is green.")])
tokens = model.generate(ids, max_new_tokens=3)
print(json.dumps({{"class": type(model).__name__, "new": tokens.shape[1] - ids.shape[1],
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    got = _fresh_python(code)
    assert got == {"class": "LongLlamaLM", "new": 3, "loaded": []}


def test_the_command_line_parses_its_arguments_before_importing_torch():
    """`longllama --help` and argument errors come without the libraries' seconds of import."""
    code = """
import json, sys
from longllama import cli
parser = cli.build_parser()
parser.parse_known_args(["generate", "--prompt", "x", "--mem-retrieval", "blocks", "--quantize", "int4"])
print(json.dumps([m for m in ("torch", "transformers") if m in sys.modules]))
"""
    assert _fresh_python(code) == []


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_longllama_lets_the_auto_classes_load_a_checkpoint(transformers_first):
    """Registered with each Auto module as it is imported (registration.py), or at once where it already was."""
    first, then = "from transformers import AutoModelForCausalLM, AutoTokenizer", "import longllama"
    if not transformers_first:
        first, then = then, first
    code = f"""
import json, sys
{first}
light = "longllama.hf" not in sys.modules and "transformers.modeling_utils" not in sys.modules
{then}
from transformers import AutoConfig, AutoModelForSequenceClassification
config = AutoConfig.from_pretrained({str(SHIPPED)!r})
tokenizer = AutoTokenizer.from_pretrained({str(SHIPPED)!r})
model = AutoModelForCausalLM.from_pretrained({str(SHIPPED)!r})
scorer = AutoModelForSequenceClassification.from_pretrained({str(SHIPPED)!r}, num_labels=2)
print(json.dumps({{"light": light, "names": [type(x).__name__ for x in (config, tokenizer, model, scorer)]}}))
"""
    got = _fresh_python(code)
    assert got["names"] == [
        "LongLlamaConfig", "LongLlamaTokenizer", "LongLlamaForCausalLM", "LongLlamaForSequenceClassification"
    ]  # fmt: skip
    assert got["light"] or transformers_first  # import longllama alone brings no model machinery
