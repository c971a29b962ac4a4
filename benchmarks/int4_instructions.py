"""Machine instructions a weight of the int4 decoding kernels (fast/gemv_int4_kernels.py), counted in their code
compiled for an H100/H200 (sm_90) without a GPU: Triton compiles each kernel for that target with the ptxas it ships,
and its disassembler lists the code. The kernels loop over the weight's groups, so the count is the loop body's (one
group of every output column of a program) over one thread's share of that group's weights. A guide, not a timing:
on an H200 kernels with fewer instructions a weight have run slower (benchmarks/HISTORY.md, "int4 decoding kernels
that multiply the codes").

    python benchmarks/int4_instructions.py                          # the 3B shape's products, every configuration
    python benchmarks/int4_instructions.py --shapes code-7b --configs "16,2,4;64,4,3"

Prints, per product of a one-row decoding step and configuration (output columns a program, warps, stages): the loop
body's instructions, one thread's share of a group's weights, their ratio, and spilled stores (STL) in the kernel.
"""

from __future__ import annotations

import argparse
import collections
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.disasm import get_sass

from longllama import int4
from longllama.config import preset
from longllama.fast import gemv_int4_kernels

TARGET = GPUTarget("cuda", 90, 32)
# Triton specialises pointers and integer arguments divisible by 16 (as the weights' sizes are): the same hints here,
# for the arguments named so or ending so.
HINTED_NAMES = ("N", "N0", "N1")
HINTED_ENDINGS = ("_ptr", "off1", "off2")


def compiled(fn, constants: dict, num_warps: int, num_stages: int):
    """fn compiled for TARGET with these constants (bf16 activations, uint8 codes)."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*u8" if name.endswith("q_ptr") else "*bf16"
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
    hinted = [n for n in fn.arg_names if n not in constants and (n in HINTED_NAMES or n.endswith(HINTED_ENDINGS))]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def _opcode(line: str) -> str | None:
    words = line.split("\t", 1)[1].split()
    words = words[1:] if words and words[0].startswith("@") else words  # a predicate
    return re.split(r"[.;]", words[0])[0] if words else None


def loop_body(kernel) -> tuple[collections.Counter, collections.Counter]:
    """Opcode counts of the compiled kernel's longest loop (from a label to the branch back to it) and of all of it."""
    lines = get_sass(kernel.asm["cubin"]).splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"^\s*\.?L\w+:$", line.strip())}
    span = (0, 0)
    for i, line in enumerate(lines):
        back = re.search(r"BRA `?\(?(\.?L\w+)", line)
        if back and labels.get(back.group(1), i) < i and i - labels[back.group(1)] > span[1] - span[0]:
            span = (labels[back.group(1)], i)
    count = lambda part: collections.Counter(op for line in part if "\t" in line and (op := _opcode(line)))  # noqa: E731
    return count(lines[span[0] : span[1] + 1]), count(lines)


def products(shape: str) -> list[tuple[str, int, bool, bool]]:
    """(name, K, SwiGLU, RMSNorm inside) of a decoding step's products for a preset shape, as the step calls them."""
    config = preset(shape)
    hidden, inter = config.hidden_size, config.intermediate_size
    return [
        (f"q/k/v {3 * hidden}x{hidden} +RMSNorm", hidden, False, True),
        (f"o {hidden}x{hidden}", hidden, False, False),
        (f"gate/up {inter}x{hidden} +RMSNorm", hidden, True, True),
        (f"down {hidden}x{inter}", inter, False, False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="3b", help="comma-separated: 3b, code-7b")
    ap.add_argument("--configs", default=None, help="columns,warps,stages;... (default: the kernels' list)")
    args = ap.parse_args()
    if args.configs:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    else:
        configs = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in gemv_int4_kernels._CONFIGS]
    head = f"{'product':32s} {'cols':>4s} {'warps':>5s} {'stages':>6s} {'body':>5s} {'weights':>7s} {'a weight':>8s}"
    print(head + " spills")
    for shape in args.shapes.split(","):
        for name, k, swiglu, norm in products(shape):
            fn = gemv_int4_kernels.gemv_int4_swiglu_kernel if swiglu else gemv_int4_kernels.gemv_int4_kernel
            group = int4.group_of(k)
            for block_n, warps, stages in configs:
                constants = dict(K=k, G=group, NORM=norm, BIAS=128.0, ASM=True, UPCAST=False, ONE=True)
                constants.update(BLOCK_M=16, BLOCK_N=block_n)
                if "RESIDUAL" in fn.arg_names:
                    constants["RESIDUAL"] = False
                body, whole = loop_body(compiled(fn, constants, warps, stages))
                weights = (2 if swiglu else 1) * block_n * group / (32 * warps)  # one thread's share of a group's
                total = sum(body.values())
                print(
                    f"{name:32s} {block_n:4d} {warps:5d} {stages:6d} {total:5d} {weights:7.0f} "
                    f"{total / weights:8.2f} {whole['STL']}"
                )


if __name__ == "__main__":
    main()
