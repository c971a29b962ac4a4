"""The values of the config's options that the command line offers too, importable without torch (the command line
parses its arguments before it imports the libraries)."""

# Weight-only quantization of the linear layers (quantize.py): recorded by quantized checkpoints.
QUANTIZATIONS = ("none", "int8", "int4")

# "eager": the exact reference maths; "sdpa": torch SDPA on concatenated keys (as torch_attention); "fast": fused
# kernels with no per-window copy of the memory; "auto": eager on the CPU, fast on GPUs.
ATTN_IMPLS = ("auto", "eager", "sdpa", "fast")

# Memory attention: "dense" reads every memory key (the reference); "blocks" ranks fixed blocks of memory keys by a
# summary (per-dimension max and min) and reads only the best `mem_blocks` of them (retrieval.py).
MEM_RETRIEVALS = ("dense", "blocks")
