"""FoT training-time memory (docs/training.md#cross-batch-memory): memory layers of batch entry b attend to the keys and
values of the entries
just before it in the same micro-batch.

`CrossBatch(cross_batch_range=R, dataset_packing=k, stepping=...)` is handed to
`LongLlamaForCausalLM.forward(..., cross_batch=...)`; every memory layer then calls `memory(keys, values)` with its
un-rotated keys and values of the whole batch and attends, in the same softmax as its causal window, to the full L
keys of entries b-1 .. b-R. Only the first `pack_size(b) - 1` of them are valid (docs/training.md#cross-batch-memory
step 5): within a k-pack
they are earlier chunks of the same stream (positives), beyond it chunks of another stream (negatives). Memory keys
carry no position, as stored memory does at inference. R = 0 (evaluation) gives an empty memory, i.e. plain
causal attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longllama.errors import InputError
from longllama.training.data.pretrain import dataset_packing

# docs/training.md#recipes-and-defaults flag defaults: training sees one earlier entry unless configured; evaluation
# sees none.
TRAIN_CROSS_BATCH_RANGE = 1
EVAL_CROSS_BATCH_RANGE = 0


def _check_settings(cross_batch_range: int, dataset_packing: int) -> None:
    for name, value, low in (("cross_batch_range", cross_batch_range, 0), ("dataset_packing", dataset_packing, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name}={value!r} must be an integer >= {low}")


def pack_sizes(
    batch_size: int, *, cross_batch_range: int, dataset_packing: int = 1, stepping: bool = True, negatives: bool = True
) -> list[int]:
    """pack_size(b) for b = 0..batch_size-1 (docs/training.md#cross-batch-memory step 5): 1 + the number of earlier
    entries b may attend to.

    `negatives=False` (an ablation the reference did not have) keeps only the earlier chunks of b's own k-pack, i.e.
    previous
    windows of the same stream: the positives are those of the reference's setting, the other streams' chunks are
    dropped.
    Works for any batch size; `CrossBatch.memory` additionally requires whole k-packs."""
    _check_settings(cross_batch_range, dataset_packing)
    n_att = 1 + cross_batch_range
    k = dataset_packing
    if k == 1 or not stepping:
        sizes = [n_att] * batch_size
    else:
        # Later chunks of a pack see more of their own stream; the first chunk of a pack sees nothing.
        step = math.ceil(n_att / max(k - 1, 1))
        sizes = [min((b % k) * step + 1, n_att) for b in range(batch_size)]
    if not negatives:
        sizes = [min(size, b % k + 1) for b, size in enumerate(sizes)]
    # Never reach before entry 0 (JAX's gather would wrap around to the end of the batch).
    return [min(size, b + 1) for b, size in enumerate(sizes)]


def effective_ranges(
    batch_size: int, *, cross_batch_range: int, dataset_packing: int = 1, stepping: bool = True, negatives: bool = True
) -> list[int]:
    """R_eff(b) = pack_size(b) - 1: how many earlier entries each entry attends to (the lists of
    docs/training.md#cross-batch-memory)."""
    sizes = pack_sizes(
        batch_size,
        cross_batch_range=cross_batch_range,
        dataset_packing=dataset_packing,
        stepping=stepping,
        negatives=negatives,
    )
    return [size - 1 for size in sizes]


@dataclass(frozen=True)
class CrossBatch:
    """Cross-batch memory of one micro-batch: R earlier entries, k-packing and stepping as in
    docs/training.md#cross-batch-memory."""

    cross_batch_range: int
    dataset_packing: int = 1
    stepping: bool = True
    negatives: bool = True  # False: only earlier chunks of the same k-pack (no other streams)

    def __post_init__(self) -> None:
        _check_settings(self.cross_batch_range, self.dataset_packing)

    def pack_sizes(self, batch_size: int) -> list[int]:
        return pack_sizes(
            batch_size,
            cross_batch_range=self.cross_batch_range,
            dataset_packing=self.dataset_packing,
            stepping=self.stepping,
            negatives=self.negatives,
        )

    def check_batch(self, batch_size: int) -> None:
        """A micro-batch must hold whole k-packs, or `b mod k` would not be an entry's index in its pack."""
        k = self.dataset_packing
        if k > 1 and batch_size % k:
            raise InputError(
                f"batch of {batch_size} entries is not divisible by dataset_packing={k}: use a "
                f"(micro-)batch size that is a multiple of {k}"
            )

    def memory(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory of every entry from the others' keys/values (b, h_kv, L, d), un-rotated.

        Returns mem_k, mem_v (b, h_kv, R*L, d), context c = 1..R in order (entry b-c), and mem_valid (b, R*L):
        True where c < pack_size(b). Built with index_select, so gradients reach the other entries."""
        if keys.dim() != 4 or keys.shape != values.shape:
            raise InputError(
                f"cross-batch keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                "(batch, kv_heads, length, head_dim)"
            )
        b, h, n, d = keys.shape
        self.check_batch(b)
        r = self.cross_batch_range
        device = keys.device
        contexts = torch.arange(1, r + 1, device=device)  # c = 1..R
        # Entries before 0 are masked below; clamping keeps the gather in range without wrapping.
        source = (torch.arange(b, device=device)[:, None] - contexts[None, :]).clamp_min(0)  # (B, R)
        sizes = torch.tensor(self.pack_sizes(b), device=device)
        valid = (contexts[None, :] < sizes[:, None]).repeat_interleave(n, dim=1)  # (B, R*L)
        return _gather(keys, source), _gather(values, source), valid

    def parts(self, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The same memory as `memory`, without a mask: for each context c = 1..R the entries that may see entry
        b-c (c < pack_size(b)) and that entry's keys and values, as (rows, keys (n_c, h_kv, L, d), values) for
        attention.joint_attention. Entries that see nothing are in no part."""
        b = keys.shape[0]
        self.check_batch(b)
        reach = [size - 1 for size in self.pack_sizes(b)]
        parts = []
        for c in range(1, self.cross_batch_range + 1):
            rows = [i for i in range(b) if reach[i] >= c]
            if rows:
                index = torch.tensor(rows, device=keys.device)
                parts.append((index, keys.index_select(0, index - c), values.index_select(0, index - c)))
        return parts


def _gather(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) rows source (B, R) -> (B, H, R*L, D), context-major."""
    b, h, n, d = x.shape
    r = source.shape[1]
    rows = x.index_select(0, source.reshape(-1))  # (B*R, H, L, D)
    return rows.view(b, r, h, n, d).transpose(1, 2).reshape(b, h, r * n, d)  # (B, H, R*L, D)


# k of a data pipeline name (docs/training.md#batching-pipelines): `doc_aware_k{k}` -> k; `linear` and `doc_aware` -> 1.
dataset_packing_of = dataset_packing


def make_cross_batch(
    *,
    cross_batch_range: int = TRAIN_CROSS_BATCH_RANGE,
    data_pipeline: str = "doc_aware",
    stepping: bool = True,
    negatives: bool = True,
) -> CrossBatch:
    """CrossBatch from training-config values, e.g. setup_test: range 2, "doc_aware_k2", stepping on.
    Evaluation: `make_cross_batch(cross_batch_range=EVAL_CROSS_BATCH_RANGE, data_pipeline="doc_aware_k1",
    stepping=False)`."""
    return CrossBatch(cross_batch_range, dataset_packing_of(data_pipeline), bool(stepping), bool(negatives))
