"""Machine instructions a weight of the one-row int4 kernels (fast/gemv_int4_kernels.py), counted in their code
compiled for an H100/H200 (sm_90) without a GPU: Triton compiles each kernel for that target with the ptxas it ships,
and its disassembler lists the code. A guide, not a timing: on an H200 kernels with fewer instructions a weight ran
slower (benchmarks/HISTORY.md, "int4 decoding kernels that multiply the codes").

    python benchmarks/int4_instructions.py                       # the 3B shape's products, every configuration
    python benchmarks/int4_instructions.py --shapes code-7b --configs "1,256,4;8,256,4"

Prints, per product of a decoding step and configuration (rows a program, bytes a step, warps): one thread's
instructions, its share of the program's weights, their ratio, and its spilled stores (STL).
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


def compiled(fn, constants: dict, num_warps: int):
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
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps))


def opcodes(kernel) -> collections.Counter:
    """Opcode counts of a compiled kernel's machine code."""
    ops = collections.Counter()
    for line in get_sass(kernel.asm["cubin"]).splitlines():
        if "\t" not in line:
            continue
        words = line.split("\t", 1)[1].split()
        words = words[1:] if words and words[0].startswith("@") else words  # a predicate
        if words:
            ops[re.split(r"[.;]", words[0])[0]] += 1
    return ops


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
    ap.add_argument("--configs", default=None, help="rows,bytes,warps;... (default: the kernels' list)")
    args = ap.parse_args()
    if args.configs:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    else:
        configs = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_KB"], c.num_warps) for c in gemv_int4_kernels._CONFIGS]
    head = f"{'product':32s} {'rows':>4s} {'bytes':>5s} {'warps':>5s} {'instr':>6s} {'weights':>7s} {'a weight':>8s}"
    print(head + " spills")
    for shape in args.shapes.split(","):
        for name, k, swiglu, norm in products(shape):
            fn = gemv_int4_kernels.gemv_int4_swiglu_kernel if swiglu else gemv_int4_kernels.gemv_int4_kernel
            for rows, block_kb, warps in configs:
                constants = dict(K=k, G=int4.group_of(k), NORM=norm, BLOCK_N=rows, BLOCK_KB=block_kb)
                constants.update({c: False for c in ("RESIDUAL", "ROUND") if c in fn.arg_names})
                ops = opcodes(compiled(fn, constants, warps))
                weights = (2 if swiglu else 1) * rows * k / (32 * warps)  # one thread's share of the program's
                total = sum(ops.values())
                print(
                    f"{name:32s} {rows:4d} {block_kb:5d} {warps:5d} {total:6d} {weights:7.0f} "
                    f"{total / weights:8.2f} {ops['STL']}"
                )


if __name__ == "__main__":
    main()
