"""The training loop: optimiser and learning rate, micro-batches, steps, evaluation, saving and the run itself."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longllama.training.checkpoints import (
    ADAPTER_DIR,
    EXPORT_DIR,
    build_model,
    export_adapter,
    export_model,
    list_checkpoints,
    load_checkpoint,
    load_training_tokenizer,
    save_checkpoint,
    tokenizer_file,
)
from longllama.training.config import OptimSettings, TrainConfig, TrainError
from longllama.training.logs import LOG_FILE, PLOT_FILE, RunLog, plot_losses
from longllama.training.lora import apply_lora, is_peft, merged, require_peft
from longllama.training.parallel import (
    Processes,
    checkpoint_layers,
    compile_layers,
    parallelize,
    start_processes,
    stop_processes,
    sync_context,
)
from longllama.training.tasks import Batch, FinetuneTask, PretrainTask

logger = logging.getLogger(__name__)

TIME_CHECK_EVERY = 10  # steps between looks at the clock under max_seconds (each needs a saved data state)


def learning_rate(update: int, optim: OptimSettings, *, steps: int) -> float:
    """The learning rate of update number `update` (0 for the first): linear warm-up from 0 over warmup_steps, then
    cosine from lr to end_lr at decay_steps (end_lr after), or constant lr
    (docs/training.md#loss-optimiser-and-micro-batches, D.3)."""
    if update < optim.warmup_steps:
        return optim.lr * update / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay = optim.decay_steps if optim.decay_steps is not None else steps
    progress = min((update - optim.warmup_steps) / max(1, decay - optim.warmup_steps), 1.0)
    return optim.end_lr + (optim.lr - optim.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim: OptimSettings) -> torch.optim.Optimizer:
    # One group: the reference decays every parameter, norms and embeddings included
    # (docs/training.md#loss-optimiser-and-micro-batches); frozen ones (LoRA's base model) have no state.
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim.lr,
        betas=(optim.b1, optim.b2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`parts` contiguous slices of the batch rows (micro-batches: cross-batch never crosses their borders)."""
    size = next(iter(batch.values())).shape[0]
    step = size // parts
    return [{name: value[i * step : (i + 1) * step] for name, value in batch.items()} for i in range(parts)]


def _device_batch(batch: Batch, device: torch.device) -> Batch:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


@dataclass
class TrainResult:
    step: int  # the last step reached
    losses: dict[int, float]  # training loss of each step run in this call
    eval_losses: dict[int, float]
    export_dir: Path | None
    model: nn.Module  # the trained model (wrapped by DDP/FSDP when parallel)
    main: bool  # rank 0


class Trainer:
    """One training run: model, optimiser, task and the step / evaluate / save / export cycle."""

    def __init__(self, config: TrainConfig, procs: Processes) -> None:
        self.config, self.procs = config, procs
        self.out_dir = Path(config.out_dir)
        self.parts = procs.world * config.grad_accum
        _seed_everything(config.seed)
        self.tokenizer = load_training_tokenizer(config.model)
        self.task = self._task()
        self.task.check_split(self.parts)
        self.model = self._model()
        self.optimizer = make_optimizer(self.model, config.optim)
        self.step = 0
        self.tokens_seen = 0
        self._autocast = _autocast_dtype(config.autocast, procs.device)
        if procs.device.type == "cuda" and config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _task(self) -> PretrainTask | FinetuneTask:
        if self.config.mode == "pretrain":
            from longllama.training.data.pretrain import Prefetcher

            task = PretrainTask(self.config, self.tokenizer)
            # The next batches are made while the GPU runs this step; states only where a checkpoint may be saved.
            task.batches = Prefetcher(task.batches, state_at=self._saves_after, pin=self.procs.device.type == "cuda")
            return task
        size = self.config.data.batch_size // self.procs.world
        rows = (self.procs.rank * size, (self.procs.rank + 1) * size)
        return FinetuneTask(self.config, self.tokenizer, rank_rows=rows)

    def _model(self) -> nn.Module:
        config = self.config
        model = build_model(config.model)
        _check_vocab(model, self.tokenizer)
        model.to(self.procs.device).train()
        if config.activation_checkpointing:
            checkpoint_layers(model, every=model.config.gradient_checkpoint_every_ith)
        if config.compile:
            compile_layers(model)
        if config.lora.enabled:  # after the layer wrappers, which reach the layers through the plain model
            model = apply_lora(model, config.lora, config.model)
        return parallelize(model, config.parallel, self.procs)

    def _saves_after(self, step: int) -> bool:
        every = self.config.save_every
        # A run with a time limit may stop (and save) at every TIME_CHECK_EVERY-th step.
        timed = self.config.max_seconds is not None and step % TIME_CHECK_EVERY == 0
        return timed or bool(every and step % every == 0) or step >= self.config.steps

    # -- state ---------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint `config.resume` names (true: the newest), if there is one."""
        resume = self.config.resume
        existing = list_checkpoints(self.out_dir)
        if resume is False:
            if existing:
                raise TrainError(
                    f"{self.out_dir} already has checkpoints (newest {existing[-1].name}): pass "
                    "--resume to continue, or choose another out_dir"
                )
            return
        folder = Path(resume) if isinstance(resume, str) else (existing[-1] if existing else None)
        if folder is None:
            logger.info("no checkpoint in %s: starting from step 0", self.out_dir)
            return
        state = load_checkpoint(folder, model=self.model, optimizer=self.optimizer, procs=self.procs)
        self.task.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens", 0))
        if hasattr(self.task.batches, "set_position"):
            self.task.batches.set_position(self.step)
        logger.info("resumed from %s at step %d", folder, self.step)

    def save(self) -> Path:
        state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "data": self.task.batches.state_dict(),
            "world": self.procs.world,
            "config": dataclasses.asdict(self.config),
        }
        return save_checkpoint(
            self.out_dir,
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=state,
            procs=self.procs,
            keep=self.config.keep_checkpoints,
        )

    # -- steps ---------------------------------------------------------------------------------------------------
    def _rank_micro_batches(self, batch: Batch) -> list[Batch]:
        """This rank's contiguous group of micro-batches of a global batch (already sliced for fine-tuning)."""
        accum = self.config.grad_accum
        if self.config.mode == "pretrain":
            groups = split_batch(batch, self.procs.world)
            batch = groups[self.procs.rank]
        return [_device_batch(part, self.procs.device) for part in split_batch(batch, accum)]

    def _autocast_context(self) -> contextlib.AbstractContextManager:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.procs.device.type, dtype=self._autocast)

    def train_step(self, lr: float) -> tuple[float, float, int]:
        """One optimiser step over the next global batch; returns (mean loss, gradient norm, tokens in the batch)."""
        micro = self._rank_micro_batches(next(self.task.batches))
        total = torch.zeros((), dtype=torch.float64, device=self.procs.device)
        for index, batch in enumerate(micro):
            with sync_context(self.model, self.config.parallel, index == len(micro) - 1):
                with self._autocast_context():
                    loss = self.task.loss(self.model, batch)
                # Mean over micro-batches here, over ranks in the gradient all-reduce (optax.MultiSteps, DDP).
                (loss / len(micro)).backward()
            total += loss.detach()
        norm = _clip(self.model, self.config.optim.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b["input_ids"].numel() for b in micro) * self.procs.world
        return self.procs.mean(float(total) / len(micro)), norm, tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first eval_steps eval batches (this rank's share of each, then averaged over ranks)."""
        losses = []
        for batch in self.task.eval_batches(self.config.eval_steps):
            batch = split_batch(batch, self.procs.world)[self.procs.rank]
            for part in split_batch(batch, self.config.grad_accum):
                with self._autocast_context():
                    losses.append(
                        float(self.task.loss(self.model, _device_batch(part, self.procs.device), evaluate=True))
                    )
        if not losses:
            return None
        return self.procs.mean(sum(losses) / len(losses))

    def fit(self, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
        config = self.config
        log = RunLog(
            self.out_dir / LOG_FILE,
            start_step=self.step,
            total=config.steps,
            enabled=self.procs.main,
            progress=config.progress,
        )
        losses: dict[int, float] = {}
        evals: dict[int, float] = {}
        last_saved = self.step if self.step else None
        started = time.monotonic()
        try:
            while self.step < config.steps:
                at_check = self.step % TIME_CHECK_EVERY == 0
                if config.max_seconds is not None and at_check and self._out_of_time(started):
                    logger.warning(
                        "max_seconds=%s reached: stopping at step %d of %d", config.max_seconds, self.step, config.steps
                    )
                    log.write({"step": self.step, "stopped": "max_seconds"})
                    break
                record = self._one_step()
                losses[self.step] = record["loss"]
                if self.step % config.log_every == 0 or self.step == config.steps:
                    log.write(record)
                log.advance(record)
                if config.eval_every and self.step % config.eval_every == 0:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        evals[self.step] = eval_loss
                        log.write({"step": self.step, "eval_loss": eval_loss})
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
                    last_saved = self.step
                if on_step is not None:
                    on_step(self.step, record)
            if last_saved != self.step:
                self.save()
        finally:
            log.close()
            if hasattr(self.task.batches, "close"):
                self.task.batches.close()
        return self._finish(losses, evals)

    def _out_of_time(self, started: float) -> bool:
        # Every rank must stop at the same step: rank 0's clock decides.
        return bool(self.procs.broadcast(time.monotonic() - started >= self.config.max_seconds))

    def _one_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        lr = learning_rate(self.step, self.config.optim, steps=self.config.steps)
        loss, norm, tokens = self.train_step(lr)
        self.step += 1
        self.tokens_seen += tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens / elapsed,
        }

    def _export(self) -> Path:
        """The trained model as a from_pretrained folder; with LoRA, merged into the weights (the run's model becomes
        the merged one) or as a peft adapter folder, as lora.export says."""
        tokenizer = tokenizer_file(self.config.model)
        if not is_peft(self.model):
            return export_model(self.model, self.out_dir / EXPORT_DIR, procs=self.procs, tokenizer=tokenizer)
        if self.config.lora.export == "adapter":
            return export_adapter(self.model, self.out_dir / ADAPTER_DIR, procs=self.procs, tokenizer=tokenizer)
        self.model = merged(self.model)
        return export_model(self.model, self.out_dir / EXPORT_DIR, procs=self.procs, tokenizer=tokenizer)

    def _finish(self, losses: dict[int, float], evals: dict[int, float]) -> TrainResult:
        export_dir = None
        if self.config.export:
            export_dir = self._export()
        if self.procs.main and (self.out_dir / LOG_FILE).is_file():
            plot_losses(self.out_dir / LOG_FILE, self.out_dir / PLOT_FILE)
        return TrainResult(
            step=self.step,
            losses=losses,
            eval_losses=evals,
            export_dir=export_dir,
            model=self.model,
            main=self.procs.main,
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _check_vocab(model: nn.Module, tokenizer: Any) -> None:
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise TrainError(
            f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.vocab_size}:"
            " use the model's own tokenizer"
        )


def _clip(model: nn.Module, clip: float | None) -> float:
    """Clip the global gradient norm (over all shards) to `clip`; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train(config: TrainConfig, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run `config` (resuming if asked), export the model and plot the loss. `on_step(step, record)` is called after
    every step (tests use it to stop a run midway)."""
    config.check()
    if config.lora.enabled:
        require_peft()  # before any process group or model exists
    procs = start_processes(config)
    try:
        trainer = Trainer(config, procs)
        trainer.resume()
        return trainer.fit(on_step=on_step)
    finally:
        stop_processes(procs)
