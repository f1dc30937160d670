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

Integrity: ``meshpilot.json`` records every file's size and SHA-256 (hashed at save by all ranks,
each a share of the files). :func:`find_checkpoint` checks presence and sizes, and the loop
(:meth:`CheckpointManager.resolve_verified`, collective) the hashes before loading; a damaged or
truncated newest checkpoint falls back to the previous complete one with a warning. The hashes
detect damage, not tampering: whoever can write the run directory can rewrite them too.

Nothing is unpickled: RNG states are plain tensors and numbers (``rng/rank_R.pt``), the
zeroth-order state is tensors and numbers, and every ``torch.load`` here (and DeepSpeed's own,
through :func:`deepspeed_weights_only`) uses ``weights_only=True``; DeepSpeed's optimizer files
need a few of its own plain classes, allow-listed in :data:`DEEPSPEED_SAFE_GLOBALS`. A file that
holds anything else is refused with a ConfigError instead of being executed. (DeepSpeed's NVMe
offload swap files, which meshpilot does not use, are loaded by DeepSpeed outside this path.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    """A hash of the model section (the shapes a checkpoint must match). Not hashed: the name, the
    weights' source ``path`` (where the starting weights came from; a resumed run reads its own
    checkpoint), ``qkv_bias`` while false and ``implementation`` while builtin (fingerprints written before
those fields existed stay valid)."""
    m = asdict(job.model)
    m.pop("name", None)
    m.pop("path", None)
    if not m.get("qkv_bias"):
        m.pop("qkv_bias", None)
    if m.get("implementation") == "builtin":            # as before the field existed
        m.pop("implementation", None)
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
    total_steps: int = 0      # train.steps of the run that wrote it (0: unknown, an older checkpoint)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # relative path -> {"size", "sha256"}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers only (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    py, npy = st["python"], st["numpy"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()),
                     None if py["gauss"] is None else float(py["gauss"])))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def safe_load(path: Path, *, where: Path, key: str = "resume", what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file holding anything but tensors and
    plain data (a pickle that could run code) or an unreadable one is a ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(key, str(where), reason=f"its {what} {path.name} holds Python objects that meshpilot does "
                          f"not unpickle (a crafted checkpoint could run code): {_first_line(e)}",
                          fix="resume only from checkpoints you wrote; an older meshpilot's checkpoint must be "
                          "resumed by that version, or start a fresh run directory") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(key, str(where), reason=f"its {what} {path.name} is unreadable (damaged or truncated): "
                          f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:                # torch's message: the unsupported global is on its own line
        if "Unsupported global" in ln or "GLOBAL" in ln:
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


# DeepSpeed's own classes in its optimizer checkpoints (ZeRO 1-3, bf16 and fp16 optimizers of
# DeepSpeed 0.19): plain data holders, safe to rebuild; found with
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of every stage
DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",)))


def deepspeed_safe_globals() -> list[Any]:
    out: list[Any] = []
    for mod, names in DEEPSPEED_SAFE_GLOBALS:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        out += [getattr(m, n) for n in names if hasattr(m, n)]
    return out


@contextlib.contextmanager
def deepspeed_weights_only(engine: Any, *, where: Path, key: str = "resume") -> Iterator[None]:
    """While DeepSpeed loads a checkpoint: every file goes through ``torch.load(weights_only=True)``
    with DeepSpeed's few plain classes allowed (its own TorchCheckpointEngine passes
    ``weights_only=False``, which runs any pickled code)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield
        return
    allowed = deepspeed_safe_globals()
    had = "load" in vars(ce)
    old = vars(ce).get("load")

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(key, str(where), reason=f"DeepSpeed file {Path(path).name} holds Python objects that "
                              f"meshpilot does not unpickle (a crafted checkpoint could run code): {_first_line(e)}",
                              fix="resume only from checkpoints you wrote, or start a fresh run directory") from None

    ce.load = load
    try:
        yield
    finally:
        if had:
            ce.load = old
        else:
            del ce.load


# --- integrity ----------------------------------------------------------------------------------

def file_digest(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return {"size": size, "sha256": h.hexdigest()}


def _checkpoint_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != META)


def check_files(d: Path, meta: CheckpointMeta, *, full: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of checkpoint ``d`` against its recorded files: missing, wrong size and, with
    ``full``, wrong SHA-256 (only files ``share[0]::share[1]`` of the sorted list are hashed)."""
    problems = []
    names = sorted(meta.files)
    for i, name in enumerate(names):
        rec, f = meta.files[name], d / name
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != rec.get("size"):
            problems.append(f"{name} has {size} bytes, {rec.get('size')} were written")
        elif full and i % share[1] == share[0] and file_digest(f)["sha256"] != rec.get("sha256"):
            problems.append(f"{name} does not match its SHA-256 (damaged)")
    return problems


def read_latest(root: str | Path, *, key: str = "resume") -> str | None:
    """The tag named by ``ROOT/latest``; None if ROOT has no ``latest``; ConfigError if it dangles."""
    root = Path(root)
    f = root / LATEST
    if not f.is_file():
        return None
    tag = f.read_text(errors="replace").strip()
    if not tag or "/" in tag or tag.startswith(".") or not (root / tag / META).is_file():
        raise ConfigError(key, str(root), reason=f"'latest' names checkpoint {tag[:80]!r}, which is missing or incomplete",
                          fix=f"point 'latest' at a complete checkpoint under {root}, or start a fresh run dir")
    return tag


def read_meta(ckpt_dir: str | Path, *, key: str = "resume") -> CheckpointMeta:
    p = Path(ckpt_dir) / META
    try:
        d = json.loads(p.read_text())
        names = {f.name for f in dataclasses.fields(CheckpointMeta)}
        return CheckpointMeta(**{k: v for k, v in d.items() if k in names})
    except FileNotFoundError:
        raise ConfigError(key, str(ckpt_dir), reason=f"not a meshpilot checkpoint (no {META})",
                          fix="give a directory written by meshpilot (RUN_DIR/checkpoints or one step_* inside it)") from None
    except (ValueError, TypeError, AttributeError, OSError) as e:
        raise ConfigError(key, str(ckpt_dir), reason=f"unreadable {META}: {str(e)[:200]}") from None


def complete_tags(root: Path) -> list[str]:
    """Tags of the complete checkpoints under ``root`` (with their metadata), newest first."""
    return sorted((d.name for d in root.glob("step_*") if d.is_dir() and not d.name.endswith(PARTIAL)
                   and (d / META).is_file()), reverse=True)


def candidates(root: Path, latest: str) -> list[str]:
    """The checkpoints to try, best first: ``latest``, then the older complete ones."""
    step = int(latest.split("_")[-1]) if latest.split("_")[-1].isdigit() else -1
    return [latest] + [t for t in complete_tags(root) if t != latest and int(t.split("_")[-1]) < step]


def usable(root: Path, tag: str, *, key: str = "resume") -> tuple[CheckpointMeta | None, list[str]]:
    """(metadata, problems) of ``root/tag`` by the cheap checks: readable metadata, every recorded
    file present with its size."""
    try:
        meta = read_meta(root / tag, key=key)
    except ConfigError as e:
        return None, [str(e)]
    return meta, check_files(root / tag, meta, full=False)


def find_checkpoint(path: str | Path, *, key: str = "resume") -> tuple[Path, str] | None:
    """Resolve a user path to (root, tag): a checkpoints root (uses ``latest``), a run dir, or one step dir.

    Returns None for a root without any checkpoint yet; ConfigError for anything unusable. Through
    ``latest``, a damaged newest checkpoint (metadata unreadable, a file missing or of the wrong
    size; or a dangling ``latest``) falls back to the previous complete one, with a warning.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, str(path), reason="no such checkpoint directory",
                          fix="give RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_N")
    if not p.is_dir():
        raise ConfigError(key, str(path), reason="is a file, not a checkpoint directory")
    if (p / META).is_file():
        _, problems = usable(p.parent, p.name, key=key)
        if problems:
            raise ConfigError(key, str(path), reason="is damaged: " + "; ".join(problems[:3]),
                              fix="give an earlier step_* directory")
        return p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    latest = read_latest(p, key=key)          # ConfigError when it names a missing directory
    if latest is None:
        if any(not d.parent.name.endswith(PARTIAL) for d in p.glob("step_*/" + META)):
            raise ConfigError(key, str(path), reason="has checkpoints but no 'latest' file",
                              fix="give one step_* directory explicitly")
        return None
    tried: list[str] = []
    for tag in candidates(p, latest):
        _, problems = usable(p, tag, key=key)
        if not problems:
            if tried:
                log.warning("checkpoint %s is damaged (%s); resuming from %s, the previous complete one",
                            latest, "; ".join(tried)[:500], tag)
            return p, tag
        tried.append(f"{tag}: {'; '.join(problems[:2])}")
    raise ConfigError(key, str(path), reason="has no usable checkpoint: " + "; ".join(tried)[:600],
                      fix="start a fresh run directory (or restore the checkpoint files)")


class CheckpointManager:
    """Saves and restores one run's checkpoints; every rank holds one (all calls are collective)."""

    def __init__(self, root: str | Path, job: JobConfig, plan: Plan, *, rank: int, world_size: int, keep: int = 2):
        self.root, self.job, self.plan = Path(root), job, plan
        self.rank, self.world_size, self.keep = rank, world_size, max(1, keep)

    # --- checks ------------------------------------------------------------------------------
    def check_compatible(self, meta: CheckpointMeta, where: Path, *, key: str = "resume",
                         warn_steps: bool = False) -> None:
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
        steps = self.job.train.steps
        if meta.step > steps:
            raise ConfigError("train.steps", steps, reason=f"is below the step of the checkpoint to resume from "
                              f"({where.name}: step {meta.step})",
                              fix=f"set train.steps>={meta.step} to continue this run, or start a fresh run directory")
        if warn_steps and meta.total_steps and meta.total_steps != steps and self.rank == 0:
            log.warning("train.steps changed on resume: the checkpoint %s (step %d) was written by a run of %d steps, "
                        "this one trains to %d; the learning-rate schedule (warmup + cosine over train.steps) "
                        "differs from step %d on", where.name, meta.step, meta.total_steps, steps, meta.step)

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
        files = self._digests(partial)
        if self.rank == 0:
            meta = CheckpointMeta(tag=tag, step=step, consumed_samples=consumed_samples, plan=plan_summary(self.plan),
                                  plan_fingerprint=plan_fingerprint(self.plan),
                                  model_fingerprint=model_fingerprint(self.job), world_size=self.world_size,
                                  seed=self.job.train.seed, data=self.job.train.data, wall_time=time.time(),
                                  total_steps=self.job.train.steps, files=files)
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

    def _digests(self, d: Path) -> dict[str, dict[str, Any]]:
        """Size and SHA-256 of every file of the checkpoint being written (collective: each rank
        hashes a share of the files; the result is complete on every rank)."""
        names = _checkpoint_files(d)
        mine = {n: file_digest(d / n) for n in names[self.rank::self.world_size]}
        if self.world_size == 1 or not dist.is_initialized():
            return mine
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def _prune(self, newest: str) -> None:
        """Keep the ``keep`` newest complete checkpoints; drop any newer than ``newest`` (left by a
        run that resumed from an earlier one, e.g. after a damaged checkpoint)."""
        done = sorted(d for d in self.root.glob("step_*") if d.is_dir() and not d.name.endswith(PARTIAL)
                      and (d / META).is_file() and d.name <= newest)
        for d in done[:-self.keep]:
            if d.name != newest:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob("step_*"):
            if d.is_dir() and not d.name.endswith(PARTIAL) and d.name > newest:
                log.warning("rank 0: removing %s, a checkpoint newer than the one just written (%s)", d.name, newest)
                shutil.rmtree(d, ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------
    def load(self, engine: Any, root: Path, tag: str, *, key: str = "resume") -> CheckpointMeta:
        """Validate, then restore engine (module + optimizer) and this rank's RNG states."""
        def read(where: Path) -> None:
            with deepspeed_weights_only(engine, where=where, key=key):
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
                saved = safe_load(f, where=where, key=key, what="expert parameters")
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
        self.check_compatible(meta, where, key=key, warn_steps=True)
        rng_file = where / "rng" / f"rank_{self.rank:05d}.pt"
        if not rng_file.is_file():
            raise ConfigError(key, str(where), reason=f"has no RNG state for rank {self.rank}: incomplete checkpoint")
        rng = safe_load(rng_file, where=where, key=key, what="RNG state")
        read(where)
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise ConfigError(key, str(where), reason=f"its RNG state {rng_file.name} is not in meshpilot's format: "
                              f"{str(e)[:200]}") from None
        log.info("rank %d: resumed from %s at step %d", self.rank, where, meta.step)
        return meta

    def resolve_verified(self, root: Path, tag: str, *, key: str = "resume") -> str:
        """The checkpoint to load, its files' SHA-256 checked against the metadata (collective: each
        rank hashes a share, every rank gets the same answer). A damaged ``tag`` that ``latest``
        names falls back to the previous complete checkpoint with a warning; a damaged
        checkpoint given explicitly is a ConfigError."""
        try:
            latest = read_latest(root, key=key)
        except ConfigError:
            latest = None
        tags = candidates(root, tag) if tag == latest else [tag]
        tried: list[str] = []
        t0 = time.perf_counter()
        for t in tags:
            meta, problems = usable(root, t, key=key)
            if meta is not None and not problems:
                problems = check_files(root / t, meta, full=True, share=(self.rank, self.world_size))
            problems = self._all_problems(problems)
            if not problems:
                if meta is not None and not meta.files and self.rank == 0:
                    log.warning("checkpoint %s records no checksums (written by an older meshpilot): not verified", t)
                if tried:
                    log.warning("rank %d: checkpoint %s is damaged (%s); resuming from %s, the previous complete one",
                                self.rank, tag, "; ".join(tried)[:500], t)
                elif self.rank == 0:
                    log.info("rank 0: checkpoint %s verified (%d files) in %.2fs", t, len(meta.files) if meta else 0,
                             time.perf_counter() - t0)
                return t
            tried.append(f"{t}: {'; '.join(problems[:2])}")
        raise ConfigError(key, str(root / tag), reason="is damaged: " + "; ".join(tried)[:600],
                          fix="start a fresh run directory, or resume from an earlier step_* directory")

    def _all_problems(self, mine: list[str]) -> list[str]:
        if self.world_size == 1 or not dist.is_initialized():
            return mine
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return sorted({p for part in parts for p in part})
