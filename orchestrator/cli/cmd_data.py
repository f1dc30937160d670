"""``meshpilot data prepare JOB [overrides] [--force]``: tokenize, pack and cache the job's dataset.

What ``meshpilot run`` (and ``validate``) would otherwise do on the driver before the workers
start, ahead of time and with a progress bar: read ``train.data`` (a ``.txt``, ``.jsonl``/``.json``,
``.parquet`` file or a folder of them), tokenize it with the model directory's tokenizer (or
``train.dataset.tokenizer``; the byte tokenizer without one), pack it into ``train.seq_len + 1``
token windows with loss masks and write it to the cache (:mod:`meshpilot.orchestrator.data.prepare`).
Prints the cache folder, the tokenizer, and the sample, token, padding and masking counts of
the training and evaluation splits; then the checks of ``validate`` (vocabulary range, enough
samples). A cache that already holds this dataset is reused (``--force`` tokenizes again).
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meshpilot.orchestrator.config.inputs import check_dataset, check_writable_dir
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.data.prepare import DatasetOptions, prepare_dataset
from meshpilot.orchestrator.data.reader import is_dataset
from meshpilot.orchestrator.errors import ConfigError


def add_parser(sub: Any) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("data", help="prepare a job's dataset ahead of time: tokenize, pack and cache it "
                       "(meshpilot data prepare JOB)")
    p.add_argument("action", choices=["prepare"], help="prepare: tokenize train.data into the cache")
    add_job_arguments(p)
    p.add_argument("--force", action="store_true", help="tokenize again even when the cache holds this dataset")
    p.set_defaults(func=run)


def split_line(name: str, st: dict[str, Any] | None, seq_len: int) -> str:
    if not st:
        return f"{name}: none"
    return (f"{name}: {st['samples']:,} samples of {seq_len + 1} tokens from {st['documents']:,} documents "
            f"({st['skipped_documents']:,} skipped: empty or without a target; {st['split_documents']:,} longer than "
            f"a window, split); {st['tokens']:,} tokens, {st['padding_tokens']:,} padding tokens, "
            f"{st['masked_tokens']:,} masked tokens (prompts, document starts: no loss), "
            f"{st['target_tokens']:,} labels in the loss")


def run(args: Any) -> int:
    console = Console()
    job = load_job(args.job, args.overrides)
    t = job.train
    if not is_dataset(t.data):
        raise ConfigError("train.data", t.data, reason="is not a dataset (.txt, .jsonl, .json, .parquet or a folder "
                          "of them): nothing to prepare", fix="point train.data at a dataset file or folder")
    opts = DatasetOptions.from_job(job)
    check_writable_dir("train.dataset.cache_dir", opts.cache_dir)
    with Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TextColumn("records"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("tokenizing", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        ds = prepare_dataset(opts, progress=progress, force=args.force)
    _, notes = check_dataset(job, prepare=True)        # reuses what was just written
    m = ds.manifest

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"{'reused the cached' if ds.reused else 'prepared'} dataset {ds.directory}")
    say(f"tokenizer: {m['tokenizer']} ({m['tokenizer_kind']}; EOS id {m['eos_id']}, PAD id {m['pad_id']})"
        + (f"; chat rendered with {m['chat_rendering']}" if m.get("chat_rendering") else ""))
    say("formats: " + ", ".join(f"{f}: {fmt}" for f, fmt in m["formats"].items()))
    say(split_line("train", m["train"], m["seq_len"]))
    say(split_line("eval", m.get("eval"), m["seq_len"]))
    say(f"largest token id {ds.max_token} (model.vocab={job.model.vocab})")
    for note in notes:
        say(f"warning: {note}")
    return 0
