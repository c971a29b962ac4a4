"""What every evaluation writes: a JSON record {settings, summary, records} and plots, each replaced atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longllama.errors import InputError

if TYPE_CHECKING:
    from longllama.cli import LoadOptions


def save_results(
    path: str | os.PathLike[str],
    records: Sequence[dict[str, Any]],
    summary: Any,
    *,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write {settings, summary, records} as JSON, atomically: a half-written file never replaces a good one."""
    text = json.dumps({"settings": settings or {}, "summary": summary, "records": list(records)}, indent=2)
    return replace_atomically(Path(path), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def plot_format(path: str | os.PathLike[str]) -> str:
    """The matplotlib format a plot path asks for (by its suffix; none means png), checked before any work."""
    from matplotlib.figure import Figure

    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise InputError(f"cannot plot to {path}: use one of the suffixes {', '.join(sorted(supported))}")
    return suffix


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call write(temporary path) beside `path`, then move the result over `path` in one step."""
    # mkstemp makes the file private (0600): keep the mode of the file replaced, or give the usual 0644.
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def model_settings(folder: Path, model, load: LoadOptions | None) -> dict[str, Any]:
    """What every evaluation record says of its model: the folder, kNN memory (None: dense), the dtype asked for,
    the device and the execution plan. `load`: how the command loaded the model (eval_model's)."""
    return {
        "model": str(folder),
        "mem_top_k": model.config.mem_top_k,
        "dtype": "auto" if load is None else load.dtype,
        "device": str(model.device),
        "plan": model.plan.to_dict(),
    }
