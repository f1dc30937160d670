"""Hardening: each item of the hardening issue, checked on its own (fast unless marked slow).

Security (pickles in checkpoints, which pid `cancel` signals, bind addresses, path-like names,
interpolation, Rich markup), silently wrong training (non-finite values, integrity, steps on
resume, retention), runs that must never stay "running" (lost controllers, `logs -f`, full
disks, stop signals, Ray start failures, two runs on one directory) and clean one-line errors
before any resource is taken. `benchmarks/hardening_replay.py` replays the same faults on real
`meshpilot run`s.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshpilot.orchestrator.config.loader import job_from_dict, load_job
from meshpilot.orchestrator.errors import ConfigError, NonFiniteLoss
from meshpilot.orchestrator.run.controller import FailDecision, FailurePolicy
from meshpilot.orchestrator.run.protocol import Failure, FailureKind, GroupPoll, Progress
from meshpilot.orchestrator.run.store import JobState, RunStore, find_run, process_identity

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
TINY = {"model": "tiny-llama", "cluster": "local",
        "train": {"seq_len": 32, "global_batch": 8, "steps": 6, "precision": "fp32", "data": "demo", "lr": 3e-3},
        "plan": {"dp": 1}}


def cli(*args: str, home: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["MESHPILOT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    from meshpilot.orchestrator.cli.main import main
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- security: nothing in a checkpoint is unpickled ----------------------------------------------

class RunsCode:
    """Pickled, this object makes the unpickler call os.makedirs(path): a stand-in for any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _ckpt(root: Path, job, step: int = 4, world: int = 1) -> Path:
    """A complete meshpilot checkpoint directory (metadata, RNG state of rank 0) without DeepSpeed files."""
    import torch

    from meshpilot.orchestrator.atomic_io import write_atomic
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.plan.text import fingerprint, summary
    from meshpilot.orchestrator.train.checkpoint import CheckpointMeta, file_digest, model_fingerprint, rng_state

    plan = resolve_plan(job)
    d = root / f"step_{step:08d}"
    (d / "rng").mkdir(parents=True)
    torch.save(rng_state(), d / "rng" / "rank_00000.pt")
    (d / "model.bin").write_bytes(os.urandom(4096))
    files = {str(p.relative_to(d)): file_digest(p) for p in d.rglob("*") if p.is_file()}
    meta = CheckpointMeta(tag=d.name, step=step, consumed_samples=step * 8, plan=summary(plan),
                          plan_fingerprint=fingerprint(plan), model_fingerprint=model_fingerprint(job), world_size=world,
                          seed=job.train.seed, data=job.train.data, wall_time=0.0, total_steps=job.train.steps,
                          files=files)
    (d / "meshpilot.json").write_text(json.dumps(meta.__dict__))
    write_atomic(root / "latest", d.name + "\n")
    return d


def _manager(root: Path, job):
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.train.checkpoint import CheckpointManager
    return CheckpointManager(root, job, resolve_plan(job), rank=0, world_size=1)


def test_rng_state_is_plain_tensors_and_round_trips(tmp_path):
    import random

    import numpy as np
    import torch

    from meshpilot.orchestrator.train.checkpoint import rng_state, safe_load, set_rng_state
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(safe_load(tmp_path / "rng.pt", where=tmp_path))       # weights_only=True
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_a_crafted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path):
    import torch
    job = job_from_dict(TINY)
    root = tmp_path / "checkpoints"
    d = _ckpt(root, job)
    marker = tmp_path / "code-ran"
    torch.save({"python": RunsCode(str(marker))}, d / "rng" / "rank_00000.pt")
    with pytest.raises(ConfigError, match="does not unpickle"):
        _manager(root, job).load_with(lambda where: None, root, d.name)
    assert not marker.exists()
    torch.load(d / "rng" / "rank_00000.pt", weights_only=False)     # the old way runs the code
    assert marker.exists()


def test_zeroth_order_state_is_loaded_weights_only(tmp_path):
    import torch

    from meshpilot.orchestrator.train.engine_zo import STATE_FILE, ZOTrainEngine
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "trainer": RunsCode(str(marker))}, tmp_path / STATE_FILE)
    eng = ZOTrainEngine.__new__(ZOTrainEngine)
    with pytest.raises(ConfigError, match="does not unpickle"):
        eng._read(tmp_path)
    assert not marker.exists()


def test_deepspeed_loads_go_through_weights_only(tmp_path):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from meshpilot.orchestrator.train.checkpoint import deepspeed_weights_only

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()
    engine = Engine()
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": RunsCode(str(marker))}, tmp_path / "bad.pt")
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "x": torch.ones(2)}, tmp_path / "ok.pt")
    with deepspeed_weights_only(engine, where=tmp_path):
        ok = engine.checkpoint_engine.load(str(tmp_path / "ok.pt"), map_location="cpu")   # DeepSpeed's own classes
        with pytest.raises(ConfigError, match="does not unpickle"):
            engine.checkpoint_engine.load(str(tmp_path / "bad.pt"), map_location="cpu")
    assert ok["zero_stage"] == ZeroStageEnum(2) and not marker.exists()
    assert "load" not in vars(engine.checkpoint_engine)                  # DeepSpeed's method is back afterwards


# --- security: cancel signals only the run's own controller ---------------------------------------

def _state(tmp_path: Path, pid: int, start: int = 0, cmdline: str = "", state: str = "running") -> RunStore:
    store = RunStore(tmp_path / "run")
    store.run_dir.mkdir(parents=True, exist_ok=True)
    st = JobState(run_id="r", run_dir=str(store.run_dir), state=state, controller_pid=pid,
                  controller_host=socket.gethostname(), controller_start=start, controller_cmdline=cmdline)
    store.write(st)
    return store


def test_cancel_does_not_signal_an_unrelated_process(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        me_start, me_cmd = process_identity(os.getpid())
        # a state.json naming the sleeper's pid with another process's identity (a reused pid) ...
        store = _state(tmp_path, sleeper.pid, me_start, me_cmd)
        assert store.request_cancel() is False
        # ... or with none recorded (cannot be verified): the sleeper is never signalled
        store = _state(tmp_path, sleeper.pid)
        assert store.request_cancel() is False
        time.sleep(0.2)
        assert sleeper.poll() is None
        # the real controller (identity as recorded) is signalled
        start, cmd = process_identity(sleeper.pid)
        store = _state(tmp_path, sleeper.pid, start, cmd)
        assert store.request_cancel() is True
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()


# --- security: bind addresses, token file ---------------------------------------------------------

def _listening(port: int) -> set[str]:
    """The local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            local, state = ln.split()[1], ln.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


def test_rendezvous_store_listens_on_the_given_address_only():
    from meshpilot.comm.ports import bound_address, listen_socket, rendezvous_store
    sock = listen_socket("127.0.0.1")
    port = bound_address(sock)[1]
    store = rendezvous_store(sock, world_size=1)
    sock.close()
    try:
        store.set("k", "v")
        assert _listening(port) == {"0100007F"}                   # 127.0.0.1, not 0.0.0.0 / ::
    finally:
        del store


def test_embedded_ray_is_local_loopback_and_keeps_its_token_private(tmp_path, monkeypatch):
    import ray
    from ray._private import ray_constants, services

    from meshpilot.launch import ray_cluster
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or type("C", (), {"address_info": {}})())
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv(ray_cluster.LOOPBACK_ENV, "1")          # restored after the test
    ray_cluster.connect_ray(None, accelerator="cpu", workers_per_node=2)
    assert calls[0]["address"] == "local"         # never the cluster recorded by an earlier `ray start`
    assert services.get_node_ip_address() == "127.0.0.1" and os.environ[ray_cluster.LOOPBACK_ENV] == "0"
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".ray").stat().st_mode & 0o777 == 0o700


# --- security: names joined into paths --------------------------------------------------------------

def test_run_ids_cannot_leave_the_runs_index(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "runs").mkdir(parents=True)
    outside = tmp_path / "x.json"                      # what home/runs/../../x.json names
    outside.write_text(json.dumps({"run_dir": str(tmp_path)}))
    (tmp_path / "state.json").write_text("{}")
    for ref in ("../../x", "..", "a/b", "*", "x\0y"):
        with pytest.raises(ConfigError, match="valid run id"):
            find_run(ref)


def test_cluster_values_are_plain_preset_names_or_existing_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a plain preset name nor an existing"):
        job_from_dict(TINY, ["cluster=../../cluster_configs/dgx-h100"])
    with pytest.raises(ConfigError, match="neither a plain preset name"):
        job_from_dict(TINY, [f"cluster={tmp_path}/missing.yaml"])
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nnodes: 1\ngpus_per_node: 2\naccelerator: cpu\ngpu: {memory_gib: 8, bf16_tflops: 1, "
                 "fp16_tflops: 1, fp32_tflops: 1, memory_bandwidth_gbs: 10}\nintra_node_bandwidth_gbs: 10\n"
                 "inter_node_bandwidth_gbs: 1\npcie_bandwidth_gbs: 10\ncpu_memory_gib: 16\ncpu_cores: 2\n")
    assert job_from_dict(TINY, [f"cluster={f}"]).cluster.name == "mine"


# --- security: no interpolation in job files -----------------------------------------------------------

def test_interpolation_is_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_SECRET", "s3cr3t")
    f = tmp_path / "job.yaml"
    f.write_text("model: tiny-llama\ncluster: local\ntrain:\n  data: ${oc.env:MESHPILOT_SECRET}\nplan: {dp: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_job(f)
    assert e.value.key == "train.data" and "interpolation" in str(e.value) and "s3cr3t" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        job_from_dict(TINY, ["train.output_dir=${oc.env:MESHPILOT_SECRET}"])
    assert e.value.key == "train.output_dir"
    with pytest.raises(ConfigError, match="model.name"):
        job_from_dict(TINY, ["model.name=${train.data}"])


# --- security: Rich markup in user strings -----------------------------------------------------------

@pytest.mark.parametrize("name", ["[/x]", "[bold]x[/bold]"])
def test_markup_in_names_is_printed_literally(capsys, name):
    rc, out, err = in_process(capsys, "validate", str(QUICKSTART), f"model.name='{name}'")
    assert rc == 0, err
    assert f"model {name}:" in " ".join(out.split())
    rc, out, err = in_process(capsys, "simulate", str(QUICKSTART), f"model.name='{name}'")
    assert rc == 0, err
    assert name in out


# --- silently wrong training: values ------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.lr=1e6", "train.lr"),
    ("model.norm_eps=-1", "model.norm_eps"), ("model.norm_eps=.nan", "model.norm_eps"),
    ("model.rope_theta=0", "model.rope_theta"), ("train.zo_eps=-.inf", "train.zo_eps"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.seed=-1", "train.seed"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("cluster.gpu.memory_gib=.inf", "cluster.gpu.memory_gib"),
    ("cluster.calibration.matmul_tflops=-3", "cluster.calibration.matmul_tflops"),
    ("train.deepspeed_extra={zero_optimisation: {stage: 3}}", "train.deepspeed_extra.zero_optimisation"),
])
def test_non_finite_and_out_of_range_values_are_refused(override, key):
    with pytest.raises(ConfigError) as e:
        job_from_dict(TINY, [override])
    assert e.value.key == key, str(e.value)


def test_deepspeed_key_list_matches_the_installed_deepspeed():
    import deepspeed

    from meshpilot.orchestrator.config.deepspeed_keys import DEEPSPEED_TOP_LEVEL_KEYS
    src = "\n".join(p.read_text(errors="replace") for p in Path(deepspeed.__file__).parent.rglob("*.py"))
    missing = [k for k in DEEPSPEED_TOP_LEVEL_KEYS if f'"{k}"' not in src and f"'{k}'" not in src]
    assert not missing, missing
    job = job_from_dict(TINY, ["train.deepspeed_extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert job.train.deepspeed_extra["zero_optimization"]["reduce_bucket_size"] == 1000


def test_a_non_finite_loss_fails_the_step_and_is_not_retried(tmp_path):
    import torch

    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.train.engine import RunContext, StartupPhases, StepOutcome
    from meshpilot.orchestrator.train.loop import train
    from meshpilot.orchestrator.train.preemption import StopRequest

    class Diverging:
        data_rank = 0

        def set_lr(self, lr): self.lr = lr
        def sync(self): pass
        def grad_norm(self): return None
        def step(self, batches, stop_local):
            list(batches)
            self.n = getattr(self, "n", 0) + 1
            return StepOutcome(loss=2.0 if self.n < 3 else float("nan"), lr=self.lr, stop=False)

    job = job_from_dict(TINY)
    ctx = RunContext(job=job, plan=resolve_plan(job), rank=0, world_size=1, device=torch.device("cpu"),
                     run_dir=tmp_path, tensorboard=False, log_every=1000)
    with pytest.raises(NonFiniteLoss) as e:
        train(ctx, Diverging(), StopRequest(0), StartupPhases())
    assert e.value.step == 3 and math.isnan(e.value.loss)
    assert not (tmp_path / "checkpoints").exists()
    # as the Ray group reports it: the controller fails the run at once
    f = Failure(FailureKind.WORKER_ERROR, f"NonFiniteLoss: {e.value} (see logs/rank0.log)", rank=0)
    assert isinstance(FailurePolicy(max_restarts=3).decide(f, 0), FailDecision)


# --- silently wrong training: checkpoints -------------------------------------------------------------

def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    from meshpilot.orchestrator.train.checkpoint import find_checkpoint
    job = job_from_dict(TINY)
    root = tmp_path / "checkpoints"
    _ckpt(root, job, step=2)
    d4 = _ckpt(root, job, step=4)
    assert find_checkpoint(tmp_path) == (root, d4.name)
    with open(d4 / "model.bin", "r+b") as f:              # truncated
        f.truncate(100)
    assert find_checkpoint(tmp_path) == (root, "step_00000002")
    assert "damaged" in caplog.text
    with pytest.raises(ConfigError, match="damaged"):     # an explicitly named damaged checkpoint is an error
        find_checkpoint(d4)
    # a bit flip keeps the size: found by the SHA-256 check before loading
    d4.rename(tmp_path / "gone")
    d4 = _ckpt(root, job, step=4)
    data = bytearray((d4 / "model.bin").read_bytes())
    data[7] ^= 1
    (d4 / "model.bin").write_bytes(bytes(data))
    assert find_checkpoint(tmp_path) == (root, d4.name)
    assert _manager(root, job).resolve_verified(root, d4.name) == "step_00000002"


def test_train_steps_below_the_checkpoint_is_refused_and_above_extends(tmp_path, caplog):
    from meshpilot.orchestrator.run.session import check_resume_steps
    from meshpilot.orchestrator.train.checkpoint import read_meta
    job = job_from_dict(TINY)
    d = _ckpt(tmp_path / "checkpoints", job, step=4)
    shorter = job_from_dict(TINY, ["train.steps=3"])
    with pytest.raises(ConfigError) as e:
        _manager(tmp_path / "checkpoints", shorter).check_compatible(read_meta(d), d)
    assert e.value.key == "train.steps" and "step 4" in str(e.value)
    with pytest.raises(ConfigError, match="train.steps"):
        check_resume_steps(tmp_path, 3)                         # `meshpilot run`: before Ray starts
    longer = job_from_dict(TINY, ["train.steps=10"])
    _manager(tmp_path / "checkpoints", longer).check_compatible(read_meta(d), d, warn_steps=True)
    check_resume_steps(tmp_path, 10)
    assert "train.steps changed on resume" in caplog.text and "extending the run" in caplog.text


def test_checkpoint_retention_is_configurable(tmp_path):
    job = job_from_dict(TINY, ["train.keep_checkpoints=3"])
    assert job_from_dict(TINY).train.keep_checkpoints == 2 and job.train.keep_checkpoints == 3
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8, 10):
        _ckpt(root, job, step=s)
    m = _manager(root, job)
    m.keep = job.train.keep_checkpoints
    m._prune("step_00000008")                 # keeps 3 up to the newest; drops one newer than it
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]


# --- runs that must never stay "running" ----------------------------------------------------------------

def test_a_run_whose_controller_died_is_recorded_lost(tmp_path, capsys):
    p = subprocess.Popen(["sleep", "30"])
    start, cmd = process_identity(p.pid)
    store = _state(tmp_path, p.pid, start, cmd)
    assert store.reconcile().state == "running"          # alive
    p.kill()
    p.wait()
    st = store.reconcile()
    assert st.state == "failed" and st.message.startswith("lost:") and store.read().state == "failed"
    assert [e for e in store.events() if e.get("lost")]
    # the lock decides where there is one: free -> lost, held -> alive
    store = _state(tmp_path, os.getpid(), *process_identity(os.getpid()))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('ok', flush=True); time.sleep(30)",
                               str(store.lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert store.controller_alive() and store.reconcile().state == "running"
    finally:
        holder.kill()
        holder.wait()
    assert not store.controller_alive() and store.reconcile().state == "failed"


def test_logs_follow_and_cancel_end_when_the_controller_is_gone(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = _state(tmp_path, dead.pid, 1, "x")
    store.controller_log.write_text("last line\n")
    t0 = time.time()
    rc, out, _ = in_process(capsys, "logs", str(store.run_dir), "--follow")
    assert rc == 0 and "last line" in out and time.time() - t0 < 10
    assert store.read().state == "failed"
    store = _state(tmp_path, dead.pid, 1, "x")
    rc, out, _ = in_process(capsys, "cancel", str(store.run_dir), "--wait", "5")
    assert rc == 0 and "already ended: failed" in out


def test_a_full_disk_still_records_the_final_state(tmp_path, monkeypatch):
    import meshpilot.orchestrator.run.store as store_mod
    store = _state(tmp_path, os.getpid(), *process_identity(os.getpid()))
    st = store.read()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_mod, "write_atomic", full)
    st.state, st.message = "failed", "worker_died: rank 1"
    store.write(st)                                        # in place, in the blocks state.json already has
    assert json.loads(store.state_path.read_text())["state"] == "failed"
    store.append_event("transition", new="failed")          # logged, not raised


class _Group:
    def __init__(self, polls):
        self.polls = list(polls)

    def start(self, attempt):
        return [1, 2]

    def poll(self):
        return self.polls.pop(0) if self.polls else GroupPoll()

    def stop(self, grace_s):
        pass

    def shutdown(self):
        pass


def _session(tmp_path, monkeypatch, run_dir="run"):
    from meshpilot.orchestrator.run.session import RunSession, plan_job
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job = load_job(str(QUICKSTART), ["train.steps=5"])
    plan, est = plan_job(job)
    return RunSession.create(job, plan, est, job_path=str(QUICKSTART), run_dir=str(tmp_path / run_dir))


def test_session_full_disk_and_stop_signal(tmp_path, monkeypatch):
    import meshpilot.orchestrator.run.store as store_mod
    s = _session(tmp_path, monkeypatch)
    try:
        real = store_mod.write_atomic

        def full(path, *a, **k):
            if Path(path).name == "state.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, *a, **k)
        monkeypatch.setattr(store_mod, "write_atomic", full)
        result = {"rank": 0, "step": 5, "final_loss": 2.0, "status": "completed"}
        outcome = s.run(lambda d, lp: _Group([GroupPoll(progress=Progress(5, {"loss": 2.0})),
                                              GroupPoll(results=[result, dict(result, rank=1)])]),
                        FailurePolicy(max_restarts=0))
        s.finish(outcome)
        assert json.loads(s.store.state_path.read_text())["state"] == "succeeded"
    finally:
        s.close()
    monkeypatch.setattr(store_mod, "write_atomic", real)
    # SIGUSR2 to the controller: the workers are asked to stop (checkpoint), the run ends cancelled
    s = _session(tmp_path, monkeypatch, "run2")
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        outcome = s.run(lambda d, lp: _Group([]), FailurePolicy(max_restarts=0))
        assert outcome.status.value == "cancelled" and "SIGUSR2" in outcome.message
        assert s.store.read().state == "cancelled"
    finally:
        s.close()


def test_ray_start_failure_fails_the_run(tmp_path, monkeypatch):
    s = _session(tmp_path, monkeypatch)
    try:
        def broken():
            raise RuntimeError("The current node timed out during startup.")
        with pytest.raises(ConnectionError, match="Ray did not start"):
            s.connect(broken)
        st = s.store.read()
        assert st.state == "failed" and "timed out during startup" in st.message
    finally:
        s.close()


def test_two_runs_on_one_run_directory(tmp_path, monkeypatch):
    s = _session(tmp_path, monkeypatch)
    try:
        with pytest.raises(ConfigError, match=f"in use by meshpilot run pid {os.getpid()}"):
            _session(tmp_path, monkeypatch)
    finally:
        s.close()
    _session(tmp_path, monkeypatch).close()          # free again once the first one ended


def test_a_signal_to_a_ray_worker_process_becomes_a_stop_request():
    from meshpilot.launch.actor import GangWorker
    cls = GangWorker.__ray_metadata__.modified_class
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        w = cls()                                        # Ray creates the actor in the process's main thread
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
        assert w._stop.is_set() and w.stop_signal == "SIGUSR2"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- clean errors before any resource is taken -----------------------------------------------------------

def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("nodes: [1,\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    listjson = tmp_path / "list" / "config.json"
    listjson.parent.mkdir()
    listjson.write_text("[1, 2]")
    binjson = tmp_path / "bin" / "config.json"
    binjson.parent.mkdir()
    binjson.write_bytes(b"\xff\xfe{}")
    afile = tmp_path / "afile"
    afile.write_text("x")
    from meshpilot.orchestrator.train.data import write_token_file
    import numpy as np
    tokens = write_token_file(np.arange(1000) % 300, tmp_path / "tok.bin")
    return [
        ([f"cluster={bad_yaml}"], "not valid YAML"),
        ([f"cluster={latin}"], "not UTF-8"),
        ([f"model={listjson}"], "JSON object"),
        ([f"model={binjson}"], "not UTF-8"),
        (["model.name=" + "n" * 100_000], "too long"),
        (["cluster=" + "c" * 5000 + ".yaml"], "neither a plain preset"),
        (["train.output_dir=" + "d" * 300], "too long"),
        ([f"train.output_dir={afile}/runs"], "is a file"),
        (["train.output_dir=/proc/1/runs"], "not writable"),
        ([f"train.data={tokens}"], "token id 299 >= model.vocab=256"),
        ([f"train.data={tmp_path}/missing.bin"], "no such token file"),
        (["train.seed=-1"], "train.seed"),
        (["train.deepspeed_extra={trian_batch_size: 8}"], "not a DeepSpeed config key"),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    for overrides, words in _bad_inputs(tmp_path):
        t0 = time.time()
        rc, out, err = in_process(capsys, "validate", str(QUICKSTART), *overrides)
        assert rc == 2, (overrides[0][:80], out[-300:], err[-300:])
        assert err.startswith("meshpilot: error: ") and err.count("\n") == 1 and len(err) < 2000, err[:500]
        assert words in err, (words, err)
        assert time.time() - t0 < 10


def test_non_utf8_job_file_and_run_refusal_before_ray(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_bytes(b"model: tiny-llama\ncluster: local\ntrain: {data: \xff}\n")
    r = cli("validate", str(f))
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(QUICKSTART), "train.seed=-1", "--run-dir", str(tmp_path / "run"), home=tmp_path / "home")
    assert r.returncode == 2 and "train.seed" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()


def test_layout_of_a_very_large_world_is_summarised(capsys):
    t0 = time.time()
    rc, out, err = in_process(capsys, "validate", str(QUICKSTART), "cluster.nodes=2048", "cluster.gpus_per_node=8",
                              "plan.dp=16384", "train.global_batch=16384", "plan.micro_batch=1")
    assert rc == 0, err
    assert "the last 8 of 16384" in out and "16383" in out and "(16384 ranks)" in out
    assert out.count("\n") < 180 and time.time() - t0 < 30


# --- slow: a real checkpoint damaged on disk (DeepSpeed, gloo, one process) ---------------------------------

def _lives(rank: int, world: int, tmp: str, life: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_utils import run, tiny_job
    job = tiny_job({"dp": 1, "zero_stage": 1}, steps=8, checkpoint_every=2)
    if life == "full":
        return run(job, rank, world, f"{tmp}/full", resume=False)
    if life == "killed":
        def die(rec: dict) -> None:
            if rec["step"] == 7:                  # after the step-6 checkpoint
                os._exit(17)
        return run(job, rank, world, f"{tmp}/killed", on_step=die, resume=False)
    return run(job, rank, world, f"{tmp}/killed")


@pytest.mark.slow
def test_a_damaged_checkpoint_on_disk_resumes_from_the_previous_one(tmp_path, caplog):
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_utils import DistributedWorkerError, run_distributed
    full = run_distributed(_lives, 1, str(tmp_path), "full", timeout=600)[0]
    with pytest.raises(DistributedWorkerError):
        run_distributed(_lives, 1, str(tmp_path), "killed", timeout=600)
    root = tmp_path / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    shard = max((root / "step_00000006").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                        # silent corruption: same size
    shard.write_bytes(bytes(data))
    resumed = run_distributed(_lives, 1, str(tmp_path), "resume", timeout=600)[0]
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    assert resumed["losses"] == pytest.approx(full["losses"][4:], rel=1e-6, abs=0)
    assert resumed["param_checksum"] == pytest.approx(full["param_checksum"], rel=1e-9)


# --- slow: what an embedded Ray listens on ----------------------------------------------------------------

_HOLD_RAY = r"""
import sys
from meshpilot.launch.ray_cluster import connect_ray
s = connect_ray(None, accelerator="cpu", workers_per_node=1)
print("up", flush=True)
sys.stdin.read()
s.close()
"""


def _listening_sockets(pids: list[int]) -> dict[str, list[int]]:
    """local address (hex, as in /proc/net/tcp*) -> ports, of the listening TCP sockets of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out: dict[str, list[int]] = {}
    for name in ("tcp", "tcp6"):
        for ln in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = ln.split()
            if f[3] == "0A" and f[9] in inodes:
                addr, port = f[1].split(":")
                out.setdefault(addr, []).append(int(port, 16))
    return out


@pytest.mark.slow
def test_an_embedded_ray_listens_on_loopback_only(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-c", _HOLD_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "up"
        time.sleep(3)                                   # the agents open their ports after the start
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    kids.setdefault(int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        tree, i = [p.pid], 0
        while i < len(tree):
            tree += kids.get(tree[i], [])
            i += 1
        listening = _listening_sockets(tree)
        loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
        assert listening and set(listening) <= loopback, listening
        assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
