"""Files that survive a crash: every table, picture and model is written beside its place and renamed over it, so a
reader sees the old file or the new one, never half of one, and a process killed while writing empties nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the annotation: the processes that write no table (the run's watcher) need not load pandas
    import pandas as pd


def _partial(path: Path) -> Path:
    """The hidden temporary name a file is written under before it takes its place (same folder, same suffix)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary path) beside path, flush that file to disk and rename it over path; returns path."""
    path = Path(path)
    partial = _partial(path)
    try:
        write(partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename itself reaches the disk (not every file system allows this)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    return write_atomic(path, lambda p: p.write_text(text))


def write_csv(path: Path, table: pd.DataFrame, **options) -> Path:
    """Write a table as CSV atomically (options go to DataFrame.to_csv; the index is left out unless asked)."""
    return write_atomic(path, lambda p: table.to_csv(p, **{"index": False, **options}))


def append_line(path: Path, line: str) -> Path:
    """Append one line to a text file by rewriting it atomically: a kill during the write leaves the file as it was."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    return write_text(path, before + line.rstrip("\n") + "\n")
