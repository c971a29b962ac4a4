"""Weight-only quantization (quantize.py, torchao): the quantized weights against the rounding step they promise,
the model's logits against an fp32 model holding the same (dequantized) weights and against the unquantized one,
quantized checkpoints, generation, the plan's routing and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.config import preset
from longllama.errors import CheckpointError, InputError

pytest.importorskip("torchao")

from longllama import quantize  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny")).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


def _ids(n: int = 150) -> torch.Tensor:
    return torch.randint(0, 320, (2, n), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A quantized weight as fp32 values, read through its own product with the identity (every layout has the
    product)."""
    eye = torch.eye(weight.shape[1], dtype=weight.dtype)
    return torch.nn.functional.linear(eye, weight).float().T


def _dequantized_copy(quantized, folder):
    """An fp32 model whose linear weights are the quantized model's weights, dequantized: what the quantized model
    computes, in plain arithmetic."""
    plain = LongLlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quantize.quantized_linears(quantized, lm_head=True):
            weight = module.weight
            if quantize.is_quantized(weight):
                plain.get_submodule(name).weight.copy_(_dequantized(weight))
    return plain


def test_int8_weights_within_half_a_step(folder):
    """Each int8 weight is within half a quantization step of the original: the step is the row's largest
    magnitude / 127 (symmetric per-row int8)."""
    plain = LongLlamaForCausalLM.from_pretrained(folder)
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int8")
    names = [name for name, _ in quantize.quantized_linears(model)]
    assert names and "lm_head" not in names and not quantize.is_quantized(model.lm_head.weight)
    assert not quantize.is_quantized(model.model.embed_tokens.weight)
    for name in names:
        w = plain.get_submodule(name).weight.detach()
        q = model.get_submodule(name).weight
        assert quantize.is_quantized(q)
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((_dequantized(q) - w).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all(), name


def test_int8_logits(folder):
    ids = _ids()
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int8")
    assert model.config.quantization == "int8" and model.plan.weights == "int8"
    out = _logits(model, ids)
    # The quantized products are the products of the dequantized weights (activations stay fp32).
    same = _logits(_dequantized_copy(model, folder), ids)
    assert (out - same).abs().max() <= 1e-4 * same.abs().max()
    # Against the unquantized model: each weight moved by at most half a step (1/254 of its row's largest
    # magnitude); through 4 layers that moves the logits by a few times 1/254 of their scale, not more.
    ref = _logits(LongLlamaForCausalLM.from_pretrained(folder), ids)
    err = (out - ref).abs().max()
    assert 0 < err <= 8 / 254 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_weights_within_half_a_step(folder, dtype):
    """Each int4 weight is within half a step of the original (the step: its group's range / 15), plus the
    rounding of the dequantized value to the weight's dtype; every code 0..15 is a grid point of its group."""
    from longllama import int4

    plain = LongLlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int4", dtype=dtype)
    checked = 0
    for name, module in quantize.quantized_linears(model):
        q = module.weight
        parts = quantize.int4_parts(q)
        w = plain.get_submodule(name).weight.detach().float()
        if parts is None:  # the tiny model's 176-wide down_proj has no int4 group: it stays as it was
            assert name.endswith("down_proj") and torch.equal(q, plain.get_submodule(name).weight)
            continue
        qdata, scale, offset, group = parts
        assert qdata.dtype == torch.uint8 and qdata.shape == (w.shape[0], w.shape[1] // 2) and scale.dtype == dtype
        step = scale.float().repeat_interleave(group, dim=1)
        deq = int4.dequantize(qdata, scale, offset, group).float()
        ulp = deq.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-23)
        assert ((deq - w).abs() <= step / 2 * (1 + 1e-2) + ulp + 1e-7).all(), name
        assert torch.equal(_dequantized(q), deq)  # its product is the dequantized weight's
        checked += 1
    assert checked >= 6


def test_int4_logits(folder):
    """int4 in bf16 and fp32: the model's products are those of the dequantized weights."""
    ids = _ids(60)
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):  # bf16: a few steps of the logits' scale
        model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int4", dtype=dtype)
        assert model.plan.weights == "int4"
        out = _logits(model, ids)
        same = _logits(_dequantized_copy(model, folder), ids)
        assert (out - same).abs().max() <= bound * same.abs().max(), dtype
    ref = _logits(LongLlamaForCausalLM.from_pretrained(folder), ids)
    fp32 = _logits(LongLlamaForCausalLM.from_pretrained(folder, quantization="int4"), ids)
    assert 0 < (fp32 - ref).abs().max() <= 0.5 * ref.abs().max()  # 16 levels a group: coarse, not broken


def test_int4_save_load_round_trip(folder, tmp_path):
    """An int4 checkpoint (its own layout) written and read on this device: the same logits bit for bit, a
    quarter of the bytes for the quantized weights."""
    ids = _ids()
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int4")
    model.save_pretrained(tmp_path / "q")
    again = LongLlamaForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization == "int4"
    assert quantize.int4_parts(again.get_submodule("model.layers.1.self_attn.q_proj").weight) is not None
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size
    # a part missing or of the wrong shape is a one-line error, not a model with a hole
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = tmp_path / "q" / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    saved = load_file(str(file))
    name = "model.layers.0.self_attn.k_proj.weight"
    for damage in (lambda t: t.pop(f"{name}.offset"), lambda t: t.update({f"{name}.scale": t[f"{name}.scale"][:, 1:]})):
        tensors = dict(saved)
        damage(tensors)
        save_file(tensors, str(file), metadata=metadata)
        with pytest.raises(CheckpointError) as info:
            LongLlamaForCausalLM.from_pretrained(tmp_path / "q")
        assert "int4" in str(info.value) and "\n" not in str(info.value)


def test_save_load_round_trip(folder, tmp_path):
    ids = _ids()
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int8")
    model.save_pretrained(tmp_path / "q")
    again = LongLlamaForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization == "int8"
    assert quantize.is_quantized(again.get_submodule("model.layers.1.self_attn.q_proj").weight)
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    # the file holds int8 data: well under the fp32 model's
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.5 * (folder / "model.safetensors").stat().st_size


def test_generate(folder):
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int8")
    ids = _ids(90)[:1]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 96) and torch.equal(out[:, :90], ids)


def test_plan_records_what_the_weights_are(folder):
    model = LongLlamaForCausalLM.from_pretrained(folder, quantization="int8")
    assert model.plan.weights == "int8"
    dense = LongLlamaForCausalLM.from_pretrained(folder)
    assert dense.plan.weights == "dense"


@pytest.mark.parametrize(
    "case, hint",
    [
        (lambda f: LongLlamaForCausalLM.from_pretrained(f, quantization="int3"), "int3"),
        (lambda f: LongLlamaForCausalLM.from_pretrained(f).set_plan(weights="int8"), "quantize"),
        (
            lambda f: quantize.quantize_model(LongLlamaForCausalLM.from_pretrained(f, quantization="int8"), "int4"),
            "already quantized",
        ),
    ],
)
def test_errors(folder, case, hint):
    with pytest.raises(InputError) as info:
        case(folder)
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_cli_quantize(tmp_path, capsys, monkeypatch):
    """--quantize and --mem-dtype reach the model a command loads (generate here; every model command and eval task
    shares load_model)."""
    import shutil

    from longllama import cli
    from longllama.tokenizer import TOKENIZER_FILE, write_tokenizer_files

    code = cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--quantize", "int3"])
    assert code == 2 and "int3" in capsys.readouterr().err
    folder = tmp_path / "m"
    torch.manual_seed(0)
    LongLlamaForCausalLM(preset("tiny", vocab_size=8192)).save_pretrained(folder)
    shutil.copy(cli.SHIPPED_MODEL / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    write_tokenizer_files(folder)
    loaded = []
    real = cli.load_model

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(cli, "load_model", spy)
    argv = ["generate", "--model", str(folder), "--prompt", "river stone", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(argv + ["--quantize", "int8", "--mem-dtype", "int8"]) == 0
    model = loaded[-1]
    assert model.config.quantization == "int8" and model.config.mem_dtype == "int8"
    assert quantize.is_quantized(model.get_submodule("model.layers.0.mlp.up_proj").weight)
    assert cli.main(argv) == 0  # the options of one command do not leak into the next
    assert loaded[-1].config.quantization == "none" and loaded[-1].config.mem_dtype == "float32"
