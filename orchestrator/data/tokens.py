"""The meshpilot token file: one writer (:func:`write_token_file`), one reader (:func:`read_token_file`).

``NAME.bin`` holds the tokens as a flat little-endian array (uint16 when the largest id fits,
else uint32). The sidecar ``NAME.bin.json`` holds::

    {"format": "meshpilot-tokens", "version": 1 | 2, "dtype", "num_tokens", "max_token",
     "tokenizer", "source"}

and, in version 2 (``layout: "packed"``, written by :mod:`.prepare`), also ``seq_len``,
``num_samples`` and ``mask``: the name of a loss-mask file beside it (``NAME.mask.bin``, one
uint8 per token). Layouts:

- ``stream`` (version 1): one token stream; sample ``i`` is ``tokens[i*S : i*S + S + 1]``
  (S = seq_len of the job; neighbouring windows share one token); every label is predicted.
- ``packed`` (version 2): ``num_samples`` windows of ``W = seq_len + 1`` tokens stored one
  after the other; sample ``i`` is ``tokens[i*W : (i+1)*W]``. ``mask[j] = 1`` when token ``j``
  is a target (its label is kept); 0 for the first token of a document, prompt tokens (when
  masked) and padding, whose labels become :data:`IGNORE_INDEX`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.orchestrator.errors import ConfigError

TOKEN_FORMAT = "meshpilot-tokens"
TOKEN_DTYPES = {"uint16": 2, "uint32": 4}
VERSIONS = (1, 2)
IGNORE_INDEX = -100            # the label the model's loss skips (strategies/model.py IGNORE_INDEX)
NAME_MAX = 255                 # one path component (Linux)
PATH_MAX = 4096


def check_path_text(key: str, value: str) -> None:
    """A path the OS can take: not empty, no NUL, no component over NAME_MAX, at most PATH_MAX."""
    if not value or "\0" in value:
        raise ConfigError(key, value, reason="is not a usable path (empty or holds a NUL character)")
    if len(os.fsencode(value)) > PATH_MAX or any(len(os.fsencode(c)) > NAME_MAX for c in Path(value).parts):
        raise ConfigError(key, value, reason=f"is too long for a path (a name holds at most {NAME_MAX} bytes, "
                          f"a path {PATH_MAX})")


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def mask_path(path: str | Path) -> Path:
    """``NAME.mask.bin`` beside ``NAME.bin``."""
    p = Path(path)
    return p.with_name((p.name[:-4] if p.name.endswith(".bin") else p.name) + ".mask.bin")


def token_dtype(max_token: int) -> np.dtype:
    return np.dtype(np.uint16 if max_token < 2**16 else np.uint32)


def write_token_file(tokens: np.ndarray, path: str | Path, *, tokenizer: str = "byte", source: str = "",
                     mask: np.ndarray | None = None, seq_len: int | None = None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``tokens`` (and the loss ``mask`` of a packed file) and the sidecar atomically.

    Without ``mask``: a version-1 stream file. With ``mask`` (same length, 0/1) and ``seq_len``:
    a version-2 packed file of ``len(tokens) / (seq_len + 1)`` windows."""
    path = Path(path)
    tokens = np.asarray(tokens)
    max_token = int(tokens.max()) if tokens.size else 0
    dtype = token_dtype(max_token)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": TOKEN_FORMAT, "version": 1, "dtype": dtype.name, "num_tokens": int(tokens.size),
                            "max_token": max_token, "tokenizer": tokenizer, "source": source}
    if mask is not None:
        assert seq_len is not None and tokens.size % (seq_len + 1) == 0 and len(mask) == tokens.size, \
            (seq_len, tokens.size)
        meta.update(version=2, layout="packed", seq_len=int(seq_len), num_samples=tokens.size // (seq_len + 1),
                    mask=mask_path(path).name)
        write_atomic(mask_path(path), np.asarray(mask, dtype=np.uint8).tobytes())
    meta.update(extra or {})
    write_atomic(path, tokens.astype(dtype).tobytes())
    write_atomic(sidecar_path(path), json.dumps(meta, indent=1) + "\n")
    return path


def write_sidecar(path: str | Path, meta: dict[str, Any]) -> None:
    """The sidecar of a token file whose data were written by the caller (streamed, see :mod:`.prepare`)."""
    write_atomic(sidecar_path(path), json.dumps({"format": TOKEN_FORMAT, **meta}, indent=1) + "\n")


def token_file_meta(path: str | Path, *, key: str = "train.data") -> tuple[str, int, dict[str, Any]]:
    """(dtype name, token count, sidecar) of a token file; ConfigError naming ``key`` if it is
    missing, its sidecar is unreadable, or its size (or its mask's) does not match the sidecar."""
    p = Path(path)
    fix = ("build it with `meshpilot data prepare JOB.yaml` from a dataset, or `python -m "
           f"meshpilot.orchestrator.train.data prepare --input TEXT --out {p}`, or set {key}=demo or {key}=synthetic")
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
        if int(meta.get("version", 1)) not in VERSIONS:
            raise ValueError(f"version {meta.get('version')!r} is not one of {VERSIONS} (a newer meshpilot wrote it)")
        int(meta.get("max_token", 0))
        if meta.get("layout") == "packed":
            w = int(meta["seq_len"]) + 1
            if w < 2 or n != int(meta["num_samples"]) * w or Path(str(meta["mask"])).name != str(meta["mask"]):
                raise ValueError("packed layout: num_tokens is not num_samples x (seq_len + 1)")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(key, str(path), reason=f"bad sidecar {side.name}: {str(e)[:200]}", fix=fix) from None
    size = p.stat().st_size
    if size != n * TOKEN_DTYPES[dtype]:
        raise ConfigError(key, str(path), reason=f"holds {size} bytes, the sidecar says {n} tokens of {dtype} "
                          f"({n * TOKEN_DTYPES[dtype]} bytes): truncated or replaced", fix=fix)
    if meta.get("layout") == "packed":
        m = p.with_name(str(meta["mask"]))
        if not m.is_file() or m.stat().st_size != n:
            raise ConfigError(key, str(path), reason=f"its loss mask {m.name} is missing or does not hold {n} bytes",
                              fix=fix)
    if n == 0:
        raise ConfigError(key, str(path), reason="holds no tokens", fix=fix)
    return dtype, n, meta


@dataclass(frozen=True)
class TokenFile:
    """A memory-mapped token file: ``tokens``, ``mask`` (packed files; else None) and the sidecar."""
    path: Path
    tokens: np.ndarray
    mask: np.ndarray | None
    meta: dict[str, Any]

    @property
    def packed(self) -> bool:
        return self.mask is not None

    @property
    def max_token(self) -> int:
        return int(self.meta.get("max_token", 0))


def read_token_file(path: str | Path, *, key: str = "train.data") -> TokenFile:
    """Memory-map a token file (and its loss mask); the checks of :func:`token_file_meta`."""
    dtype, n, meta = token_file_meta(path, key=key)
    p = Path(path)
    tokens = np.memmap(p, dtype=np.dtype(dtype), mode="r", shape=(n,))
    mask = np.memmap(p.with_name(str(meta["mask"])), dtype=np.uint8, mode="r", shape=(n,)) \
        if meta.get("layout") == "packed" else None
    return TokenFile(p, tokens, mask, meta)
