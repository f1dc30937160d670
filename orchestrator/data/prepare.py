"""Tokenize a dataset, pack it into training windows with loss masks, and cache it on disk.

Tokens of a document (segments from :mod:`.reader`)::

    ids  = prefix + enc(seg_1) + ... + enc(seg_k) [+ EOS]      (prefix: the tokenizer's BOS, if any;
                                                               none for chat templates, which write it)
    mask = 0 ... 0, t_1 ... t_1, ...,  t_k ... t_k [  1  ]     (t_i = 1 for trained segments)
    mask[0] = 0                                                (never predicted from the previous document)

``enc`` adds no special tokens; EOS is appended with ``add_eos`` unless the document already
ends with it (chat templates often write it). A document without any target is skipped.

Packing into windows of ``W = seq_len + 1`` tokens (the model reads ``w[:-1]`` and predicts
``w[1:]``; a label whose mask is 0 becomes -100 and is left out of the loss), in document order:

- a document that fits in the rest of the current window goes there;
- one that does not, but fits in a window, closes the current window with padding (PAD, or
  EOS when the tokenizer has no PAD; mask 0) and starts the next one: documents are never cut
  at a window end when they fit in one;
- a document longer than a window fills the rest of the current window and continues in the
  next windows, each of which starts with the last token of the previous one (as context, not
  as a target), so every token after the document's first is a target exactly once;
- a window without any target (all padding or masked prompt) is dropped.

The model attends causally over the whole window: a document packed after another can attend
to it (as in GPT-style packing); only the labels respect the boundary.

Cache: ``<cache_dir>/<name>-<fingerprint[:16]>/`` holds ``train.bin`` (+ ``.bin.json``,
``.mask.bin``: a version-2 token file, :mod:`.tokens`), ``eval.bin`` (when there is an eval
split) and ``dataset.json`` (what it was made from, counts). The fingerprint is the SHA-256 of
the source files' absolute paths, sizes and modification times (``st_mtime_ns``), the
tokenizer files' contents, the format options, ``add_eos``, the eval split settings and
``seq_len``: changing any of them prepares a new folder; an unchanged job reuses the folder
without reading the data again. A folder is built under a hidden temporary name and renamed
into place, so a reader sees a complete cache or none.

Evaluation split: ``eval_data`` (another dataset, same format options), or the last
``ceil(eval_fraction x records)`` records of the dataset in file order, which are then not in
the training windows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from meshpilot.orchestrator.data.reader import Fields, dataset_files, detect_format, documents, load_table
from meshpilot.orchestrator.data.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from meshpilot.orchestrator.data.tokens import mask_path, token_dtype, write_sidecar
from meshpilot.orchestrator.errors import ConfigError

CACHE_VERSION = 1
MANIFEST = "dataset.json"
ENCODE_BATCH = 512                      # documents per tokenizer call
Progress = Callable[[int, int], None]   # (records done, records in all)


@dataclass(frozen=True)
class DatasetOptions:
    """Everything that decides a prepared dataset (from ``train.data``, ``train.seq_len`` and
    ``train.dataset``; see :meth:`from_job`)."""
    data: str
    seq_len: int
    format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    tokenizer: str | None = None          # "byte", a tokenizer folder / tokenizer.json, or None (bytes)
    tokenizer_key: str = "train.dataset.tokenizer"
    add_eos: bool = True
    cache_dir: str = "runs/data_cache"
    eval_fraction: float = 0.0
    eval_data: str | None = None

    @classmethod
    def from_job(cls, job: Any) -> "DatasetOptions":
        """The job's options; the tokenizer defaults to the model directory (``model.path``), whose
        missing tokenizer means the byte tokenizer; the cache to ``<train.output_dir>/data_cache``."""
        t, d = job.train, job.train.dataset
        model_dir = getattr(job.model, "path", None)
        return cls(data=t.data, seq_len=t.seq_len, format=str(d.format),
                   fields=Fields(d.text_field, d.prompt_field, d.completion_field, d.messages_field,
                                 bool(d.mask_prompt)),
                   tokenizer=d.tokenizer or model_dir, tokenizer_key="train.dataset.tokenizer" if d.tokenizer
                   else "model.path", add_eos=bool(d.add_eos),
                   cache_dir=d.cache_dir or str(Path(t.output_dir) / "data_cache"),
                   eval_fraction=float(d.eval_fraction), eval_data=d.eval_data)

    def load_tokenizer(self) -> TextTokenizer:
        return load_tokenizer(self.tokenizer, key=self.tokenizer_key,
                              fallback_to_bytes=self.tokenizer_key == "model.path")


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset's folder and manifest; ``reused``: found in the cache, not tokenized now."""
    directory: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def train_file(self) -> Path:
        return self.directory / "train.bin"

    @property
    def eval_file(self) -> Path | None:
        return self.directory / "eval.bin" if self.manifest.get("eval") else None

    @property
    def train_samples(self) -> int:
        return int(self.manifest["train"]["samples"])

    @property
    def eval_samples(self) -> int:
        return int((self.manifest.get("eval") or {}).get("samples", 0))

    @property
    def max_token(self) -> int:
        return max(int(self.manifest["train"]["max_token"]), int((self.manifest.get("eval") or {}).get("max_token", 0)))


def _stamp(files: list[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(opts: DatasetOptions, tokenizer: TextTokenizer, files: list[Path], eval_files: list[Path]) -> str:
    """SHA-256 of everything the prepared data depend on (see the module docstring)."""
    inputs = {"cache_version": CACHE_VERSION, "files": _stamp(files), "eval_files": _stamp(eval_files),
              "tokenizer": tokenizer.fingerprint, "format": opts.format, "fields": opts.fields.__dict__,
              "add_eos": opts.add_eos, "eval_fraction": opts.eval_fraction, "seq_len": opts.seq_len}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_folder(opts: DatasetOptions, fp: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(opts.data.rstrip("/")).stem or "data")[:40]
    return Path(opts.cache_dir).expanduser() / f"{stem}-{fp[:16]}"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("cache_version") == CACHE_VERSION else None


def _locate(opts: DatasetOptions) -> tuple[TextTokenizer, list[Path], list[Path], str]:
    tok = opts.load_tokenizer()
    cache = Path(opts.cache_dir).expanduser().resolve()

    def outside_cache(found: list[Path]) -> list[Path]:       # a cache kept inside the data folder is not data
        return [f for f in found if cache not in f.resolve().parents]

    files = outside_cache(dataset_files(opts.data))
    eval_files = outside_cache(dataset_files(opts.eval_data, key="train.dataset.eval_data")) if opts.eval_data else []
    if not files:
        raise ConfigError("train.data", opts.data, reason="holds no data files outside train.dataset.cache_dir")
    return tok, files, eval_files, fingerprint(opts, tok, files, eval_files)


def find_prepared(opts: DatasetOptions) -> PreparedDataset | None:
    """The cached dataset of ``opts``, or None if it has not been prepared (nothing is tokenized)."""
    folder = cache_folder(opts, _locate(opts)[3])
    m = _read_manifest(folder)
    return PreparedDataset(folder, m, reused=True) if m is not None else None


# --- packing -------------------------------------------------------------------------------------

class Packer:
    """Writes documents (ids, mask) into windows of ``seq_len + 1`` tokens (rules: module docstring)."""

    def __init__(self, path: Path, *, seq_len: int, pad_id: int, dtype: np.dtype):
        self.path, self.w, self.pad_id, self.dtype = path, seq_len + 1, pad_id, dtype
        self.tok = np.zeros(self.w, dtype=np.int64)
        self.mask = np.zeros(self.w, dtype=np.uint8)
        self.fill = 0
        self._ft = open(path, "wb")
        self._fm = open(mask_path(path), "wb")
        self.stats = {"documents": 0, "skipped_documents": 0, "split_documents": 0, "tokens": 0, "samples": 0,
                      "padding_tokens": 0, "masked_tokens": 0, "target_tokens": 0, "dropped_windows": 0,
                      "max_token": 0}

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        n, w = len(ids), self.w
        if not mask[1:].any():
            self.stats["skipped_documents"] += 1
            return
        st = self.stats
        st["documents"] += 1
        st["tokens"] += n
        st["masked_tokens"] += int(n - mask.sum())
        st["max_token"] = max(st["max_token"], int(ids.max()))
        if self.fill and w - self.fill < n <= w:
            self._pad_and_emit()
        if n > w:
            st["split_documents"] += 1
        pos = 0
        while pos < n:
            take = min(w - self.fill, n - pos)
            self.tok[self.fill:self.fill + take] = ids[pos:pos + take]
            self.mask[self.fill:self.fill + take] = mask[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == w:
                self._emit()
                if pos < n:
                    pos -= 1            # the next window starts with the last token, as context

    def _pad_and_emit(self) -> None:
        self.tok[self.fill:] = self.pad_id
        self.mask[self.fill:] = 0
        self.stats["padding_tokens"] += self.w - self.fill
        self.fill = self.w
        self._emit()

    def _emit(self) -> None:
        self.mask[0] = 0                # position 0 is never a label
        targets = int(self.mask[1:].sum())
        if targets:
            self._ft.write(self.tok.astype(self.dtype).tobytes())
            self._fm.write(self.mask.tobytes())
            self.stats["samples"] += 1
            self.stats["target_tokens"] += targets
        else:
            self.stats["dropped_windows"] += 1
        self.fill = 0

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Close the last window (padded), the files, and write the sidecar; the counts."""
        if self.fill > 1:
            self._pad_and_emit()
        self.fill = 0
        self._ft.close()
        self._fm.close()
        n = self.stats["samples"] * self.w
        write_sidecar(self.path, {"version": 2, "layout": "packed", "dtype": self.dtype.name, "num_tokens": n,
                                  "max_token": self.stats["max_token"], "seq_len": self.w - 1,
                                  "num_samples": self.stats["samples"], "mask": mask_path(self.path).name, **meta})
        return dict(self.stats)


def _encode_documents(docs: list[list[tuple[str, bool]]], tok: TextTokenizer, *, prefix: tuple[int, ...],
                      eos: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    texts = [text for d in docs for text, _ in d]
    encoded = tok.encode_batch(texts) if texts else []
    out, k = [], 0
    for d in docs:
        ids, mask = list(prefix), [0] * len(prefix)
        for _, trained in d:
            e = encoded[k]
            k += 1
            ids += e
            mask += [1 if trained else 0] * len(e)
        if eos is not None and ids and ids[-1] != eos:
            ids.append(eos)
            mask.append(1)
        if ids:
            mask[0] = 0
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    return out


def _pack_split(packer: Packer, parts: list[tuple[Any, str, str, int, int]], tok: TextTokenizer,
                opts: DatasetOptions, *, done: int, total: int, progress: Progress | None) -> int:
    eos = tok.eos_id if opts.add_eos else None
    for table, fmt, name, start, stop in parts:
        prefix = () if fmt == "chat" and tok.chat_template is not None else tuple(tok.prefix_ids)
        batch: list[list[tuple[str, bool]]] = []

        def flush() -> None:
            for ids, mask in _encode_documents(batch, tok, prefix=prefix, eos=eos):
                if len(ids) < 2:
                    packer.stats["skipped_documents"] += 1
                else:
                    packer.add(ids, mask)
            batch.clear()

        for doc in documents(table, fmt, opts.fields, tok, name=name, start=start, stop=stop):
            done += 1
            if not doc:
                packer.stats["skipped_documents"] += 1
            else:
                batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
                if progress is not None:
                    progress(done, total)
        flush()
        if progress is not None:
            progress(done, total)
    return done


def prepare_dataset(opts: DatasetOptions, *, progress: Progress | None = None, force: bool = False) -> PreparedDataset:
    """The prepared dataset of ``opts``: from the cache when it is there (unless ``force``), else
    read, tokenized, packed and written now (see the module docstring)."""
    tok, files, eval_files, fp = _locate(opts)
    folder = cache_folder(opts, fp)
    if not force:
        m = _read_manifest(folder)
        if m is not None:
            return PreparedDataset(folder, m, reused=True)
    if opts.add_eos and tok.eos_id is None:
        raise ConfigError("train.dataset.add_eos", True, reason=f"the tokenizer {tok.name} names no EOS token "
                          "(eos_token in tokenizer_config.json, eos_token_id in config.json)",
                          fix="add one there, or set train.dataset.add_eos=false")
    root = folder.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = root / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as e:
        raise ConfigError("train.dataset.cache_dir", str(root), reason=f"cannot be written: {e.strerror or e}",
                          fix="set train.dataset.cache_dir to a writable folder") from None
    try:
        manifest = _build(opts, tok, files, eval_files, partial, progress)
        manifest["fingerprint"] = fp
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if force and folder.exists():
            shutil.rmtree(folder)
        try:
            os.rename(partial, folder)
        except OSError:                 # prepared meanwhile by another process: keep that one
            if _read_manifest(folder) is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return PreparedDataset(folder, _read_manifest(folder) or manifest, reused=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PreparedDataset(folder, manifest, reused=False)


def _build(opts: DatasetOptions, tok: TextTokenizer, files: list[Path], eval_files: list[Path], out: Path,
           progress: Progress | None) -> dict[str, Any]:
    hf_cache = out / "hf"
    tables = [(f, load_table(f, cache_dir=hf_cache)) for f in files]
    eval_tables = [(f, load_table(f, cache_dir=hf_cache, key="train.dataset.eval_data")) for f in eval_files]
    formats = {str(f): detect_format(opts.format, f, list(t.column_names), opts.fields)
               for f, t in tables + eval_tables}
    records = sum(t.num_rows for _, t in tables)
    n_eval = math.ceil(opts.eval_fraction * records) if opts.eval_fraction > 0 else 0
    if opts.eval_fraction > 0 and n_eval >= records:
        raise ConfigError("train.dataset.eval_fraction", opts.eval_fraction, reason=f"holds out {n_eval} of the "
                          f"{records} records: none is left for training",
                          fix="use a smaller eval_fraction or more data")
    # (table, format, name, first row, end row) of the training and evaluation records
    train_parts, eval_parts, seen = [], [], 0
    for f, t in tables:
        cut = min(max(records - n_eval - seen, 0), t.num_rows)
        if cut:
            train_parts.append((t, formats[str(f)], f.name, 0, cut))
        if cut < t.num_rows:
            eval_parts.append((t, formats[str(f)], f.name, cut, t.num_rows))
        seen += t.num_rows
    eval_parts += [(t, formats[str(f)], f.name, 0, t.num_rows) for f, t in eval_tables]
    total = records + sum(t.num_rows for _, t in eval_tables)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    dtype = token_dtype(max(tok.vocab_size - 1, pad))
    kind = "byte" if isinstance(tok, ByteTokenizer) else "tokenizer.json"
    meta = {"tokenizer": tok.name, "source": str(opts.data)}
    packer = Packer(out / "train.bin", seq_len=opts.seq_len, pad_id=pad, dtype=dtype)
    done = _pack_split(packer, train_parts, tok, opts, done=0, total=total, progress=progress)
    train_stats = packer.finish(meta)
    eval_stats = None
    if eval_parts:
        packer = Packer(out / "eval.bin", seq_len=opts.seq_len, pad_id=pad, dtype=dtype)
        _pack_split(packer, eval_parts, tok, opts, done=done, total=total, progress=progress)
        eval_stats = packer.finish({**meta, "source": str(opts.eval_data or opts.data), "split": "eval"})
    shutil.rmtree(hf_cache, ignore_errors=True)
    chat_rendering = None
    if "chat" in formats.values():
        chat_rendering = "the tokenizer's chat template" if tok.chat_template is not None else "the plain template"
    return {"format": "meshpilot-dataset", "cache_version": CACHE_VERSION, "created": time.time(),
            "data": str(opts.data), "eval_data": opts.eval_data, "eval_fraction": opts.eval_fraction,
            "eval_records": n_eval if n_eval else sum(t.num_rows for _, t in eval_tables),
            "files": [str(f) for f in files], "formats": formats, "chat_rendering": chat_rendering,
            "tokenizer": tok.name, "tokenizer_kind": kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "pad_id": pad, "seq_len": opts.seq_len, "add_eos": opts.add_eos,
            "mask_prompt": opts.fields.mask_prompt, "records": total, "train": train_stats, "eval": eval_stats}
