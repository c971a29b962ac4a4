"""Processes and what is applied from outside the model: DDP, FSDP2, activation checkpointing, compile."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longllama.recompute import wrap_layers
from longllama.training.config import TrainConfig, TrainError


def checkpoint_layers(model: nn.Module, *, every: int = 1) -> int:
    """Recompute decoder layers idx % every == 0 in the backward pass instead of keeping their activations
    (recompute.py: the recomputation starts from the layer's state before the first pass).

    The layer's forward is wrapped on the instance, so the model code is untouched and FSDP/DDP hooks still run.
    Returns the number of layers wrapped."""
    return wrap_layers(_decoder_layers(model), every=every)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "module", model)  # DDP
    return inner.model.layers


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (parameter names stay as they are, unlike torch.compile(model))."""
    for layer in _decoder_layers(model):
        layer.compile()


@dataclass
class Processes:
    """This process's place in the run: rank, world size, device (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (for logged numbers)."""
        if not self.distributed or self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item() / self.world)

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start_processes(config: TrainConfig) -> Processes:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA), or make a group of one for ddp/fsdp2 runs
    started without torchrun, so both take the same code path."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and config.parallel == "none":
        raise TrainError(f"started as {world} processes but parallel=none: set parallel=ddp or parallel=fsdp2")
    device = _device(config.device, local_rank)
    procs = Processes(rank=rank, world=world, local_rank=local_rank, device=device)
    if config.parallel == "none" or dist.is_initialized():
        return procs
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    procs.owns_group = True
    return procs


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device={name}: CUDA is not available here; use device=cpu")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes(procs: Processes) -> None:
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, parallel: str, procs: Processes) -> nn.Module:
    """DDP around the model, or FSDP2: `fully_shard` on each decoder layer, then on the root."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [procs.device.index] if procs.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(procs.device.type, (procs.world,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def sync_context(model: nn.Module, parallel: str, last: bool) -> contextlib.AbstractContextManager:
    """Gradient reduction only after the last micro-batch of a step."""
    if parallel == "ddp" and not last:
        return model.no_sync()
    if parallel == "fsdp2":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()
