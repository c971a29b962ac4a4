"""User-facing errors: each carries a one-line message naming the problem and what to do about it."""


class LongLlamaError(Exception):
    """Base class of the errors the CLI prints as one line (no traceback) before exiting non-zero."""


class InputError(LongLlamaError, ValueError):
    """A call got input it cannot use (empty prompt, token ids outside the vocabulary, wrong mask shape...)."""


class CheckpointError(LongLlamaError, OSError):
    """A model folder is missing, incomplete or corrupt."""
