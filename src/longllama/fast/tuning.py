"""Kernel tables measured on the user's own GPU (`longllama tune`), kept as JSON in the cache directory
(longllama.caches.tuning_dir(), one file per GPU name) and preferred over the shipped tables and the rule
(kernels.Kernel.choose).

A file holds, per kernel, the autotuner's choice for each (dtype, key values):

    {"format": 1, "device": "NVIDIA H200", "triton": "3.6.0", "kernels": {"gemv": [
        {"dtype": "torch.bfloat16", "key": {"N": 9600, "K": 3200, "M": 1, "NORM": true},
         "meta": {"BLOCK_N": 4, "BLOCK_K": 1024}, "num_warps": 4, "num_stages": 3}, ...]}}

Files are written atomically (a temporary file beside, then a rename) and merged with what was there; a file that
does not parse is skipped with one warning (kernels then take the shipped table or the rule).
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from pathlib import Path

from longllama import caches

FORMAT = 1


def file_for(device: str, folder: Path | None = None) -> Path:
    """The table file of GPU `device` (its name as torch.cuda.get_device_name gives it)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "gpu"
    return (caches.tuning_dir() if folder is None else folder) / f"{slug}.json"


_LOADED: dict[Path, tuple[float, dict]] = {}


def table(device: str | None) -> dict[str, dict[tuple, tuple]]:
    """{kernel name: {(dtype, *key values): (meta, num_warps, num_stages)}} from this GPU's file; {} without one.
    Read once per process and file version (its modification time)."""
    if device is None:
        return {}
    path = file_for(device)
    try:
        stamp = path.stat().st_mtime
    except OSError:
        return {}
    cached = _LOADED.get(path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, read(path))
        _LOADED[path] = cached
    return cached[1]


def read(path: Path) -> dict[str, dict[tuple, tuple]]:
    """A table file's entries (see the module docstring); {} with a warning if it is not a table."""
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
        out: dict[str, dict[tuple, tuple]] = {}
        for name, rows in raw["kernels"].items():
            entries = out.setdefault(name, {})
            for row in rows:
                key = (row["dtype"], *row["key"].values())
                entries[key] = (dict(row["meta"]), int(row["num_warps"]), row.get("num_stages"))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(
            f"ignored the kernel table {path} ({type(exc).__name__}: {exc}); delete it or run `longllama tune` again",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}


def write(path: Path, device: str, kernels: dict[str, tuple[list[str], dict[tuple, tuple]]]) -> Path:
    """Merge `kernels` ({name: (key names, {(dtype, *key values): (meta, num_warps, num_stages)})}) into the table
    file at `path` (created with its folder if missing), atomically. Returns the path."""
    merged: dict[str, dict[str, dict]] = {}
    if path.exists():
        try:
            for name, rows in json.loads(path.read_text()).get("kernels", {}).items():
                merged[name] = {json.dumps([r["dtype"], r["key"]], sort_keys=True): r for r in rows}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            merged = {}  # an unreadable old table is replaced
    for name, (key_names, choices) in kernels.items():
        rows = merged.setdefault(name, {})
        for (dtype, *values), (meta, warps, stages) in choices.items():
            row = {
                "dtype": dtype,
                "key": dict(zip(key_names, values)),
                "meta": dict(meta),
                "num_warps": int(warps),
                "num_stages": None if stages is None else int(stages),
            }
            rows[json.dumps([dtype, row["key"]], sort_keys=True)] = row
    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    body = {
        "format": FORMAT,
        "device": device,
        "triton": version,
        "kernels": {name: list(rows.values()) for name, rows in sorted(merged.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "w") as handle:
            json.dump(body, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _LOADED.pop(path, None)
    return path


def tuned_choices() -> dict[str, tuple[list[str], dict[tuple, tuple]]]:
    """What the autotuner chose in this process, per kernel, as `write` takes it (keys without the GPU name)."""
    from longllama.fast import decode_attention, gemv

    out = {}
    for kernel in (*gemv.kernel_objects(), *decode_attention.kernel_objects()):
        if kernel.tuned:
            out[kernel.name] = (kernel.key, {key[1:]: choice for key, choice in kernel.tuned.items()})
    return out
