"""The training loop on one CPU process (longllama.training): the tiny configs learn, resume is exact, checkpoints are
atomic, the export loads with from_pretrained, gradient accumulation and activation checkpointing change nothing, a
transformers LLaMA folder (GQA) is a starting point, the settings and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from longllama import LongLlamaForCausalLM, cli
from longllama.training import checkpoints, logs, loop, parallel
from longllama.training.checkpoints import list_checkpoints
from longllama.training.config import ModelSettings, OptimSettings, TrainConfig, TrainError, load_config
from longllama.training.logs import read_log
from longllama.training.loop import Trainer, learning_rate
from longllama.training.tasks import sequence_mean_loss

REPO = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = REPO / "configs" / "tiny-pretrain.yaml"
TINY_FINETUNE = REPO / "configs" / "tiny-finetune.yaml"
TOKENIZER = REPO / "configs" / "data" / "tiny-tokenizer"


def tiny(out: Path, config: Path = TINY_PRETRAIN, **settings) -> TrainConfig:
    """A tiny config writing to `out`, quiet and short; settings use dotted names (`**{"data.batch_size": 8}`)."""
    base = {"out_dir": str(out), "progress": False, "eval_every": 0, "save_every": 0, "steps": 4}
    overrides = [f"{key}={json.dumps(value)}" for key, value in {**base, **settings}.items()]
    return load_config(config, overrides=overrides)


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r}


def comparable_log(out: Path) -> list[dict]:
    """Log records without the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(out / "log.jsonl")]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# -- learning ----------------------------------------------------------------------------------------------------------
def test_tiny_pretrain_loss_falls_in_seconds(tmp_path):
    result = loop.train(tiny(tmp_path / "run", steps=40, eval_every=20, **{"data.batch_size": 8}))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[0] == pytest.approx(math.log(320), abs=0.3)  # a fresh model guesses uniformly
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5
    assert result.eval_losses[40] < result.eval_losses[20] < math.log(320)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 41))
    assert {"lr", "tokens", "tokens_per_s", "grad_norm"} <= set(log[0])
    assert [r for r in log if "loss" in r][-1]["tokens"] == 40 * 8 * 32
    assert log[-1] == {"step": 40, "eval_loss": result.eval_losses[40]}


def test_tiny_finetune_loss_falls(tmp_path):
    result = loop.train(tiny(tmp_path / "run", TINY_FINETUNE, steps=30, eval_every=30, **{"data.batch_size": 8}))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert result.eval_losses[30] < losses[0]


# -- resume and checkpoints --------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def kill_at(step: int):
    def on_step(reached: int, record: dict) -> None:
        if reached == step:
            raise Killed

    return on_step


@pytest.mark.parametrize("config", [TINY_PRETRAIN, TINY_FINETUNE], ids=["pretrain", "finetune"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, config):
    settings = dict(steps=6, save_every=3, eval_every=3, eval_steps=1, **{"data.batch_size": 8})
    whole = loop.train(tiny(tmp_path / "whole", config, **settings))
    with pytest.raises(Killed):  # dies after step 5, two steps past its last checkpoint
        loop.train(tiny(tmp_path / "split", config, **settings), on_step=kill_at(5))
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-00000003"]
    resumed = loop.train(tiny(tmp_path / "split", config, resume=True, **settings))
    assert sorted(resumed.losses) == [4, 5, 6]
    assert comparable_log(tmp_path / "split") == comparable_log(tmp_path / "whole")  # bitwise: same floats
    assert [resumed.losses[s] for s in (4, 5, 6)] == [whole.losses[s] for s in (4, 5, 6)]
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "split" / "model")
    assert all(torch.equal(a[name], b[name]) for name in a)  # the exact state resumed, the same steps in one process


def test_time_limit_stops_saves_exports_and_resumes(tmp_path):
    out = tmp_path / "run"
    clock = iter(range(0, 10**6, 10))  # every look at the clock is 10 s later
    with mock.patch.object(loop.time, "monotonic", lambda: next(clock)):
        result = loop.train(tiny(out, steps=50, save_every=0, max_seconds=25))
    # The clock is read at the start (0 s) and every TIME_CHECK_EVERY steps, where a data state is kept: before
    # steps 0, 10 and 20 it says 10, 20 and 30 s, so the run stops after step 20.
    assert result.step == 2 * loop.TIME_CHECK_EVERY and (out / checkpoints.EXPORT_DIR).is_dir()
    assert [c.name for c in list_checkpoints(out)] == [f"step-{result.step:08d}"]
    assert any(r.get("stopped") == "max_seconds" for r in read_log(out / logs.LOG_FILE))
    resumed = loop.train(tiny(out, steps=50, save_every=0, resume=True))
    assert resumed.step == 50
    with pytest.raises(TrainError, match="max_seconds=0"):
        tiny(tmp_path / "x", max_seconds=0).check()


def test_existing_checkpoints_need_resume(tmp_path):
    loop.train(tiny(tmp_path / "run", steps=2, export=False))
    with pytest.raises(TrainError, match="--resume"):
        loop.train(tiny(tmp_path / "run", steps=2))
    # Resuming a finished run trains nothing more and still exports.
    result = loop.train(tiny(tmp_path / "run", steps=2, resume=True))
    assert result.losses == {} and (tmp_path / "run" / "model" / "config.json").is_file()


def test_failed_save_leaves_previous_checkpoint_and_no_partial_folder(tmp_path, monkeypatch):
    real_rng_state = checkpoints._rng_state
    calls = []

    def fail_second_save():
        calls.append(1)
        if len(calls) == 2:  # the model and optimiser files of step 4 are written by now
            raise OSError("disk full")
        return real_rng_state()

    monkeypatch.setattr(checkpoints, "_rng_state", fail_second_save)
    with pytest.raises(OSError, match="disk full"):
        loop.train(tiny(tmp_path / "run", steps=4, save_every=2))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    monkeypatch.setattr(checkpoints, "_rng_state", real_rng_state)
    # What a save killed outright leaves (a temporary folder, an incomplete step folder) is never resumed from.
    (root / ".step-00000004.deadbeef.tmp").mkdir()
    (root / "step-00000004").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    shutil.rmtree(root / "step-00000004")
    logged = train_losses(tmp_path / "run")
    resumed = loop.train(tiny(tmp_path / "run", steps=4, save_every=2, resume=True))
    assert resumed.losses == {3: logged[3], 4: logged[4]}
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]  # stale temp pruned


def test_keeps_only_the_last_checkpoints(tmp_path):
    loop.train(tiny(tmp_path / "run", steps=5, save_every=1, keep_checkpoints=2, export=False))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004", "step-00000005"]


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    result = loop.train(tiny(tmp_path / "run", steps=3))
    folder = tmp_path / "run" / "model"
    assert (folder / "tokenizer.model").read_bytes() == (TOKENIZER / "tokenizer.model").read_bytes()
    ids = torch.randint(3, 320, (2, 90), generator=torch.Generator().manual_seed(0))  # windows and memory
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(ids).logits
        for cls in (LongLlamaForCausalLM, AutoModelForCausalLM):
            loaded = cls.from_pretrained(folder).eval()
            assert type(loaded) is LongLlamaForCausalLM
            assert loaded.config.mem_layers == trained.config.mem_layers
            assert torch.equal(loaded(ids).logits, expected)  # the saved weights, the same code
    # The export is a starting point too; its tokenizer.model is found next to the weights.
    more = loop.train(
        tiny(tmp_path / "more", steps=1, **{"model.path": str(folder), "model.tokenizer": None, "model.preset": None})
    )
    assert more.model.config.mem_layers == trained.config.mem_layers and math.isfinite(more.losses[1])


# -- gradients: accumulation, cross-batch borders, activation checkpointing -------------------------------------------
def first_gradients(config: TrainConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first step (captured just before the optimiser would apply them)."""
    procs = parallel.start_processes(config)
    trainer = Trainer(config, procs)
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.step = capture
    loss, _, _ = trainer.train_step(lr=1e-3)
    return loss, captured


def assert_same_gradients(a: dict, b: dict, *, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=1e-5 if atol else 0, atol=atol, msg=name)


def test_grad_accumulation_without_cross_batch_gives_the_same_update(tmp_path):
    # No clipping: it would rescale both gradients to norm 1 and hide a wrong accumulation scale.
    no_cross = {"data.pipeline": "doc_aware", "data.cross_batch_range": 0, "data.batch_size": 8, "optim.clip": None}
    loss1, grads1 = first_gradients(tiny(tmp_path / "a", grad_accum=1, **no_cross))
    loss2, grads2 = first_gradients(tiny(tmp_path / "b", grad_accum=2, **no_cross))
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert_same_gradients(grads1, grads2, atol=1e-7)


def test_cross_batch_stays_inside_a_micro_batch(tmp_path):
    # docs/training.md#loss-optimiser-and-micro-batches: with micro-batches of 4 (two 2-packs), entry 3 of the batch
    # loses its negative (entry 1), so the
    # loss of the same data changes; the first micro-batch's entries are unchanged.
    cross = {"data.pipeline": "doc_aware_k2", "data.cross_batch_range": 2, "data.batch_size": 8}
    loss1, _ = first_gradients(tiny(tmp_path / "a", grad_accum=1, **cross))
    loss2, _ = first_gradients(tiny(tmp_path / "b", grad_accum=2, **cross))
    assert loss1 != pytest.approx(loss2, rel=1e-6)


def test_training_without_negatives_drops_only_the_other_streams(tmp_path):
    # k = 2, R = 2: entry 1 of each pack sees its own chunk 0 (positive) and, with negatives, the previous pack's
    # entry; without them that entry is gone, so the loss changes, while R = 1 (positives only anyway) does not.
    base = {"data.pipeline": "doc_aware_k2", "data.batch_size": 8}
    with_neg, _ = first_gradients(tiny(tmp_path / "a", **base, **{"data.cross_batch_range": 2}))
    without, _ = first_gradients(tiny(tmp_path / "b", **base, **{"data.cross_batch_range": 2, "data.negatives": False}))
    assert with_neg != pytest.approx(without, rel=1e-6)
    positives_only = [
        first_gradients(tiny(tmp_path / name, **base, **{"data.cross_batch_range": 1, "data.negatives": negatives}))[0]
        for name, negatives in (("c", True), ("d", False))
    ]
    assert positives_only[0] == pytest.approx(positives_only[1], rel=1e-7)


@pytest.mark.parametrize("config", [TINY_PRETRAIN, TINY_FINETUNE], ids=["pretrain", "finetune"])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, config):
    # Fine-tuning examples span a memory window, which appends to the layers' memory: the recomputation must
    # start from the state the first pass saw.
    plain = first_gradients(tiny(tmp_path / "a", config, **{"data.batch_size": 4}))
    recomputed = first_gradients(tiny(tmp_path / "b", config, activation_checkpointing=True, **{"data.batch_size": 4}))
    assert recomputed[0] == plain[0]
    assert_same_gradients(plain[1], recomputed[1])


def test_checkpoint_layers_recomputes_in_backward():
    from longllama.config import preset

    model = LongLlamaForCausalLM(preset("tiny"))
    calls = [0, 0]
    for idx, layer in enumerate(model.model.layers[:2]):
        original = layer.forward
        layer.forward = lambda *a, _i=idx, _f=original, **k: calls.__setitem__(_i, calls[_i] + 1) or _f(*a, **k)
    assert parallel.checkpoint_layers(model, every=2) == 2  # layers 0 and 2
    model(torch.randint(3, 320, (1, 20))).logits.sum().backward()  # one window
    assert calls == [2, 1]  # layer 0 ran again in the backward pass, layer 1 did not


# -- a transformers LLaMA folder as the starting point -----------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, model


def test_llama_folder_becomes_longllama_with_chosen_memory_layers(llama_folder):
    folder, llama = llama_folder
    model = checkpoints.build_model(ModelSettings(path=str(folder), mem_layers=[1])).eval()
    assert model.config.mem_layers == [1] and model.config.num_key_value_heads == 2
    ids = torch.randint(
        3, 320, (2, 20)
    )  # shorter than last_context_length (32): drop-in LLaMA (docs/invariants.md#1-short-inputs-equal-llama)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TrainError, match="mem_layers"):
        checkpoints.build_model(ModelSettings(path=str(folder)))


def test_training_starts_from_a_llama_folder(tmp_path, llama_folder):
    folder, _ = llama_folder
    config = tiny(
        tmp_path / "run",
        steps=2,
        **{"model.path": str(folder), "model.mem_layers": [1], "model.tokenizer": str(TOKENIZER), "data.batch_size": 4},
    )
    result = loop.train(config)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses.values())
    loaded = LongLlamaForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert loaded.config.mem_layers == [1] and loaded.config.num_key_value_heads == 2


# -- pieces ------------------------------------------------------------------------------------------------------------
def test_sequence_mean_loss_weighs_rows_equally():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.float32)
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    expected = (nll[0].mean() + nll[1, 4]) / 2
    torch.testing.assert_close(sequence_mean_loss(logits, targets, mask), expected)
    # A row without loss tokens counts as 0 (the reference divides by max(sum, 1e-10)).
    torch.testing.assert_close(
        sequence_mean_loss(logits, targets, mask * torch.tensor([[1.0], [0.0]])), nll[0].mean() / 2
    )


def test_learning_rate_schedules():
    cosine = OptimSettings(lr=1.0, end_lr=0.1, warmup_steps=4, decay_steps=14, schedule="cosine")
    assert [learning_rate(t, cosine, steps=99) for t in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, cosine, steps=99) == pytest.approx(0.55)
    assert learning_rate(14, cosine, steps=99) == pytest.approx(0.1) == learning_rate(50, cosine, steps=99)
    hf_cosine = OptimSettings(lr=2.0, warmup_steps=0, schedule="cosine")  # decays to 0 at the run's last step
    assert learning_rate(10, hf_cosine, steps=10) == pytest.approx(0.0)
    constant = OptimSettings(lr=2e-5, warmup_steps=2, schedule="constant")
    assert [learning_rate(t, constant, steps=9) for t in (0, 1, 2, 8)] == [0.0, 1e-5, 2e-5, 2e-5]


def test_config_files_overrides_and_errors(tmp_path):
    config = load_config(TINY_PRETRAIN, overrides=["optim.lr=2e-5", "model.mem_layers=[0, 2]", "steps=7"])
    assert config.optim.lr == 2e-5 and isinstance(config.optim.lr, float)  # YAML reads "2e-5" as text
    assert config.model.mem_layers == [0, 2] and config.steps == 7
    assert load_config(TINY_PRETRAIN, overrides=["data.eval=extra.jsonl"]).data.eval == ["extra.jsonl"]
    assert Path(config.data.train[0]) == REPO / "configs" / "data" / "tiny-pretrain.jsonl"  # relative to the file
    for bad, message in [
        ("data.seqlen=3", "unknown setting data.seqlen"),
        ("steps=0", "steps"),
        ("parallel=tp", "parallel"),
        ("steps=many", "steps"),
        ("nokey", "KEY=VALUE"),
    ]:
        with pytest.raises(TrainError, match=message):
            load_config(TINY_PRETRAIN, overrides=[bad])
    with pytest.raises(TrainError, match="multiple of 4"):
        loop.train(tiny(tmp_path / "r", grad_accum=2, **{"data.batch_size": 6}))


@pytest.mark.parametrize("name", ["tiny-pretrain", "tiny-finetune", "3b-fot", "3b-instruct"])
def test_shipped_configs_are_valid(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    if name == "3b-fot":  # the paper's recipe (docs/training.md#recipes-and-defaults)
        assert (config.data.pipeline, config.data.cross_batch_range, config.data.seq_len) == ("doc_aware_k4", 3, 2048)
        assert (config.optim.schedule, config.optim.lr, config.optim.weight_decay) == ("constant", 2e-5, 0.01)
        assert config.data.batch_size * config.data.seq_len == 256 * 1024
    if name == "3b-instruct":  # example_instchat_ft_3bv1.1 (docs/finetuning.md#released-recipes)
        assert (config.steps, config.data.batch_size, config.grad_accum, config.optim.warmup_steps) == (
            4000,
            64,
            16,
            200,
        )
        assert (config.data.last_context_length, config.data.max_total_length) == (1024, 2048)


def test_loss_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    loop.train(tiny(tmp_path / "run", steps=3, export=False))
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_micro_batch_without_labels_has_zero_loss_not_nan(tmp_path):
    config = tiny(tmp_path / "run", TINY_FINETUNE, **{"data.batch_size": 2})
    trainer = Trainer(config, parallel.start_processes(config))
    batch = next(trainer.task.batches)
    batch["labels"].fill_(-100)  # every answer truncated away
    loss = trainer.task.loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters())


# -- command line
# -------------------------------------------------------------------------------------------------------
def test_cli_train_and_finetune(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(
        [
            "train",
            str(TINY_PRETRAIN),
            "--set",
            "steps=3",
            "--set",
            f"out_dir={out}",
            "--progress",
            "false",
            "--eval_every=0",
        ]
    )
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in (out / "model").iterdir()}
    assert len(train_losses(out)) == 3
    assert "model in" in capsys.readouterr().out
    rows = REPO / "configs" / "data" / "tiny-instruct.jsonl"
    code = cli.main(
        [
            "finetune",
            str(TINY_PRETRAIN),
            "--set",
            "steps=2",
            "--set",
            f"out_dir={tmp_path / 'ft'}",
            "--progress",
            "false",
            "--data.batch_size",
            "4",
            "--data.train",
            f"[{rows}]",
            "--mode",
            "pretrain",
        ]
    )  # finetune forces mode finetune
    assert code == 0
    saved = json.loads((list_checkpoints(tmp_path / "ft")[-1] / "trainer_state.json").read_text())
    assert saved["config"]["mode"] == "finetune"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["train", str(TINY_PRETRAIN), "--set", "data.seqlen=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longllama: error: unknown setting data.seqlen") and "\n" not in err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "x", "--prompt", "y", "--steps", "3"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
