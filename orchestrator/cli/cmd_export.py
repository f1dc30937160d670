"""``meshpilot export RUN [--step N] --out DIR [--dtype fp32|bf16|fp16]``: a Hugging Face model
directory (config.json, safetensors shards and index, the source model's tokenizer files) from a
run's checkpoint, offline, in one CPU process.

RUN is a run directory of ``meshpilot run`` (its ``job.yaml`` names the model; ``--job`` gives the
job file of a run started otherwise, e.g. by torchrun) or a run id. Without ``--step`` the newest
complete checkpoint is exported. Every plan's checkpoint works: ZeRO 0-3 with or without offload,
tensor and expert parallelism, zeroth-order (MeZO, ZO2); see
:mod:`meshpilot.orchestrator.train.export`, which does the work.

The driver does not import torch, so the export runs as ``python -m
meshpilot.orchestrator.train.export`` in a child process with this one's stdout and stderr; its
exit status is this command's (2: a problem with the run, the step or the model, named in one line).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshpilot.orchestrator.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face model directory from a run's checkpoint")
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or run id) of `meshpilot run`")
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (replaced atomically)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest complete one)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: the job's train.export_dtype, fp32)")
    p.add_argument("--job", default=None, help="the run's job file (default: RUN_DIR/job.yaml)")
    p.set_defaults(func=run)


def resolve_run_dir(ref: str) -> Path:
    """A run directory as given, or the directory of a run id from the runs index."""
    p = Path(ref)
    if p.is_dir():
        return p
    from meshpilot.orchestrator.run.store import find_run
    try:
        return Path(find_run(ref).run_dir)
    except ConfigError as e:
        raise ConfigError("RUN_DIR", ref, reason="is neither a directory nor a recorded run id",
                          fix="give the run directory (`meshpilot status` lists the runs)") from e


def run(args) -> int:
    if args.step is not None and args.step < 0:
        raise ConfigError("--step", args.step, reason="must be >= 0")
    run_dir = resolve_run_dir(args.run)
    if args.job is not None and not Path(args.job).is_file():
        raise ConfigError("--job", args.job, reason="no such file")
    cmd = [sys.executable, "-m", "meshpilot.orchestrator.train.export", str(run_dir), "--out", args.out]
    if args.step is not None:
        cmd += ["--step", str(args.step)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.job:
        cmd += ["--job", args.job]
    return subprocess.run(cmd).returncode
