"""Checkpoints: DeepSpeed save/load made atomic, plus the step, data position and RNG states.

Layout under ``ROOT`` (``RUN_DIR/checkpoints``)::

    ROOT/step_00000010/            complete checkpoints (DeepSpeed's files + meshpilot.json + rng/)
    ROOT/step_00000020.partial/    a checkpoint being written (ignored, removed by the next save)
    ROOT/latest                    text file: the tag of the newest complete checkpoint

Write protocol (all ranks call :meth:`CheckpointManager.save`):
1. every rank writes its DeepSpeed shards and its RNG states into ``TAG.partial/``;
2. barrier; rank 0 writes ``meshpilot.json`` (step, consumed samples, plan and model
   fingerprints), fsyncs every file and the directory, renames ``TAG.partial`` -> ``TAG``,
   then writes ``latest`` through a fsynced temporary file renamed over it (atomic_io); barrier.
A crash at any point leaves ``latest`` naming the previous complete checkpoint.
(Rank 0 renames, so ``ROOT`` must be a filesystem shared by all nodes, as DeepSpeed's own
multi-node checkpoints also assume.)

Expert parameters (``param.meshpilot_expert``) of a plan with ``ep > 1`` are also written by every
rank to ``TAG/experts/rank_RRRRR.pt`` and restored from there: DeepSpeed's MoE checkpointing
only knows its own ``deepspeed.moe.layer.MoE`` modules, so for ours it writes the module states
of dp rank 0 alone, whose experts are not the other ep ranks' (each rank's ZeRO optimizer
partitions are in its own DeepSpeed files and need nothing extra).

Loading checks the metadata before DeepSpeed touches the files, so a checkpoint written by
another plan or model, a missing directory, or a dangling ``latest`` is a
:class:`ConfigError`, not a traceback from inside DeepSpeed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from meshpilot.orchestrator.atomic_io import fsync_path, write_atomic
from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.plan.text import fingerprint as plan_fingerprint
from meshpilot.orchestrator.plan.text import summary as plan_summary

log = logging.getLogger(__name__)

META = "meshpilot.json"
LATEST = "latest"
PARTIAL = ".partial"
EXPERTS = "experts"


def model_fingerprint(job: JobConfig) -> str:
    m = asdict(job.model)
    m.pop("name", None)
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class CheckpointMeta:
    tag: str
    step: int                 # optimizer steps completed
    consumed_samples: int
    plan: str                 # plan_summary
    plan_fingerprint: str
    model_fingerprint: str
    world_size: int
    seed: int
    data: str
    wall_time: float


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def read_latest(root: str | Path, *, key: str = "resume") -> str | None:
    """The tag named by ``ROOT/latest``; None if ROOT has no ``latest``; ConfigError if it dangles."""
    root = Path(root)
    f = root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not tag or not (root / tag / META).is_file():
        raise ConfigError(key, str(root), reason=f"'latest' names checkpoint {tag!r}, which is missing or incomplete",
                          fix=f"point 'latest' at a complete checkpoint under {root}, or start a fresh run dir")
    return tag


def read_meta(ckpt_dir: str | Path, *, key: str = "resume") -> CheckpointMeta:
    p = Path(ckpt_dir) / META
    try:
        return CheckpointMeta(**json.loads(p.read_text()))
    except FileNotFoundError:
        raise ConfigError(key, str(ckpt_dir), reason=f"not a meshpilot checkpoint (no {META})",
                          fix="give a directory written by meshpilot (RUN_DIR/checkpoints or one step_* inside it)") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(ckpt_dir), reason=f"unreadable {META}: {e}") from None


def find_checkpoint(path: str | Path, *, key: str = "resume") -> tuple[Path, str] | None:
    """Resolve a user path to (root, tag): a checkpoints root (uses ``latest``), a run dir, or one step dir.

    Returns None for a root without any checkpoint yet; ConfigError for anything unusable.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, str(path), reason="no such checkpoint directory",
                          fix="give RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_N")
    if not p.is_dir():
        raise ConfigError(key, str(path), reason="is a file, not a checkpoint directory")
    if (p / META).is_file():
        return p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    tag = read_latest(p, key=key)
    if tag is None:
        if any(not d.parent.name.endswith(PARTIAL) for d in p.glob("step_*/" + META)):
            raise ConfigError(key, str(path), reason="has checkpoints but no 'latest' file",
                              fix="give one step_* directory explicitly")
        return None
    return p, tag


class CheckpointManager:
    """Saves and restores one run's checkpoints; every rank holds one (all calls are collective)."""

    def __init__(self, root: str | Path, job: JobConfig, plan: Plan, *, rank: int, world_size: int, keep: int = 2):
        self.root, self.job, self.plan = Path(root), job, plan
        self.rank, self.world_size, self.keep = rank, world_size, max(1, keep)

    # --- checks ------------------------------------------------------------------------------
    def check_compatible(self, meta: CheckpointMeta, where: Path, *, key: str = "resume") -> None:
        fix = ("resume with the job and plan that wrote it, or start a fresh run directory "
               f"(or remove {where.parent})")
        if meta.model_fingerprint != model_fingerprint(self.job):
            raise ConfigError(key, str(where), reason="was written for a different model (model section differs)", fix=fix)
        if meta.plan_fingerprint != plan_fingerprint(self.plan) or meta.world_size != self.world_size:
            raise ConfigError(key, str(where), reason=f"was written by plan [{meta.plan}] on {meta.world_size} ranks; "
                              f"this job runs plan [{plan_summary(self.plan)}] on {self.world_size}", fix=fix)
        if meta.data != self.job.train.data or meta.seed != self.job.train.seed:
            raise ConfigError(key, str(where), reason=f"was trained on data={meta.data!r} seed={meta.seed}; this job "
                              f"has train.data={self.job.train.data!r} train.seed={self.job.train.seed}: the data "
                              "position would not be the same", fix=fix)

    # --- save ----------------------------------------------------------------------------------
    def save(self, engine: Any, *, step: int, consumed_samples: int) -> Path:
        """Save a DeepSpeed engine (module, optimizer, ZeRO shards of every rank; this rank's experts)."""
        def write(d: Path) -> None:
            engine.save_checkpoint(str(self.root), tag=d.name, client_state={"meshpilot_step": step},
                                   save_latest=False)
            experts = self._local_experts(engine)
            if experts:
                (d / EXPERTS).mkdir(exist_ok=True)
                torch.save({n: p.detach().cpu().clone() for n, p in experts.items()}, self._experts_file(d))
        return self.save_with(write, step=step, consumed_samples=consumed_samples)

    def _local_experts(self, engine: Any) -> dict[str, torch.nn.Parameter]:
        """This rank's expert parameters when they differ between ranks (ep > 1), else {}."""
        if self.plan.ep == 1:
            return {}
        return {n: p for n, p in engine.module.named_parameters() if getattr(p, "meshpilot_expert", False)}

    def _experts_file(self, where: Path) -> Path:
        return where / EXPERTS / f"rank_{self.rank:05d}.pt"

    def save_with(self, write: Callable[[Path], None], *, step: int, consumed_samples: int) -> Path:
        """Run ``write(partial_dir)`` on every rank, then complete the checkpoint atomically (collective)."""
        tag = tag_for(step)
        final = self.root / tag
        partial = self.root / (tag + PARTIAL)
        t0 = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        dist.barrier()
        partial.mkdir(parents=True, exist_ok=True)
        write(partial)
        (partial / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), partial / "rng" / f"rank_{self.rank:05d}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = CheckpointMeta(tag=tag, step=step, consumed_samples=consumed_samples, plan=plan_summary(self.plan),
                                  plan_fingerprint=plan_fingerprint(self.plan),
                                  model_fingerprint=model_fingerprint(self.job), world_size=self.world_size,
                                  seed=self.job.train.seed, data=self.job.train.data, wall_time=time.time())
            (partial / META).write_text(json.dumps(asdict(meta), indent=1) + "\n")
            _fsync_tree(partial)
            if final.exists():                       # re-saving the same step (e.g. signal right after a save)
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_path(self.root)
            write_atomic(self.root / LATEST, tag + "\n", sync_dir=True)
            self._prune(tag)
            log.info("rank 0: checkpoint %s written in %.2fs (step %d, %d samples consumed)", final,
                     time.perf_counter() - t0, step, consumed_samples)
        dist.barrier()
        return final

    def _prune(self, newest: str) -> None:
        done = sorted(d for d in self.root.glob("step_*") if d.is_dir() and not d.name.endswith(PARTIAL)
                      and (d / META).is_file())
        for d in done[:-self.keep]:
            if d.name != newest:
                shutil.rmtree(d, ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------
    def load(self, engine: Any, root: Path, tag: str, *, key: str = "resume") -> CheckpointMeta:
        """Validate, then restore engine (module + optimizer) and this rank's RNG states."""
        def read(where: Path) -> None:
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise ConfigError(key, str(where), reason="DeepSpeed found no model states in it (incomplete checkpoint)")
            experts = self._local_experts(engine)
            if experts:
                f = self._experts_file(where)
                if not f.is_file():
                    raise ConfigError(key, str(where), reason=f"has no expert parameters for rank {self.rank} "
                                      f"({f.relative_to(where)}): incomplete checkpoint")
                saved = torch.load(f, map_location="cpu", weights_only=True)
                if set(saved) != set(experts):
                    raise ConfigError(key, str(where), reason=f"its expert parameters for rank {self.rank} do not "
                                      "match this model's")
                with torch.no_grad():
                    for n, p in experts.items():
                        p.copy_(saved[n])
        return self.load_with(read, root, tag, key=key)

    def load_with(self, read: Callable[[Path], None], root: Path, tag: str, *, key: str = "resume") -> CheckpointMeta:
        """Validate the metadata, run ``read(checkpoint_dir)``, restore this rank's RNG states."""
        where = root / tag
        meta = read_meta(where, key=key)
        self.check_compatible(meta, where, key=key)
        rng_file = where / "rng" / f"rank_{self.rank:05d}.pt"
        if not rng_file.is_file():
            raise ConfigError(key, str(where), reason=f"has no RNG state for rank {self.rank}: incomplete checkpoint")
        read(where)
        set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("rank %d: resumed from %s at step %d", self.rank, where, meta.step)
        return meta
