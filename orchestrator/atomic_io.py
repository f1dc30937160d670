"""Crash-safe file writes: a reader sees the old file or the whole new one, never a part.

The data go to a hidden temporary file beside the target, are fsynced, and are renamed over
the target (rename is atomic on POSIX file systems). ``sync_dir`` also fsyncs the folder, so
that the rename itself survives a power loss (checkpoints need this; a state file rewritten
twice a second does not). ``mode`` sets the new file's permissions (0o600: owner only).

A write that fails (a full disk: ENOSPC) removes its temporary file and raises.
:func:`overwrite_in_place` is the fallback for small status files on a full disk: it reuses the
blocks the file already has (a rewrite no longer than the old contents, padded with spaces),
so a final state can still be recorded when no new block can be allocated.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, *, sync_dir: bool = False, mode: int | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        with open(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)          # also when an old temporary file was left behind
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_path(path.parent)


def overwrite_in_place(path: Path, data: str | bytes) -> bool:
    """Rewrite an existing file's bytes in place when ``data`` is not longer than its contents
    (the rest is padded with spaces, which JSON readers ignore); False when it does not fit or
    the file is missing. Not atomic: for a last status record on a full disk only."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        size = os.path.getsize(path)
        if len(raw) > size:
            return False
        with open(path, "r+b") as f:
            f.write(raw + b" " * (size - len(raw)))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
