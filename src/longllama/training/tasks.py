"""Training tasks: what a batch is, its loss and its evaluation batches, for pre-training and fine-tuning."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longllama.training.config import TrainConfig, TrainError
from longllama.training.cross_batch import make_cross_batch
from longllama.training.data.sft import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def sequence_mean_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """docs/training.md#loss-optimiser-and-micro-batches: fp32 NLL, summed over each row's masked positions, divided by
    max(mask sum, 1e-10), averaged over
    rows (a per-sequence mean: a row with few loss tokens weighs as much as a full one)."""
    b, n, v = logits.shape
    nll = F.cross_entropy(logits.float().reshape(b * n, v), targets.reshape(b * n), reduction="none").view(b, n)
    mask = loss_mask.to(nll.dtype)
    return ((nll * mask).sum(-1) / mask.sum(-1).clamp_min(1e-10)).mean()


class PretrainTask:
    """FoT pre-training batches (docs/training.md#batching-pipelines), the cross-batch setting
    (docs/training.md#cross-batch-memory) and the per-sequence loss
    (docs/training.md#loss-optimiser-and-micro-batches)."""

    def __init__(self, config: TrainConfig, tokenizer: Any) -> None:
        data = config.data
        if tokenizer is None:
            raise TrainError("pretraining reads text: set model.tokenizer to a folder with tokenizer.model")
        self.data, self.tokenizer = data, tokenizer
        self.batches = self._pipeline(
            data.train, data.pipeline, data.batch_size, data.seq_len, data.min_length, shuffle_seed=data.shuffle_seed
        )
        self.cross_batch = make_cross_batch(
            cross_batch_range=data.cross_batch_range,
            data_pipeline=data.pipeline,
            stepping=data.stepping,
            negatives=data.negatives,
        )
        # docs/training.md#cross-batch-memory: evaluation sees no other entries, so memory layers act as plain causal
        # attention.
        self.eval_cross_batch = make_cross_batch(cross_batch_range=0, data_pipeline=data.eval_pipeline, stepping=False)
        self.eval_batch_size = data.eval_batch_size or data.batch_size
        self._eval_cache: list[Batch] = []

    def _pipeline(
        self,
        files: Sequence[Any],
        name: str,
        batch_size: int,
        seq_len: int,
        min_length: int,
        *,
        shuffle_seed: int | None = None,
    ) -> Any:
        from longllama.documents import iter_documents
        from longllama.training.data.pretrain import TokenizedDocs, build_pipeline

        # Looping forever, as the reference's JSON dataset does: steps, not epochs, end a run.
        docs = iter_documents(files, field=self.data.field, loop=True, shuffle_seed=shuffle_seed)
        tokens = TokenizedDocs(docs, tokenizer=self.tokenizer, min_length=min_length, read_ahead=self.data.read_ahead)
        return build_pipeline(name, tokens, batch_size=batch_size, seq_len=seq_len)

    def check_split(self, parts: int) -> None:
        k = self.cross_batch.dataset_packing
        size, rest = divmod(self.data.batch_size, parts)
        if rest or size % k:
            raise TrainError(
                f"data.batch_size={self.data.batch_size} must split into {parts} micro-batches "
                f"(ranks x grad_accum) of whole {k}-packs: use a multiple of {parts * k}"
            )
        if self.eval_batch_size % parts:
            raise TrainError(
                f"data.eval_batch_size={self.eval_batch_size} must be a multiple of {parts} (ranks x grad_accum)"
            )

    def loss(self, model: nn.Module, batch: Batch, *, evaluate: bool = False) -> torch.Tensor:
        cross_batch = self.eval_cross_batch if evaluate else self.cross_batch
        logits = model(input_ids=batch["input_ids"], cross_batch=cross_batch).logits
        return sequence_mean_loss(logits, batch["targets"], batch["loss_mask"])

    def eval_batches(self, count: int) -> Iterator[Batch]:
        """The first `count` eval batches, the same ones at every evaluation (so evaluations compare); made once."""
        if not self.data.eval:
            return iter(())
        if len(self._eval_cache) < count:
            pipeline = self._pipeline(
                self.data.eval,
                self.data.eval_pipeline,
                self.eval_batch_size,
                self.data.eval_seq_len or self.data.seq_len,
                self.data.eval_min_length,
            )
            self._eval_cache = [next(pipeline) for _ in range(count)]
        return iter(self._eval_cache[:count])


class SFTBatches:
    """Batches of fine-tuning examples in a fresh permutation each epoch (drawn from seed and epoch); resumable.

    Only the rows of `rows` (a slice of the global batch: this rank's) are built; random padding of an example
    depends on (seed, epoch, index), so every rank and every resumed run builds the same tensors."""

    def __init__(
        self, dataset: Any, *, batch_size: int, seed: int, pad_id: int, rows: tuple[int, int] | None = None
    ) -> None:
        if len(dataset) == 0:
            raise TrainError("the fine-tuning data has no rows (all filtered out?); check data.train and data.filter")
        self.dataset, self.batch_size, self.seed, self.pad_id = dataset, batch_size, seed, pad_id
        self.rows = rows or (0, batch_size)
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_indices(self) -> list[tuple[int, int]]:
        """(epoch, item) of the next global batch, wrapping into the next epoch when one ends."""
        picked: list[tuple[int, int]] = []
        order = self._order(self.epoch)
        while len(picked) < self.batch_size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            picked.append((self.epoch, int(order[self.position])))
            self.position += 1
        return picked

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> Batch:
        from longllama.training.data.sft import collate_sft

        lo, hi = self.rows
        examples = []
        for epoch, index in self.next_indices()[lo:hi]:
            _set_epoch(self.dataset, epoch)
            examples.append(self.dataset[index])
        return collate_sft(examples, pad_id=self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sft", "size": len(self.dataset), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "sft" or state.get("size") != len(self.dataset):
            raise TrainError(
                f"checkpoint data state {dict(state)} does not belong to this fine-tuning data "
                f"({len(self.dataset)} rows): resume with the data of the saved run"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _set_epoch(dataset: Any, epoch: int) -> None:
    for part in getattr(dataset, "datasets", [dataset]):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


class FinetuneTask:
    """Instruction / chat fine-tuning (docs/finetuning.md): padded examples, one memory window plus the last window
    (docs/finetuning.md#memory-in-fine-tuning), and
    the token-mean loss of the labelled positions."""

    def __init__(self, config: TrainConfig, tokenizer: Any, *, rank_rows: tuple[int, int]) -> None:
        from longllama.training.data.sft import pad_id_of

        if tokenizer is None:
            raise TrainError("fine-tuning reads text: set model.tokenizer to a folder with tokenizer.model")
        self.data = config.data
        self.pad_id = pad_id_of(tokenizer)
        self.dataset = self._dataset(self.data.train, tokenizer, seed=config.seed)
        self.batches = SFTBatches(
            self.dataset, batch_size=self.data.batch_size, seed=config.seed, pad_id=self.pad_id, rows=rank_rows
        )
        self.eval_dataset = self._dataset(self.data.eval, tokenizer, seed=config.seed) if self.data.eval else None
        self.eval_batch_size = self.data.eval_batch_size or self.data.batch_size
        self.rank_rows = rank_rows

    def _lengths(self) -> Any:
        from longllama.training.data.sft import MIXTURES, SFTLengths

        base = MIXTURES[self.data.mixture].lengths if self.data.mixture else SFTLengths()
        chosen = {
            name: getattr(self.data, name) for name in ("max_input_length", "max_output_length", "max_total_length")
        }
        return dataclasses.replace(
            base, random_pad=self.data.random_pad, **{k: v for k, v in chosen.items() if v is not None}
        )

    def _dataset(self, files: Sequence[Any], tokenizer: Any, *, seed: int) -> Any:
        from longllama.training.data.sft import MIXTURES, MixedDataset

        lengths = self._lengths()
        if self.data.mixture is None:
            return _sft_dataset(files, self.data.template, self.data.filter, tokenizer, lengths, seed=seed)
        if self.data.mixture not in MIXTURES:
            raise TrainError(f"data.mixture={self.data.mixture!r} is unknown: use one of {', '.join(MIXTURES)}")
        parts = MIXTURES[self.data.mixture].parts
        if len(files) != len(parts):
            raise TrainError(
                f"mixture {self.data.mixture} has {len(parts)} parts "
                f"({', '.join(p.template for p in parts)}): give data.train {len(parts)} entries "
                f"(files of each part), got {len(files)}"
            )
        datasets = [
            _sft_dataset(part_files, part.template, part.filter, tokenizer, lengths, seed=seed)
            for part_files, part in zip(files, parts)
        ]
        return MixedDataset(datasets, [part.proportion for part in parts])

    def check_split(self, parts: int) -> None:
        if self.data.batch_size % parts or self.eval_batch_size % parts:
            raise TrainError(
                f"data.batch_size={self.data.batch_size} and eval batch {self.eval_batch_size} must "
                f"split into {parts} micro-batches (ranks x grad_accum): use multiples of {parts}"
            )

    def loss(self, model: nn.Module, batch: Batch, *, evaluate: bool = False) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            last_context_length=self.data.last_context_length,
            use_cache=False,
        )
        if not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            # Truncation can cut every answer off; a mean over no tokens is NaN and would poison the weights.
            # A zero that still touches every parameter keeps DDP/FSDP gradient reduction in step.
            return out.logits.sum() * 0.0
        return out.loss

    def eval_batches(self, count: int) -> Iterator[Batch]:
        """The first `count` batches of the eval rows, in file order."""
        from longllama.training.data.sft import collate_sft

        if self.eval_dataset is None:
            return iter(())
        size = self.eval_batch_size
        starts = range(0, min(count * size, len(self.eval_dataset) // size * size), size)
        return (
            collate_sft([self.eval_dataset[start + i] for i in range(size)], pad_id=self.pad_id) for start in starts
        )


def _sft_dataset(files: Any, template: str, row_filter: str, tokenizer: Any, lengths: Any, *, seed: int) -> Any:
    from longllama.training.data.sft import (
        TEMPLATES,
        ChatExample,
        ChatTemplate,
        InstructionExample,
        SFTDataset,
        filter_rows,
        read_rows,
    )

    if template not in TEMPLATES:
        raise TrainError(f"data.template={template!r} is unknown: use one of {', '.join(TEMPLATES)}")
    rows = read_rows(files)
    if row_filter:
        rows = filter_rows(rows, row_filter, tokenizer=tokenizer)
    kind = ChatExample if isinstance(TEMPLATES[template], ChatTemplate) else InstructionExample
    return SFTDataset(rows, kind(tokenizer, template=template, lengths=lengths), seed=seed)
