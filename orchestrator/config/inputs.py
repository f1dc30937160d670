"""Checks of what a job names outside itself: the output folder and the token file.

:func:`check_inputs` is run by ``meshpilot validate`` and by ``meshpilot run`` before Ray
starts (and the worker's preflight reads the same token file header again), so a missing or
mismatched token file, or an output folder that cannot be written, is a one-line
:class:`ConfigError` instead of a worker failure after the cluster came up.

Token file format (see :mod:`meshpilot.orchestrator.train.data`): ``NAME.bin`` holds the tokens,
the sidecar ``NAME.bin.json`` their dtype, count and largest id.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.errors import ConfigError

TOKEN_FORMAT = "meshpilot-tokens"
TOKEN_DTYPES = {"uint16": 2, "uint32": 4}
NAME_MAX = 255            # one path component (Linux)
PATH_MAX = 4096
SCAN_LIMIT_BYTES = 1 << 30     # token files up to this size are scanned for their largest id


def check_path_text(key: str, value: str) -> None:
    """A path the OS can take: not empty, no NUL, no component over NAME_MAX, at most PATH_MAX."""
    if not value or "\0" in value:
        raise ConfigError(key, value, reason="is not a usable path (empty or holds a NUL character)")
    if len(os.fsencode(value)) > PATH_MAX or any(len(os.fsencode(c)) > NAME_MAX for c in Path(value).parts):
        raise ConfigError(key, value, reason=f"is too long for a path (a name holds at most {NAME_MAX} bytes, "
                          f"a path {PATH_MAX})")


def check_writable_dir(key: str, path: str | Path) -> None:
    """``path`` is a folder this user can create files in, or can be created as one."""
    check_path_text(key, str(path))
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, str(path), reason=f"{probe} is a file, not a folder",
                          fix=f"choose another {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "is not writable" if probe == p else f"cannot be created: {probe} is not writable"
        raise ConfigError(key, str(path), reason=f"{why} by this user", fix=f"choose a writable {key}")


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def token_file_meta(path: str | Path, *, key: str = "train.data") -> tuple[str, int, dict[str, Any]]:
    """(dtype name, token count, sidecar) of a token file; ConfigError naming ``key`` if it is
    missing, its sidecar is unreadable or its size does not match the sidecar."""
    p = Path(path)
    fix = ("build it with `python -m meshpilot.orchestrator.train.data prepare --input TEXT --out "
           f"{p}`, or set {key}=demo or {key}=synthetic")
    check_path_text(key, str(path))
    if not p.is_file():
        raise ConfigError(key, str(path), reason="no such token file", fix=fix)
    side = sidecar_path(p)
    if not side.is_file():
        raise ConfigError(key, str(path), reason=f"the sidecar {side.name} (dtype, token count) is missing", fix=fix)
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
            raise ValueError("not a meshpilot token file")
        dtype, n = str(meta["dtype"]), int(meta["num_tokens"])
        if dtype not in TOKEN_DTYPES or n < 0:
            raise ValueError(f"dtype {dtype!r} / num_tokens {n} not supported")
        int(meta.get("max_token", 0))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(key, str(path), reason=f"bad sidecar {side.name}: {str(e)[:200]}", fix=fix) from None
    size = p.stat().st_size
    if size != n * TOKEN_DTYPES[dtype]:
        raise ConfigError(key, str(path), reason=f"holds {size} bytes, the sidecar says {n} tokens of {dtype} "
                          f"({n * TOKEN_DTYPES[dtype]} bytes): truncated or replaced", fix=fix)
    if n == 0:
        raise ConfigError(key, str(path), reason="holds no tokens", fix=fix)
    return dtype, n, meta


def check_token_file(path: str | Path, *, vocab: int, seq_len: int, key: str = "train.data") -> None:
    """The token file exists, matches its sidecar, holds at least one sample, and no id is
    >= ``vocab`` (the sidecar's ``max_token``, and for files up to 1 GiB the tokens themselves)."""
    dtype, n, meta = token_file_meta(path, key=key)
    max_token = int(meta.get("max_token", 0))
    if n * TOKEN_DTYPES[dtype] <= SCAN_LIMIT_BYTES:
        import numpy as np
        max_token = max(max_token, int(np.memmap(path, dtype=dtype, mode="r", shape=(n,)).max()))
    if max_token >= vocab:
        raise ConfigError(key, str(path), reason=f"token file {path} has token id {max_token} >= model.vocab={vocab}",
                          fix=f"set model.vocab>={max_token + 1}, or use a token file built for this vocabulary")
    if (n - 1) // seq_len < 1:
        raise ConfigError(key, str(path), reason=f"token file {path} has {n} tokens, fewer than one sample of "
                          f"train.seq_len+1={seq_len + 1}", fix="use a shorter train.seq_len or more data")


def check_inputs(job: Any, *, run_dir: str | Path | None = None, check_output: bool = True) -> None:
    """Every input of ``job`` outside the job file: the output folder (``run_dir`` when given,
    else ``train.output_dir``; not with ``check_output=False``) is writable, and a token file
    named by ``train.data`` is usable."""
    t = job.train
    if run_dir is not None:
        check_writable_dir("--run-dir", run_dir)
    elif check_output:
        check_writable_dir("train.output_dir", t.output_dir)
    if t.data not in ("synthetic", "demo"):
        check_token_file(t.data, vocab=job.model.vocab, seq_len=t.seq_len)
