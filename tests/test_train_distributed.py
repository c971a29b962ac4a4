"""Two processes on the CPU (torchrun, gloo): DDP and FSDP2 runs give the losses and weights of one process that
takes the same micro-batches through gradient accumulation, and a sharded (FSDP2) checkpoint resumes under torchrun,
resumes in one process (resharded) and exports a from_pretrained folder.

One process with grad_accum 2 over a global batch processes micro-batches [0, B/2) and [B/2, B); two ranks with
grad_accum 1 take the same rows (rank r: [r B/2, (r+1) B/2)), so the losses and updates must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.training import loop
from longllama.training.checkpoints import list_checkpoints
from longllama.training.config import load_config
from longllama.training.logs import read_log

REPO = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = REPO / "configs" / "tiny-pretrain.yaml"
TINY_FINETUNE = REPO / "configs" / "tiny-finetune.yaml"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

# Steps 1-4, checkpoints at 2 and 4, evaluation at 2 and 4 (which runs on both ranks too).
SETTINGS = {"steps": 4, "save_every": 2, "eval_every": 2, "eval_steps": 1, "progress": False, "data.batch_size": 8}


def overrides(out: Path, **settings) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in {**SETTINGS, "out_dir": str(out), **settings}.items()]


def single_process(out: Path, config: Path = TINY_PRETRAIN, **settings) -> loop.TrainResult:
    # One thread, as torchrun gives each rank: CPU reductions then add in the same order as in the ranks.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loop.train(load_config(config, overrides=overrides(out, grad_accum=2, **settings)))
    finally:
        torch.set_num_threads(threads)


def torchrun(
    out: Path, parallel: str, *extra: str, config: Path = TINY_PRETRAIN, module: str = "longllama.cli", **settings
) -> None:
    """2 processes through torch's own launcher, on a free port (--standalone)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        module,
        *(["train"] if module == "longllama.cli" else []),
        str(config),
        *extra,
    ]
    for item in overrides(out, parallel=parallel, grad_accum=1, **settings):
        command += ["--set", item]
    # One thread per rank, MKL's too (torch.set_num_threads(1) sets both in single_process): an inherited
    # MKL_NUM_THREADS=2 made the ranks' products sum in another order (gradients off by an fp32 step).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(out / "log.jsonl")]


def assert_same_run(a: Path, b: Path, *, atol: float = 1e-6) -> None:
    """Same steps, losses, eval losses, learning rates (and gradient norms) in the logs, and the same exported
    weights, up to `atol` (fp32 rounding of a different reduction order)."""
    ra, rb = records(a), records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=atol, rel=0), (key, x, y)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    single_process(root / "single")
    return root


def test_ddp_two_processes_equal_one_process(runs):
    torchrun(runs / "ddp", "ddp", module="longllama.training")  # the training package's own torchrun entry
    assert_same_run(runs / "single", runs / "ddp", atol=0.0)  # same sums in the same order: bitwise


def test_fsdp2_two_processes_equal_one_process_and_checkpoint_is_sharded(runs):
    torchrun(runs / "fsdp2", "fsdp2")
    assert_same_run(runs / "single", runs / "fsdp2")
    step4 = runs / "fsdp2" / "checkpoints" / "step-00000004"
    names = {p.name for p in step4.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt", ".metadata", "trainer_state.json"} <= names
    assert json.loads((step4 / "trainer_state.json").read_text())["world"] == 2
    model = LongLlamaForCausalLM.from_pretrained(runs / "fsdp2" / "model")
    assert model.config.mem_layers == [1, 3]


def test_fsdp2_with_the_fused_cross_batch_path_equals_one_process(tmp_path):
    # attn_impl "fast": memory layers take attention.joint_attention (a custom autograd function) under FSDP2.
    fused = {"model.overrides": {"attn_impl": "fast"}}
    single_process(tmp_path / "single", **fused)
    torchrun(tmp_path / "fsdp2", "fsdp2", **fused)
    assert_same_run(tmp_path / "single", tmp_path / "fsdp2")
    assert LongLlamaForCausalLM.from_pretrained(tmp_path / "fsdp2" / "model").config.attn_impl == "fast"


def restart_from_step_2(finished: Path, copy: Path) -> None:
    """What a run killed after its step-2 checkpoint leaves behind."""
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "model")
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    assert [p.name for p in list_checkpoints(copy)] == ["step-00000002"]


def test_fsdp2_checkpoint_resumes_under_torchrun_and_in_one_process(runs):
    if not (runs / "fsdp2" / "model").is_dir():
        torchrun(runs / "fsdp2", "fsdp2")
    restart_from_step_2(runs / "fsdp2", runs / "fsdp2-resumed")
    torchrun(runs / "fsdp2-resumed", "fsdp2", "--resume")
    assert_same_run(runs / "fsdp2", runs / "fsdp2-resumed", atol=0.0)
    # The same sharded checkpoint, loaded by one process (resharded by torch.distributed.checkpoint).
    restart_from_step_2(runs / "fsdp2", runs / "one-resumed")
    single_process(runs / "one-resumed", resume=True)
    assert_same_run(runs / "fsdp2", runs / "one-resumed")


def test_ddp_finetune_two_processes_equal_one_process(tmp_path):
    single_process(tmp_path / "single", TINY_FINETUNE)
    torchrun(tmp_path / "ddp", "ddp", config=TINY_FINETUNE)
    assert_same_run(tmp_path / "single", tmp_path / "ddp", atol=0.0)
