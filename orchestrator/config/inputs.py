"""Checks of what a job names outside itself: the output folder and the training data.

:func:`check_inputs` is run by ``meshpilot validate`` and by ``meshpilot run`` before Ray
starts (and the worker's preflight reads the same token file header again), so a missing or
mismatched token file or dataset, or an output folder that cannot be written, is a one-line
:class:`ConfigError` instead of a worker failure after the cluster came up.

``train.data`` is ``synthetic``, ``demo``, a token file (:mod:`meshpilot.orchestrator.data.tokens`)
or a local dataset (:mod:`meshpilot.orchestrator.data`). A dataset is prepared here when its
cache is missing (``prepare=True``, what ``validate`` and ``run`` do: the workers only memory-map
it), then checked: its largest token id is below ``model.vocab``, it holds at least one training
sample, and an evaluation split exists when ``train.eval_every`` asks for one. Data that
``train.steps x train.global_batch`` reads more than once are a notice with the epoch count,
not an error.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from meshpilot.orchestrator.data.prepare import DatasetOptions, PreparedDataset, find_prepared, prepare_dataset
from meshpilot.orchestrator.data.reader import FORMATS, is_dataset
from meshpilot.orchestrator.data.tokens import (TOKEN_DTYPES, TOKEN_FORMAT, check_path_text, sidecar_path,
                                                token_file_meta)
from meshpilot.orchestrator.errors import ConfigError, check_positive

__all__ = ["TOKEN_DTYPES", "TOKEN_FORMAT", "check_path_text", "sidecar_path", "token_file_meta", "check_writable_dir",
           "check_token_file", "check_dataset_options", "check_dataset", "check_inputs"]

SCAN_LIMIT_BYTES = 1 << 30     # token files up to this size are scanned for their largest id
Notices = list[str]            # warnings for the user (the data repeat, ...), printed by the caller


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


def check_token_file(path: str | Path, *, vocab: int, seq_len: int, key: str = "train.data") -> int:
    """The token file exists, matches its sidecar, holds at least one sample, and no id is
    >= ``vocab`` (the sidecar's ``max_token``, and for files up to 1 GiB the tokens themselves); a
    packed file (version 2) was packed for ``seq_len``. Returns its number of samples."""
    dtype, n, meta = token_file_meta(path, key=key)
    max_token = int(meta.get("max_token", 0))
    if n * TOKEN_DTYPES[dtype] <= SCAN_LIMIT_BYTES:
        import numpy as np
        max_token = max(max_token, int(np.memmap(path, dtype=dtype, mode="r", shape=(n,)).max()))
    if max_token >= vocab:
        raise ConfigError(key, str(path), reason=f"token file {path} has token id {max_token} >= model.vocab={vocab}",
                          fix=f"set model.vocab>={max_token + 1}, or use a token file built for this vocabulary")
    if meta.get("layout") == "packed":
        if int(meta["seq_len"]) != seq_len:
            raise ConfigError("train.seq_len", seq_len, reason=f"token file {path} holds windows packed for "
                              f"seq_len {meta['seq_len']}", fix=f"set train.seq_len={meta['seq_len']}, or prepare "
                              "the dataset again for this seq_len")
        return int(meta["num_samples"])
    if (n - 1) // seq_len < 1:
        raise ConfigError(key, str(path), reason=f"token file {path} has {n} tokens, fewer than one sample of "
                          f"train.seq_len+1={seq_len + 1}", fix="use a shorter train.seq_len or more data")
    return (n - 1) // seq_len


def check_dataset_options(t: Any) -> None:
    """The ``train.dataset`` section and the evaluation keys on their own (no file is read):
    field names, ranges, and that evaluation and the dataset options go with a dataset."""
    d = t.dataset
    check_positive("train.eval_every", t.eval_every, zero_ok=True)
    check_positive("train.eval_batches", t.eval_batches, zero_ok=True)
    for k in ("text_field", "prompt_field", "completion_field", "messages_field"):
        v = getattr(d, k)
        if not isinstance(v, str) or not v or len(v) > 256:
            raise ConfigError(f"train.dataset.{k}", v, reason="must be a field name (1 to 256 characters)")
    if str(d.format) not in FORMATS:                       # the schema's Choice already holds this
        raise ConfigError("train.dataset.format", d.format, allowed=FORMATS)
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError("train.dataset.eval_fraction", d.eval_fraction, reason="must be >= 0 and < 1",
                          fix="e.g. 0.05 holds out the last 5% of the records")
    for k in ("tokenizer", "cache_dir", "eval_data"):
        if getattr(d, k) is not None:
            check_path_text(f"train.dataset.{k}", getattr(d, k))
    if d.eval_fraction > 0 and d.eval_data is not None:
        raise ConfigError("train.dataset.eval_fraction", d.eval_fraction, reason=f"and train.dataset.eval_data="
                          f"{d.eval_data} both name an evaluation split", fix="set only one of them")
    dataset = is_dataset(t.data)
    if not dataset:
        for k in ("eval_fraction", "eval_data"):
            if getattr(d, k):
                raise ConfigError(f"train.dataset.{k}", getattr(d, k), reason=f"train.data={t.data} is not a dataset "
                                  "(.txt, .jsonl, .json, .parquet or a folder of them)",
                                  fix="point train.data at a dataset, or leave the evaluation split unset")
    if t.eval_every > 0 and not (dataset and (d.eval_fraction > 0 or d.eval_data)):
        raise ConfigError("train.eval_every", t.eval_every, reason="needs an evaluation split: "
                          + ("a dataset train.data" if not dataset else "none is set"),
                          fix="set train.dataset.eval_fraction (e.g. 0.05) or train.dataset.eval_data, with a "
                              "dataset in train.data; or train.eval_every=0")


Progress = Callable[[int, int], None]


def check_dataset(job: Any, *, prepare: bool = True, progress: Progress | None = None) -> tuple[
        PreparedDataset | None, Notices]:
    """Prepare (``prepare``; else look up) the dataset ``train.data`` names and check it against the
    model and the run's length; (the prepared dataset or None when not prepared yet, notices)."""
    t = job.train
    opts = DatasetOptions.from_job(job)
    if prepare:
        check_writable_dir("train.dataset.cache_dir", opts.cache_dir)
    ds = prepare_dataset(opts, progress=progress) if prepare else find_prepared(opts)
    if ds is None:
        return None, [f"train.data={t.data}: not prepared yet (`meshpilot data prepare` tokenizes it)"]
    notes = [] if ds.manifest.get("tokenizer_kind") != "byte" else [
        f"train.data={t.data}: tokenized with the byte tokenizer (ids 0-258: bytes, BOS, EOS, PAD) since "
        + ("the model directory has no tokenizer.json" if opts.tokenizer else "no tokenizer is given "
           "(train.dataset.tokenizer, or a model directory model.path)")]
    if ds.max_token >= job.model.vocab:
        raise ConfigError("train.data", t.data, reason=f"tokenized with {ds.manifest.get('tokenizer')}, it has token "
                          f"id {ds.max_token} >= model.vocab={job.model.vocab}",
                          fix=f"set model.vocab>={ds.max_token + 1}, or train.dataset.tokenizer to the model's "
                              "tokenizer")
    if ds.train_samples < 1:
        raise ConfigError("train.data", t.data, reason=f"holds no training sample of train.seq_len+1={t.seq_len + 1} "
                          f"tokens ({ds.manifest['train']['documents']} documents with a target)",
                          fix="add data, or check the format and field names (train.dataset)")
    notes += _repeat_notices(ds.train_samples, t.steps * t.global_batch, "train.data", t.data)
    if t.eval_every > 0:
        if ds.eval_samples < 1:
            raise ConfigError("train.eval_every", t.eval_every, reason="the evaluation split holds no sample",
                              fix="raise train.dataset.eval_fraction, or give more train.dataset.eval_data")
        per_eval = (t.eval_batches or max(1, ds.eval_samples // t.global_batch)) * t.global_batch
        if per_eval > ds.eval_samples:
            notes.append(f"train.eval_batches={t.eval_batches}: each evaluation reads {per_eval} samples of an "
                         f"evaluation split of {ds.eval_samples}: samples are counted more than once")
    return ds, notes


def _repeat_notices(samples: int, needed: int, key: str, value: str) -> Notices:
    if needed <= samples:
        return []
    return [f"{key}={value}: {samples} samples; train.steps x train.global_batch = {needed} reads them "
            f"{needed / samples:.2f} times ({math.ceil(needed / samples)} epochs, each in a new order)"]


def check_inputs(job: Any, *, run_dir: str | Path | None = None, check_output: bool = True, prepare: bool = True,
                 progress: Progress | None = None) -> Notices:
    """Every input of ``job`` outside the job file: the output folder (``run_dir`` when given,
    else ``train.output_dir``; not with ``check_output=False``) is writable, and the data named by
    ``train.data`` are usable (a dataset is prepared first when ``prepare``; :func:`check_dataset`).
    Returns notices for the user (data read more than once, the byte tokenizer chosen)."""
    t = job.train
    if run_dir is not None:
        check_writable_dir("--run-dir", run_dir)
    elif check_output:
        check_writable_dir("train.output_dir", t.output_dir)
    if t.data in ("synthetic", "demo"):
        return []
    if is_dataset(t.data):
        return check_dataset(job, prepare=prepare, progress=progress)[1]
    n = check_token_file(t.data, vocab=job.model.vocab, seq_len=t.seq_len)
    return _repeat_notices(n, t.steps * t.global_batch, "train.data", t.data)


def with_absolute_paths(job: Any) -> Any:
    """A copy of ``job`` whose local paths that workers read are absolute, taken against this
    process's working folder: ``train.data`` (a token file or dataset), ``train.dataset.eval_data``,
    ``.tokenizer`` (unless ``byte``), ``.cache_dir`` (for a dataset, the default
    ``<train.output_dir>/data_cache`` written out) and ``train.export_dir``. ``meshpilot run``
    ships this copy to its workers (and writes it to the run's job.yaml): a worker of a Ray
    cluster started elsewhere runs in another working folder, where a relative path names
    nothing. The model directory is made absolute by the loader already."""
    import copy

    def absolute(p: str) -> str:
        return str(Path(p).expanduser().absolute())

    job = copy.deepcopy(job)
    t, d = job.train, job.train.dataset
    if t.data not in ("synthetic", "demo"):
        if is_dataset(t.data) and d.cache_dir is None:
            d.cache_dir = DatasetOptions.from_job(job).cache_dir
        t.data = absolute(t.data)
    if d.eval_data:
        d.eval_data = absolute(d.eval_data)
    if d.tokenizer and d.tokenizer != "byte":
        d.tokenizer = absolute(d.tokenizer)
    if d.cache_dir:
        d.cache_dir = absolute(d.cache_dir)
    if t.export_dir:
        t.export_dir = absolute(t.export_dir)
    return job
