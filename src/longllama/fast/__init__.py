"""The GPU wing: the fast attention path (fused ingest attention; FlashAttention 4 or cuDNN memory attention), the
compiled elementwise functions, the static decoder and the Triton kernels (one `*_kernels.py` file per kernel
family, imported only where they run) with their configurations per shape (measured tables per GPU and a rule,
tables.py; tables tuned on the user's GPU, tuning.py). The model reaches it only
through its ExecutionPlan (plan.py); everything here computes the same function as the exact attention.
"""
