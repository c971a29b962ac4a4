"""Shared test helpers: where the reference fixtures are."""

from __future__ import annotations

import os
from pathlib import Path


def reference_root() -> Path | None:
    """shared/fixtures/reference: $LONGLLAMA_FIXTURES, or a shared/ folder inside or beside the checkout."""
    env = os.environ.get("LONGLLAMA_FIXTURES")
    here = Path(__file__).resolve()
    candidates = ([Path(env)] if env else []) + [here.parents[1] / "shared" / "fixtures" / "reference",
                                                 here.parents[2] / "shared" / "fixtures" / "reference"]
    return next((path for path in candidates if path.is_dir()), None)
