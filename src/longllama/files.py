"""Folders written atomically: built under a temporary name beside the target, then renamed into place, so a
reader (or a restart after a crash) sees the old folder or the new one, never a half-written one. Model exports,
training checkpoints and document memories all go through here."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path` (a dot name with a .tmp suffix: never taken for a model file by loaders,
    and cleared by those that sweep leftovers)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def replace_folder(temp: Path, final: Path) -> None:
    """Move the finished folder `temp` to `final`. An existing `final` is moved aside first (put back if the move
    fails) and removed after; the parent folder is synced so the rename survives a crash."""
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
        try:
            os.replace(temp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    sync_folder(final.parent)


def write_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """write(a temporary folder path beside `final`; not created yet), then replace_folder; if anything fails the
    temporary folder is removed and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    try:
        write(temp)
        replace_folder(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def sync_files(folder: Path) -> None:
    """fsync every file of `folder`: their contents are on disk before a rename makes them visible."""
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


def sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
