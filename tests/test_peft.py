"""peft and transformers' training hooks on LongLLaMA: LoRA with task_type CAUSAL_LM (a training step through memory,
save, reload, merge, generate), gradient_checkpointing_enable, prepare_inputs_for_generation, and `longllama finetune
--lora` with its merged and adapter exports, checkpoints and resume."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from longllama import LongLlamaForCausalLM, cli  # noqa: E402
from longllama.config import preset  # noqa: E402
from longllama.training import loop  # noqa: E402
from longllama.training.checkpoints import list_checkpoints  # noqa: E402
from longllama.training.config import TrainError, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_FINETUNE = REPO / "configs" / "tiny-finetune.yaml"
TOKENIZER = REPO / "configs" / "data" / "tiny-tokenizer" / "tokenizer.model"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    # transformers 5.24 renames gradient checkpointing to activation checkpointing; the old names still work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny fp32 LongLLaMA folder (window 64, last_context_length 24, memory layers 1 and 3) with a tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    LongLlamaForCausalLM(preset("tiny")).save_pretrained(folder)
    shutil.copy2(TOKENIZER, folder / "tokenizer.model")
    return folder


def load_base(folder: Path) -> LongLlamaForCausalLM:
    return LongLlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def long_input(batch: int = 2, n: int = 150, seed: int = 1) -> torch.Tensor:
    """Longer than the 64-token window: two memory windows, then the final 22 tokens."""
    return torch.randint(3, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


def lora_config(**options) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **options)


# -- peft round trip -----------------------------------------------------------------------------------------------
def test_lora_causal_lm_trains_through_memory_saves_reloads_merges_and_generates(base_folder, tmp_path):
    model = get_peft_model(load_base(base_folder), lora_config(task_type="CAUSAL_LM")).train()
    ids = long_input()
    labels = torch.full_like(ids, -100)
    labels[:, -20:] = ids[:, -20:]  # loss on the final window only: earlier tokens reach it only through memory
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    assert embeds.grad[:, :64].abs().sum() > 0  # gradients flow into the memory written by the first window
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    assert all(torch.equal(base_before[n], p) for n, p in model.named_parameters() if not p.requires_grad)

    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base_logits = load_base(base_folder)(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # the step changed the model
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and Path(saved["base_model_name_or_path"]) == base_folder

    for reloaded in (
        PeftModel.from_pretrained(load_base(base_folder), tmp_path / "adapter"),
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter"),  # the base through AutoModelForCausalLM
    ):
        assert isinstance(reloaded.get_base_model(), LongLlamaForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)

    prompt = ids[:, :100]  # a prompt longer than the window: generation starts with memory
    unmerged_tokens = model.generate(input_ids=prompt, max_new_tokens=6)
    merged = model.merge_and_unload()
    assert type(merged) is LongLlamaForCausalLM
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(prompt, max_new_tokens=6), unmerged_tokens)


def test_adapter_without_task_type_loads_with_longllama_in_the_import_allowlist(base_folder, tmp_path):
    model = get_peft_model(load_base(base_folder), lora_config(init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LongLlamaForCausalLM", "parent_library": "longllama.hf"}
    with pytest.raises(ValueError, match="import allowlist"):  # peft imports only allowed packages by default
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["longllama"])
    ids = long_input(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


# -- prepare_inputs_for_generation -------------------------------------------------------------------------------
def test_prepare_inputs_for_generation_steps_equal_generate(base_folder):
    """A transformers-style greedy loop (prepare_inputs_for_generation, forward, the returned cache) gives the tokens
    of our generate, for a left-padded batch whose prompt is longer than the window."""
    model = load_base(base_folder).eval()
    ids = long_input(n=90, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    seq, past = ids, None
    with torch.no_grad():
        for _ in range(8):
            inputs = model.prepare_inputs_for_generation(seq, past_key_values=past, attention_mask=mask, use_cache=True)
            assert inputs["input_ids"].shape[1] == (seq.shape[1] if past is None else 1)
            out = model(**inputs)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    assert torch.equal(seq, want)


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def count_layer_calls(model: LongLlamaForCausalLM) -> list[int]:
    calls = [0] * len(model.model.layers)
    for idx, layer in enumerate(model.model.layers):
        original = layer.forward
        layer.forward = lambda *a, _i=idx, _f=original, **k: calls.__setitem__(_i, calls[_i] + 1) or _f(*a, **k)
    return calls


def gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_enable_recomputes_layers_with_the_same_gradients(every):
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", gradient_checkpoint_every_ith=every)).train()
    ids = long_input()  # memory layers append inside checkpointed layers
    calls = count_layer_calls(model)
    plain = gradients(model, ids)
    assert calls == [3] * 4  # three windows, each layer once per window
    calls[:] = [0] * 4
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    recomputed = gradients(model, ids)
    assert calls == [6 if i % every == 0 else 3 for i in range(4)]  # the chosen layers ran again in backward
    assert_same_gradients(plain, recomputed)
    model.gradient_checkpointing_disable()
    calls[:] = [0] * 4
    assert_same_gradients(plain, gradients(model, ids))
    assert calls == [3] * 4
    with torch.no_grad():  # inference never recomputes
        model.gradient_checkpointing_enable()
        model(input_ids=ids)
    assert calls == [6] * 4


def test_gradient_checkpointing_refuses_reentrant_checkpoints():
    model = LongLlamaForCausalLM(preset("tiny")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(Exception, match="use_reentrant"):
        gradients(model, long_input())


def test_gradient_checkpointing_under_lora_gives_the_same_adapter_gradients(base_folder):
    model = get_peft_model(load_base(base_folder), lora_config(task_type="CAUSAL_LM", init_lora_weights=False))
    model.train()
    ids = long_input()
    plain = gradients(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_gradients(plain, gradients(model, ids))


# -- longllama finetune --lora -------------------------------------------------------------------------------------
def finetune_args(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        str(TINY_FINETUNE),
        "--lora",
        "--set",
        f"model.path={base}",
        "--set",
        f"out_dir={out}",
        "--progress",
        "false",
        "--eval_every",
        "0",
        "--data.batch_size",
        "4",
        "--grad_accum",
        "1",
        "--optim.warmup_steps",
        "0",
        "--lora.rank",
        "4",
        "--lora.targets",
        json.dumps(TARGETS),
        *extra,
    ]


def test_cli_finetune_lora_exports_merged_and_adapter_folders_that_generate(base_folder, tmp_path, capsys):
    assert cli.main(finetune_args(base_folder, tmp_path / "m", "--steps", "3", "--lora.export", "merged")) == 0
    assert cli.main(finetune_args(base_folder, tmp_path / "a", "--steps", "3", "--lora.export", "adapter")) == 0
    merged_dir, adapter_dir = tmp_path / "m" / "model", tmp_path / "a" / "adapter"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in merged_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    capsys.readouterr()

    merged = LongLlamaForCausalLM.from_pretrained(merged_dir).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    base = load_base(base_folder)
    ids = long_input(batch=1)
    with torch.no_grad():
        # Both runs trained the same steps: the merged folder is the base plus the adapter.
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in TARGETS for n in changed)  # only the adapted projections
    assert torch.equal(adapter.generate(input_ids=ids, max_new_tokens=5), merged.generate(ids, max_new_tokens=5))

    code = cli.main(["generate", "--model", str(merged_dir), "--prompt", "the ledger", "--max-new-tokens", "5"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(base_folder, tmp_path):
    def config(out: Path, **settings):
        base = {"lora.enabled": True, "lora.rank": 4, "lora.dropout": 0.1, "model.path": str(base_folder)}
        base |= {"out_dir": str(out), "progress": False, "eval_every": 0, "steps": 4, "save_every": 2}
        base |= {"data.batch_size": 4, "grad_accum": 1, "lora.export": "adapter", **settings}
        return load_config(TINY_FINETUNE, overrides=[f"{k}={json.dumps(v)}" for k, v in base.items()])

    whole = loop.train(config(tmp_path / "whole"))

    def kill(step, record):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        loop.train(config(tmp_path / "split"), on_step=kill)
    resumed = loop.train(config(tmp_path / "split", resume=True))
    assert [resumed.losses[s] for s in (3, 4)] == [whole.losses[s] for s in (3, 4)]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint holds the adapters and their optimiser state, not the frozen base model.
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(list_checkpoints(tmp_path / "whole")[-1]).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights)


def test_lora_setting_errors_are_one_line(base_folder, tmp_path, capsys, monkeypatch):
    def run(*extra: str) -> str:
        assert cli.main(finetune_args(base_folder, tmp_path / "e", "--steps", "1", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("longllama: error: ") and "\n" not in err
        return err

    assert "lora.rank" in run("--lora.rank", "0")
    assert "q_projj" in run("--lora.targets", "[q_projj]")
    preset_adapter = ["--set", "model.path=null", "--lora.export", "adapter"]
    assert "set model.path" in run(*preset_adapter)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    assert "pip install 'longllama[lora]'" in run()
    with pytest.raises(TrainError, match="fsdp2"):
        load_config(TINY_FINETUNE, overrides=["lora.enabled=true", "parallel=fsdp2"])


def test_lora_pretraining_with_cross_batch_memory(tmp_path):
    """FoT pre-training (cross-batch memory) with LoRA: the adapters start as a no-op, so the first loss is the full
    model's; activation checkpointing changes no loss."""

    def run(out: str, **settings) -> dict[int, float]:
        base = {"out_dir": str(tmp_path / out), "progress": False, "eval_every": 0, "steps": 3, "data.batch_size": 8}
        overrides = [f"{k}={json.dumps(v)}" for k, v in {**base, **settings}.items()]
        return loop.train(load_config(REPO / "configs" / "tiny-pretrain.yaml", overrides=overrides)).losses

    full = run("full")
    lora = run("lora", **{"lora.enabled": True, "lora.rank": 4})
    recomputed = run("ckpt", activation_checkpointing=True, **{"lora.enabled": True, "lora.rank": 4})
    assert lora[1] == pytest.approx(full[1], rel=1e-6)
    assert lora[3] != pytest.approx(full[3], rel=1e-3)  # then only the adapters learn
    assert recomputed == pytest.approx(lora, rel=1e-6)


def test_transformers_trainer_with_activation_checkpointing(tmp_path):
    """transformers' Trainer turns gradient checkpointing on through the model's API; the losses do not change."""
    import inspect

    from transformers import Trainer, TrainingArguments

    names = inspect.signature(TrainingArguments).parameters
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    rows = [{"input_ids": r, "labels": r} for r in long_input(batch=4, seed=5)]

    def losses(checkpointing: bool) -> tuple[list[float], LongLlamaForCausalLM]:
        torch.manual_seed(0)
        model = get_peft_model(LongLlamaForCausalLM(preset("tiny")), lora_config(task_type="CAUSAL_LM"))
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            per_device_train_batch_size=2,
            max_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            **{flag: checkpointing, f"{flag}_kwargs": {"use_reentrant": False}},
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r], model.get_base_model()

    plain, _ = losses(False)
    recomputed, model = losses(True)
    assert model.model.gradient_checkpointing
    assert len(plain) == 2 and recomputed == pytest.approx(plain, rel=1e-6)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_lora_ddp_two_processes_equal_one_process(tmp_path):
    """Cross-batch pre-training with LoRA under DDP (torchrun, 2 CPU processes) takes the steps of one process with
    gradient accumulation over the same micro-batches; the merged exports agree."""
    from test_train_distributed import assert_same_run, single_process, torchrun

    lora = {"lora.enabled": True, "lora.rank": 4, "eval_every": 0}
    single_process(tmp_path / "single", **lora)
    torchrun(tmp_path / "ddp", "ddp", **lora)
    assert_same_run(tmp_path / "single", tmp_path / "ddp", atol=1e-6)
