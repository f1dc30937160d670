"""Crash-safe file writes: a reader sees the old file or the whole new one, never a part.

The data go to a hidden temporary file beside the target, are fsynced, and are renamed over
the target (rename is atomic on POSIX file systems). ``sync_dir`` also fsyncs the folder, so
that the rename itself survives a power loss (checkpoints need this; a state file rewritten
twice a second does not).
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, *, sync_dir: bool = False) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_path(path.parent)
