"""Replay bad inputs and injected faults through the real `meshpilot` commands; print a table.

Bad inputs: job files and overrides, generated into a temporary folder, each given to
``meshpilot validate`` and to ``meshpilot run`` (the run must exit before Ray starts). For
every invocation: a clean exit 2 (one line on stderr, starting "meshpilot: error:"), a
traceback, or a wrong value accepted silently (exit 0, or a run that started Ray).

Faults, on the CPU quickstart (examples/quickstart.yaml, 2 CPU workers on an embedded Ray,
more steps so that a fault lands mid-run):

* controller SIGKILL; then the stale state it leaves: `status`, `logs -f` and `cancel` from
  another shell must end it (recorded failed, "lost"); then the run is resumed;
* SIGTERM to every process of the run (a pod eviction); resumed;
* SIGUSR2 to the controller (a scheduler's preemption notice); resumed;
* SIGKILL of one worker (the controller restarts the gang from the latest checkpoint);
* SIGUSR2 to one worker, then one file of the latest checkpoint damaged (a bit flipped, same
  size); resumed (falls back to the previous checkpoint);
* two `meshpilot run` on one run directory (the second must exit 2 naming the holder).

Per fault: whether the run was left non-terminal (state.json after the fault and one
`meshpilot status`), and whether the run, resumed (or restarted), ends with the final loss and
parameter checksum of an uninterrupted run of the same job.

    python benchmarks/hardening_replay.py --out benchmarks/results/2026-11-29-cpu     # ~8 min on 2 cores

Writes ``hardening_replay.txt`` and ``hardening_replay.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# the fault runs: long enough for a fault to land while the workers train, checkpoints every 10
FAULT_JOB = ["train.steps=400", "train.checkpoint_every=10"]


# --- running the CLI ------------------------------------------------------------------------------

def env_for(home: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ, MESHPILOT_HOME=str(home), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("MESHPILOT_FAIL_AT_STEP", None)
    if env.get("PYTHONDONTWRITEBYTECODE") and not env.get("PYTHONPYCACHEPREFIX"):
        env["PYTHONPYCACHEPREFIX"] = str(cache)      # otherwise every worker compiles torch/DeepSpeed (minutes)
    return env


def meshpilot(args: list[str], env: dict[str, str], timeout: float = 120, cwd: Optional[Path] = None) -> dict[str, Any]:
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", *args], capture_output=True,
                           text=True, env=env, timeout=timeout, errors="replace", cwd=cwd)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, str(e.stdout or ""), str(e.stderr or "") + f"\n(timed out after {timeout}s)"
    return {"rc": rc, "stdout": out, "stderr": err, "seconds": round(time.time() - t0, 2)}


def classify(r: dict[str, Any], command: str) -> str:
    """clean | traceback | accepted | other."""
    text = r["stdout"] + r["stderr"]
    if "Traceback" in text:
        return "traceback"
    err = r["stderr"].strip()
    started_ray = command == "run" and ("starting Ray" in text or "Ray did not start" in text or "worker(s) started" in text)
    if r["rc"] == 2 and err.startswith("meshpilot: error: ") and err.count("\n") == 0 and not started_ray:
        return "clean"
    if r["rc"] == 0 or started_ray:
        return "accepted"
    return "other"


# --- bad inputs ---------------------------------------------------------------------------------------

def bad_inputs(d: Path) -> list[dict[str, Any]]:
    """Every case: a job file (default the quickstart), overrides, the commands to try, and the words the
    error must contain."""
    import numpy as np

    from meshpilot.orchestrator.train.data import write_token_file

    def f(name: str, data: str | bytes) -> str:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    q = QUICKSTART.read_text()
    tok_big = write_token_file(np.arange(2000) % 300, d / "tok_big.bin")          # ids up to 299, vocab 256
    tok_lie = write_token_file(np.arange(2000) % 200, d / "tok_lie.bin")
    side = json.loads(Path(str(tok_lie) + ".json").read_text())
    np.full(2000, 900, dtype=np.uint16).tofile(tok_lie)                        # ids 900; the sidecar says 199
    Path(str(tok_lie) + ".json").write_text(json.dumps(side))
    tok_cut = write_token_file(np.arange(2000) % 200, d / "tok_cut.bin")
    with open(tok_cut, "r+b") as fh:
        fh.truncate(1000)
    hf = '{"model_type": "llama", "hidden_size": 64}'
    cases: list[tuple[str, Optional[str], list[str], str]] = [
        # name, job file (None: quickstart), overrides, words in the error
        ("lr inf", None, ["train.lr=.inf"], "finite"),
        ("lr nan", None, ["train.lr=.nan"], "finite"),
        ("lr negative", None, ["train.lr=-0.1"], "train.lr"),
        ("lr huge", None, ["train.lr=1e6"], "train.lr"),
        ("norm_eps negative", None, ["model.norm_eps=-1"], "model.norm_eps"),
        ("norm_eps nan", None, ["model.norm_eps=.nan"], "model.norm_eps"),
        ("rope_theta zero", None, ["model.rope_theta=0"], "model.rope_theta"),
        ("zo_eps -inf", None, ["train.zo_eps=-.inf"], "train.zo_eps"),
        ("weight_decay negative", None, ["train.weight_decay=-1"], "train.weight_decay"),
        ("grad_clip negative", None, ["train.grad_clip=-1"], "train.grad_clip"),
        ("seed negative", None, ["train.seed=-1"], "train.seed"),
        ("seed beyond 2**32", None, ["train.seed=99999999999"], "train.seed"),
        ("keep_checkpoints 0", None, ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        ("steps 0", None, ["train.steps=0"], "train.steps"),
        ("global_batch negative", None, ["train.global_batch=-8"], "train.global_batch"),
        ("checkpoint_every negative", None, ["train.checkpoint_every=-1"], "train.checkpoint_every"),
        ("gpu memory inf", None, ["cluster.gpu.memory_gib=.inf"], "cluster.gpu.memory_gib"),
        ("cpu cores 0", None, ["cluster.cpu_cores=0"], "cluster.cpu_cores"),
        ("calibration negative", None, ["cluster.calibration.matmul_tflops=-3"], "matmul_tflops"),
        ("capacity_factor nan", None, ["model.capacity_factor=.nan"], "model.capacity_factor"),
        ("deepspeed_extra misspelt section", None, ["train.deepspeed_extra={zero_optimisation: {stage: 3}}"],
         "not a DeepSpeed config key"),
        ("deepspeed_extra misspelt key", None, ["train.deepspeed_extra={trian_batch_size: 8}"],
         "not a DeepSpeed config key"),
        ("plan tp 3", None, ["plan.tp=3"], "plan.tp"),
        ("zero stage 7", None, ["plan.zero_stage=7"], "plan.zero_stage"),
        ("100 KB model name", None, ["model.name=" + "n" * 100_000], "too long"),
        ("name with a newline", None, ['model.name="a\\nb"'], "control characters"),
        ("cluster path traversal", None, ["cluster=../../cluster_configs/dgx-h100"], "plain preset name"),
        ("cluster malformed YAML", None, [f"cluster={f('c_bad.yaml', 'nodes: [1,')}"], "not valid YAML"),
        ("cluster not UTF-8", None, [f"cluster={f('c_latin.yaml', b'name: caf' + bytes([0xE9]))}"], "not UTF-8"),
        ("cluster YAML list", None, [f"cluster={f('c_list.yaml', '- 1')}"], "mapping"),
        ("cluster 5000-char name", None, ["cluster=" + "c" * 5000 + ".yaml"], "plain preset name"),
        ("config.json a list", None, [f"model={f('hf_list/config.json', '[1, 2]')}"], "JSON object"),
        ("config.json not UTF-8", None, [f"model={f('hf_bin/config.json', bytes([0xFF, 0xFE]) + b'{}')}"], "UTF-8"),
        ("config.json lacks keys", None, [f"model={f('hf_part/config.json', hf)}"], "lacks"),
        ("config.json 5000-char path", None, ["model=" + "m" * 5000 + ".json"], "model"),
        ("job file not UTF-8", f("latin.yaml", q.encode() + b"# caf" + bytes([0xE9]) + b"\n"), [], "UTF-8"),
        ("job file env interpolation", f("interp.yaml", q.replace("data: demo", "data: ${oc.env:HOME}")), [],
         "interpolation"),
        ("override env interpolation", None, ["train.output_dir=${oc.env:HOME}"], "interpolation"),
        ("job file a YAML list", f("list.yaml", "- model\n- cluster\n"), [], "mapping"),
        ("job file duplicate key", f("dup.yaml", q + "model: tiny-gpt2\n"), [], "cannot parse"),
        ("job file python tag", f("tag.yaml", "model: !!python/object/apply:os.system [echo pwned]\n"), [],
         "cannot parse"),
        ("output_dir under a file", None, [f"train.output_dir={f('afile', 'x')}/runs"], "is a file"),
        ("output_dir not writable", None, ["train.output_dir=/proc/1/runs"], "not writable"),
        ("output_dir name too long", None, ["train.output_dir=" + "o" * 300], "too long"),
        ("token file missing", None, [f"train.data={d}/missing.bin"], "no such token file"),
        ("token ids beyond vocab", None, [f"train.data={tok_big}"], ">= model.vocab"),
        ("token sidecar under-reports", None, [f"train.data={tok_lie}"], ">= model.vocab"),
        ("token file truncated", None, [f"train.data={tok_cut}"], "truncated"),
        ("data empty", None, ["train.data=''"], "train.data"),
    ]
    out = []
    for name, job, overrides, words in cases:
        out.append({"name": name, "job": job or str(QUICKSTART), "overrides": overrides, "words": words,
                    "commands": ["validate", "run"]})
    for ref in ("../../x", "a/../../b"):                    # run ids joined into the runs index
        for cmd in ("status", "logs", "cancel"):
            out.append({"name": f"{cmd} {ref}", "argv": [cmd, ref], "words": "run id", "commands": [cmd]})
    return out


def replay_inputs(d: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    cases = bad_inputs(d)
    jobs = []
    for i, c in enumerate(cases):
        for cmd in c["commands"]:
            if "argv" in c:
                argv = c["argv"]
            else:           # `run` without --run-dir: train.output_dir (relative: under the case's own folder) is used
                argv = [cmd, c["job"], *c["overrides"]]
            cwd = d / "cwd" / f"case{i}"
            cwd.mkdir(parents=True, exist_ok=True)
            jobs.append((c, cmd, argv, cwd))
    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda j: (j[0], j[1], meshpilot(j[2], env, timeout=90, cwd=j[3])), jobs))
    rows = []
    for c, cmd, r in results:
        kind = classify(r, cmd)
        rows.append({"case": c["name"], "command": cmd, "kind": kind, "rc": r["rc"], "seconds": r["seconds"],
                     "words_found": c["words"] in r["stderr"], "stderr": r["stderr"][-400:],
                     "stderr_chars": len(r["stderr"])})
    return rows


# --- faults ---------------------------------------------------------------------------------------------

def state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, i = [pid], 0
    while i < len(out):
        out += kids.get(out[i], [])
        i += 1
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Runs:
    def __init__(self, base: Path, env: dict[str, str]):
        self.base, self.env = base, env

    def start(self, run_dir: Path, *extra: str) -> subprocess.Popen:
        log = open(run_dir.with_suffix(".out"), "a")
        return subprocess.Popen([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(QUICKSTART), *FAULT_JOB,
                                 *extra, "--run-dir", str(run_dir), "--no-progress"], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def finish(self, p: subprocess.Popen, timeout: float = 400) -> Optional[int]:
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            return None

    def run(self, run_dir: Path, *extra: str, retries: int = 1) -> Optional[int]:
        """A whole run; retried once when Ray did not start (a loaded machine)."""
        for _ in range(retries + 1):
            rc = self.finish(self.start(run_dir, *extra))
            if rc != 2 or "Ray did not start" not in run_dir.with_suffix(".out").read_text(errors="replace"):
                return rc
        return rc

    def wait_step(self, run_dir: Path, step: int, p: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = state(run_dir)
            if st.get("state") == "running" and st.get("step", 0) >= step and st.get("worker_pids"):
                return st
            if p.poll() is not None:
                raise RuntimeError(f"the run ended before step {step}: {run_dir.with_suffix('.out').read_text()[-800:]}")
            time.sleep(0.2)
        raise RuntimeError(f"no step {step} within {timeout}s")

    def status(self, run_dir: Path) -> dict[str, Any]:
        meshpilot(["status", str(run_dir)], self.env, timeout=60)
        return state(run_dir)


def same_result(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("final_loss") is not None and a.get("final_loss") == b.get("final_loss")
            and a.get("param_checksum") == b.get("param_checksum"))


def wait_gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def fault_controller_sigkill(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "sigkill"
    p = r.start(run_dir)
    st = r.wait_step(run_dir, 20, p)
    tree = descendants(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    gone = wait_gone(st["worker_pids"], 30)          # the gang dies with the controller's Ray
    ray_left = [pid for pid in tree[1:] if alive(pid) and pid not in st["worker_pids"]]
    before = state(run_dir).get("state")
    t0 = time.time()
    logs = meshpilot(["logs", str(run_dir), "--follow"], r.env, timeout=60)
    logs_s = round(time.time() - t0, 2)
    cancel = meshpilot(["cancel", str(run_dir), "--wait", "10"], r.env, timeout=60)
    after = r.status(run_dir)
    rc = r.run(run_dir)
    resumed = summary(run_dir)
    rows = [{"fault": "controller SIGKILL", "state_after_fault": before, "state_after_status": after.get("state"),
             "message": after.get("message", "")[:200], "workers_gone": gone,
             "ray_processes_still_alive": len(ray_left),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "resume_rc": rc, "resumed_from": resumed.get("results", [{}])[0].get("start_step"),
             "same_result": same_result(resumed, ref)},
            {"fault": "stale state after controller death", "state_after_fault": before,
             "logs_follow_rc": logs["rc"], "logs_follow_s": logs_s, "cancel_rc": cancel["rc"],
             "cancel_out": (cancel["stdout"] + cancel["stderr"]).strip()[:200],
             "state_after_status": after.get("state"),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled")
             or logs["rc"] is None or cancel["rc"] is None}]
    return rows


def fault_sigterm_all(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "evicted"
    p = r.start(run_dir)
    r.wait_step(run_dir, 20, p)
    t0 = time.time()
    for pid in descendants(p.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    rc = r.finish(p, timeout=120)
    exit_s = round(time.time() - t0, 1)
    after = r.status(run_dir)
    stopped = summary(run_dir)
    rc2 = r.run(run_dir)
    resumed = summary(run_dir)
    return [{"fault": "SIGTERM to every process", "rc": rc, "exit_s": exit_s, "state_after_status": after.get("state"),
             "message": after.get("message", "")[:200], "summary_written": bool(stopped),
             "stop_checkpoint": any(x.get("status") == "stopped" for x in stopped.get("results") or []),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "resume_rc": rc2, "resumed_from": resumed.get("results", [{}])[0].get("start_step"),
             "same_result": same_result(resumed, ref)}]


def fault_sigusr2_controller(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "usr2"
    p = r.start(run_dir)
    r.wait_step(run_dir, 20, p)
    os.kill(p.pid, signal.SIGUSR2)
    rc = r.finish(p, timeout=120)
    after = r.status(run_dir)
    rc2 = r.run(run_dir)
    resumed = summary(run_dir)
    return [{"fault": "SIGUSR2 to the controller", "rc": rc, "state_after_status": after.get("state"),
             "message": after.get("message", "")[:200],
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "resume_rc": rc2, "resumed_from": resumed.get("results", [{}])[0].get("start_step"),
             "same_result": same_result(resumed, ref)}]


def fault_worker_sigkill(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "worker_kill"
    p = r.start(run_dir, "--backoff", "0.5")
    st = r.wait_step(run_dir, 20, p)
    os.kill(st["worker_pids"][1], signal.SIGKILL)
    rc = r.finish(p)
    after = r.status(run_dir)
    s = summary(run_dir)
    return [{"fault": "worker SIGKILL", "rc": rc, "state_after_status": after.get("state"), "restarts": s.get("restarts"),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "resumed_from": s.get("results", [{}])[0].get("start_step"), "same_result": same_result(s, ref)}]


def fault_corrupt_checkpoint(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "corrupt"
    p = r.start(run_dir)
    st = r.wait_step(run_dir, 20, p)
    os.kill(st["worker_pids"][0], signal.SIGUSR2)              # preemption notice to one worker: stop checkpoint
    rc = r.finish(p, timeout=120)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    victim = max((run_dir / "checkpoints" / latest).glob("*.pt"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    after = r.status(run_dir)
    rc2 = r.run(run_dir)
    resumed = summary(run_dir)
    log0 = (run_dir / "logs" / "rank0.log").read_text(errors="replace")
    return [{"fault": "SIGUSR2 to a worker, then corrupted latest checkpoint", "rc": rc, "stopped_at": latest,
             "corrupted": str(victim.relative_to(run_dir)), "state_after_status": after.get("state"),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "fallback_warned": "is damaged" in log0, "resume_rc": rc2,
             "resumed_from": resumed.get("results", [{}])[0].get("start_step"), "same_result": same_result(resumed, ref)}]


def fault_two_runs(r: Runs, d: Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    run_dir = d / "shared"
    p = r.start(run_dir)
    deadline = time.time() + 60
    while not (run_dir / "controller.lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = meshpilot(["run", str(QUICKSTART), *FAULT_JOB, "--run-dir", str(run_dir), "--no-progress"], r.env)
    rc = r.finish(p)
    after = r.status(run_dir)
    s = summary(run_dir)
    return [{"fault": "two runs on one run directory", "second_rc": second["rc"],
             "second_error": second["stderr"].strip()[:200], "first_rc": rc, "state_after_status": after.get("state"),
             "left_non_terminal": after.get("state") not in ("succeeded", "failed", "cancelled"),
             "same_result": same_result(s, ref) and second["rc"] == 2}]


FAULTS: list[Callable[[Runs, Path, dict[str, Any]], list[dict[str, Any]]]] = [
    fault_controller_sigkill, fault_sigterm_all, fault_sigusr2_controller, fault_worker_sigkill,
    fault_corrupt_checkpoint, fault_two_runs]


# --- report ----------------------------------------------------------------------------------------------

def table(inputs: list[dict[str, Any]], faults: list[dict[str, Any]], seconds: float) -> str:
    cases = sorted({x["case"] for x in inputs})
    n = len(inputs)
    count = {k: sum(1 for x in inputs if x["kind"] == k) for k in ("clean", "traceback", "accepted", "other")}
    clean_cases = sum(1 for c in cases if all(x["kind"] == "clean" for x in inputs if x["case"] == c))
    resumable = [f for f in faults if "same_result" in f]
    lines = [f"hardening replay: {len(cases)} bad inputs ({n} invocations), {len(faults)} faults on the CPU quickstart; "
             f"{seconds:.0f} s",
             "",
             f"{'inputs tried':<46}{len(cases):>6}   ({n} invocations of validate/run/status/logs/cancel)",
             f"{'clean exit 2 (one line, no traceback)':<46}{count['clean']:>6}   of {n} invocations; {clean_cases} of "
             f"{len(cases)} inputs clean in every command",
             f"{'tracebacks':<46}{count['traceback']:>6}   (target 0)",
             f"{'silently accepted wrong values':<46}{count['accepted']:>6}   (target 0)",
             f"{'other exits':<46}{count['other']:>6}",
             f"{'faults injected':<46}{len(faults):>6}",
             f"{'runs left non-terminal':<46}{sum(1 for f in faults if f.get('left_non_terminal')):>6}   (target 0)",
             f"{'runs resumed to the uninterrupted result':<46}"
             f"{sum(1 for f in resumable if f['same_result']):>6}   of {len(resumable)} (target all)",
             "", "faults:"]
    for f in faults:
        detail = ", ".join(f"{k}={v}" for k, v in f.items() if k != "fault")
        lines.append(f"  {f['fault']}: {detail}")
    bad = [x for x in inputs if x["kind"] != "clean"]
    lines.append("")
    lines.append("inputs not answered with a clean exit 2:" if bad else "every input: clean exit 2")
    for x in bad:
        lines.append(f"  {x['case']} [{x['command']}]: {x['kind']} rc={x['rc']}: {x['stderr'][-200:]!r}")
    missing = [x for x in inputs if x["kind"] == "clean" and not x["words_found"]]
    for x in missing:
        lines.append(f"  (message lacks the expected words) {x['case']} [{x['command']}]: {x['stderr'][-200:]!r}")
    slow = max(inputs, key=lambda x: x["seconds"]) if inputs else None
    if slow:
        lines.append(f"slowest input: {slow['case']} [{slow['command']}] {slow['seconds']} s; longest error "
                     f"{max(x['stderr_chars'] for x in inputs)} characters")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "2026-11-29-cpu"))
    ap.add_argument("--skip-faults", action="store_true", help="bad inputs only (about a minute)")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hardening-") as tmp:
        d = Path(tmp)
        env = env_for(d / "home", Path(os.environ.get("PYTHONPYCACHEPREFIX") or d / "pycache"))
        (d / "inputs").mkdir()
        inputs = replay_inputs(d / "inputs", env)
        print(f"inputs replayed in {time.time() - t0:.0f} s", flush=True)
        faults: list[dict[str, Any]] = []
        reference: dict[str, Any] = {}
        if not args.skip_faults:
            r = Runs(d, env)
            (d / "faults").mkdir()
            ref_dir = d / "faults" / "reference"
            rc = r.run(ref_dir)
            reference = summary(ref_dir)
            print(f"reference run: rc {rc}, final loss {reference.get('final_loss')} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            for fault in FAULTS:
                try:
                    rows = fault(r, d / "faults", reference)
                except Exception as e:      # a fault that could not be injected is reported, not hidden
                    rows = [{"fault": fault.__name__, "error": f"{type(e).__name__}: {str(e)[:300]}",
                             "left_non_terminal": True, "same_result": False}]
                faults += rows
                print(f"{rows[0]['fault']}: done ({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - t0
    text = table(inputs, faults, seconds)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hardening_replay.txt").write_text(text)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "seconds": round(seconds, 1),
            "command": "python benchmarks/hardening_replay.py" + (" --skip-faults" if args.skip_faults else ""),
            "fault_job": [str(QUICKSTART.relative_to(ROOT)), *FAULT_JOB],
            "reference": {k: reference.get(k) for k in ("status", "final_loss", "param_checksum", "wall_s")},
            "inputs": inputs, "faults": faults}
    (out / "hardening_replay.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
