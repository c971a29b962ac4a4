"""int4 weights in this package's own packed layout, read in place by the decoding kernels.

Layout of a weight W (N, K), group size G (G divides K, K even):
- `qdata` uint8 (N, K // 2): byte b of row n holds column 2b in its low nibble and column 2b + 1 in its high one,
  each an unsigned 4-bit code q in 0..15;
- `scale` and `offset` (N, K // G) in the weight's dtype: group g of row n covers columns [g G, (g + 1) G).
A weight is `dequantize`d as bf16/fp16(q * scale + offset) computed in fp32: that rounded value *is* the weight
(the kernels compute the same value per element before they multiply, so a product differs from
F.linear(x, dequantize(W)) only in the order of its fp32 sums).

Quantization is asymmetric min/max per group: offset = the group's minimum, scale = (max - min) / 15, both rounded
to the weight's dtype first and q = round((w - offset) / scale) clamped to 0..15 against the rounded ones.

Why not torchao's int4 tensors: the tinygemm layout (CUDA) and the prototype CPU layout are opaque tiles made for
their own kernels (tinygemm read long prompts 19x slower than bf16 on an H100: docs/quantization.md), and
torchao's plain int4 layout needs the separate mslk kernels. This layout is simple enough for a matrix-vector
kernel to read with no shuffle, and is the same on every device, so int4 checkpoints save and load anywhere.

`Int4Weight` is the weight as a tensor (torchao's tensor-subclass base: moves, copies and detaches come with it):
an `nn.Linear` holding one computes `F.linear` as the dequantized weight's product (`dequantize_fn` picks a GPU
kernel where one is registered); the decoding kernels read its parts in place (quantize.int4_parts).
Importing this module needs torchao (the [quant] extra).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

GROUPS = (128, 64, 32)  # largest (fewest scales) first
LEVELS = 15  # the largest 4-bit code


def group_of(in_features: int) -> int | None:
    """The group size for a layer of `in_features` inputs: the largest of GROUPS dividing it, or None."""
    return next((g for g in GROUPS if in_features % g == 0), None)


def pack(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qdata, scale, offset) of a float weight (N, K) in the layout above, on the weight's device."""
    n, k = weight.shape
    if k % group or group % 2:
        raise ValueError(f"group {group} must be even and divide the weight's {k} input columns")
    w = weight.detach().float().view(n, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / LEVELS).to(weight.dtype)
    offset = lo.to(weight.dtype)
    s = scale.float()[..., None]
    q = torch.where(s > 0, (w - offset.float()[..., None]) / torch.where(s > 0, s, 1.0), 0.0)
    q = q.round().clamp_(0, LEVELS).to(torch.uint8).view(n, k)
    qdata = q[:, 0::2] | (q[:, 1::2] << 4)
    return qdata.contiguous(), scale.contiguous(), offset.contiguous()


def codes(qdata: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (N, K) as uint8 (0..15) of packed `qdata` (N, K // 2)."""
    return torch.stack((qdata & 0xF, qdata >> 4), dim=-1).view(qdata.shape[0], -1)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    """The weight (N, K) in scale's dtype: q * scale + offset, computed in fp32 and rounded once."""
    q = codes(qdata).float()
    n, k = q.shape
    w = q.view(n, k // group, group) * scale.float()[..., None] + offset.float()[..., None]
    return w.to(scale.dtype).view(n, k)


def _dequantize_any(qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    """dequantize by a GPU kernel for CUDA tensors where Triton is installed, else by PyTorch."""
    if qdata.is_cuda:
        from longllama.fast import kernels

        if kernels.available():
            from longllama.fast.gemv import dequantize_int4

            return dequantize_int4(qdata, scale, offset, group)
    return dequantize(qdata, scale, offset, group)


class Int4Weight(TorchAOBaseTensor):
    """An int4 weight (N, K) in the layout above: `qdata`, `scale`, `offset` and the `group` size; its dtype is
    the dequantized weight's (scale's)."""

    tensor_data_names = ["qdata", "scale", "offset"]
    tensor_attribute_names = ["group", "shape"]

    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, shape):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, device=qdata.device, dtype=scale.dtype, requires_grad=False
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int, shape):
        super().__init__()
        self.qdata, self.scale, self.offset, self.group = qdata, scale, offset, int(group)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int) -> Int4Weight:
        """`weight` (N, K) quantized to int4 with groups of `group` input columns (pack)."""
        qdata, scale, offset = pack(weight, group)
        return cls(qdata, scale, offset, group, weight.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight as a plain (N, K) tensor of this tensor's dtype."""
        return _dequantize_any(self.qdata, self.scale, self.offset, self.group)

    def _quantization_type(self) -> str:
        return f"shape={tuple(self.shape)}, group={self.group}, device={self.device}"


def _linear(func: Callable, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return F.linear(x, weight.dequantize(), bias)


Int4Weight.implements([torch.ops.aten.linear.default])(_linear)
Int4Weight.implements_torch_function([F.linear])(_linear)
