"""Multi-node Ray on one machine: `meshpilot run --address` of a dp=2 x tp=2 job (cluster.nodes=2,
cluster.gpus_per_node=2, CPU workers) on a Ray cluster of two raylets (``ray.cluster_utils.Cluster``:
a head and a second node, 2 CPUs each, held by a child process).

Both raylets share the machine's IP, but Ray's placement groups see two nodes (bundle node ids), so
the gang spreads as on two hosts. Which node each rank ran on is read from the process tree: a
rank's pid (``state.json`` / ``attempt N rank R pid P`` in its rank log) descends from its node's
raylet. Then the second node is killed (its raylet SIGKILLed by ``Cluster.remove_node``, its
ranks SIGKILLed by the test) and a third node is started in its place: the controller restarts
the gang on the head and the third node, from the last checkpoint, and the run ends with every
step trained.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_cluster import subprocess_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
STEPS, EVERY = 60, 10
JOB = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.seq_len=32", "train.precision=fp32",
       "cluster.nodes=2", "cluster.gpus_per_node=2", "plan.dp=2", "plan.tp=2"]

_HOLDER = r"""
import json, sys
from ray.cluster_utils import Cluster
args = dict(num_cpus=2, num_gpus=0, object_store_memory=80 * 2**20)
c = Cluster(initialize_head=True, connect=False, head_node_args=dict(
    args, include_dashboard=False,
    _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                    "health_check_initial_delay_ms": 0}))
raylet = lambda n: n.all_processes["raylet"][0].process.pid
nodes = [c.head_node, c.add_node(**args)]
c.wait_for_nodes()
print(json.dumps(dict(address=c.address, raylets=[raylet(n) for n in nodes])), flush=True)
for line in sys.stdin:
    if line.strip() == "kill":             # SIGKILL the second node's raylet (and its other processes)
        pid = raylet(nodes[1])
        c.remove_node(nodes[1], allow_graceful=False)
        print(json.dumps(dict(killed=pid)), flush=True)
    elif line.strip() == "add":
        nodes.append(c.add_node(**args))
        c.wait_for_nodes()
        print(json.dumps(dict(raylet=raylet(nodes[-1]))), flush=True)
c.shutdown()
"""


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _raylet_of(pid: int, raylets: set[int]) -> int:
    p = pid
    while p > 1:
        if p in raylets:
            return p
        p = _ppid(p)
    raise AssertionError(f"pid {pid} descends from none of the raylets {raylets}")


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = pred()
        except FileNotFoundError:      # a log the ranks have not created yet
            v = None
        if v:
            return v
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _nodes_of(run_dir: Path, attempt: int, raylets: set[int], proc, old: tuple[int, ...] = ()) -> list[int]:
    """The raylet of each rank of the first attempt >= ATTEMPT that trains (new pids, state running)."""
    st = _wait(lambda: (s := _state(run_dir)).get("attempt", -1) >= attempt and s.get("state") == "running"
               and len(s.get("worker_pids") or []) == 4 and not set(s["worker_pids"]) & set(old) and s,
               240, f"attempt {attempt} training", proc)
    return [_raylet_of(pid, raylets) for pid in st["worker_pids"]], st["worker_pids"]


@pytest.mark.timeout(300)
def test_dp2_tp2_over_two_nodes_and_restart_after_losing_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path,
                              # as `ray start` does (and `meshpilot run --address` expects): Ray's token
                              # authentication, with the token of ~/.ray/auth_token
                              env=subprocess_env(tmp_path, RAY_AUTH_MODE="token"))
    run = None
    try:
        info = json.loads(holder.stdout.readline())
        head, second = info["raylets"]
        run_dir = tmp_path / "run"
        run = subprocess.Popen([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(QUICKSTART), *JOB,
                                "--run-dir", str(run_dir), "--address", info["address"], "--backoff", "0.5",
                                "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env(tmp_path / "home"))
        # placement: 2 ranks per node, each tensor-parallel group (ranks 0-1, 2-3) inside one node
        nodes, pids = _nodes_of(run_dir, 0, {head, second}, run)
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and {nodes[0], nodes[2]} == {head, second}, nodes
        # node ranks and addresses: LOCAL_RANK 0/1 on each node, every rank meets rank 0 at rank 0's node address
        masters = set()
        for r, pid in enumerate(pids):
            log = _wait(lambda: (t := (run_dir / "logs" / f"rank{r}.log").read_text()) and "gloo initialised" in t
                        and t, 120, f"rank {r} initialised", run)
            assert f"attempt 0 rank {r} pid {pid}" in log, log[-2000:]
            m = re.search(rf"rank {r}: attempt 0, world 4, local rank (\d+), master (\S+):(\d+), pid {pid}", log)
            assert m and int(m.group(1)) == r % 2, log[-2000:]
            masters.add(m.group(2, 3))
        assert len(masters) == 1, masters
        # lose the second node after the first checkpoint: its raylet and its ranks
        _wait(lambda: _state(run_dir).get("step", 0) > EVERY + 2, 240, f"step {EVERY + 2}", run)
        holder.stdin.write("kill\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline())["killed"] == second
        for r in range(4):
            if nodes[r] == second:
                try:
                    os.kill(pids[r], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        holder.stdin.write("add\n")                       # a third node takes the second one's place
        holder.stdin.flush()
        third = json.loads(holder.stdout.readline())["raylet"]
        nodes1, _ = _nodes_of(run_dir, 1, {head, third}, run, old=tuple(pids))
        assert nodes1[0] == nodes1[1] and nodes1[2] == nodes1[3] and {nodes1[0], nodes1[2]} == {head, third}, nodes1
        out, _ = run.communicate(timeout=240)
        assert run.returncode == 0, out
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["status"] == "succeeded" and s["restarts"] >= 1 and s["world_size"] == 4, s
        steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))
        # attempt 1 resumed from a checkpoint (a step > 0), not from scratch
        ctl = (run_dir / "logs" / "controller.log")
        text = ctl.read_text() if ctl.exists() else out
        assert re.search(r"===== attempt [1-9] rank 0 ", (run_dir / "logs" / "rank0.log").read_text())
        repeats = [steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
        assert all(r > 1 and (r - 1) % EVERY == 0 for r in repeats), (steps, text[-3000:])
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
