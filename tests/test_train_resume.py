"""Kill a ZeRO-2 run (the processes really die: os._exit after step 12, checkpoints every 5
steps), resume it: steps 11-20 reproduce the uninterrupted run's losses and final weights.
Also: a stop signal (SIGUSR2 on one rank only) checkpoints and stops every rank at the same step
(the step after the one during which it arrived: the flag rides on that step's loss all-reduce)."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import DistributedWorkerError, run_distributed  # noqa: E402

pytestmark = pytest.mark.slow
PLAN = {"dp": 2, "zero_stage": 2, "micro_batch": 2}
KILL_AFTER = 12


def _first_life(rank: int, world: int, tmp: str) -> None:
    from train_utils import run, tiny_job
    full = run(tiny_job(PLAN), rank, world, f"{tmp}/full", resume=False)
    if rank == 0:
        with open(f"{tmp}/full.json", "w") as f:
            json.dump({"losses": full["losses"], "checksum": full["param_checksum"]}, f)

    def die(rec: dict) -> None:
        if rec["step"] == KILL_AFTER:
            os._exit(17)                                     # no cleanup, no final checkpoint
    run(tiny_job(PLAN, checkpoint_every=5), rank, world, f"{tmp}/killed", on_step=die)


def _second_life(rank: int, world: int, tmp: str) -> dict:
    from train_utils import run, tiny_job
    resumed = run(tiny_job(PLAN, checkpoint_every=5), rank, world, f"{tmp}/killed")        # resume="auto"

    def usr2(rec: dict) -> None:
        if rec["step"] == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
    stopped = run(tiny_job(PLAN), rank, world, f"{tmp}/signalled", on_step=usr2, resume=False)
    return {"resumed": resumed, "stopped": stopped}


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    tmp = str(tmp_path)
    with pytest.raises(DistributedWorkerError) as e:
        run_distributed(_first_life, 2, tmp, timeout=600)
    assert all("code 17" in msg for msg in e.value.failures.values()), e.value
    root = tmp_path / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000010"
    (root / "step_00000015.partial").mkdir()                  # as if a save had been cut off
    (root / "step_00000015.partial" / "junk.pt").write_bytes(b"\0" * 10)

    res = run_distributed(_second_life, 2, tmp, timeout=600)
    full = json.loads((tmp_path / "full.json").read_text())
    r0 = res[0]["resumed"]
    assert r0["start_step"] == 10 and r0["step"] == 20 and len(r0["losses"]) == 10
    assert r0["losses"] == pytest.approx(full["losses"][10:], rel=1e-6, abs=0), (r0["losses"], full["losses"][10:])
    assert r0["param_checksum"] == pytest.approx(full["checksum"], rel=1e-9)
    assert (root / "latest").read_text().strip() == "step_00000020"
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, KILL_AFTER + 1)) + list(range(11, 21))

    for r in (0, 1):      # the flag raised during step 3 is agreed in step 4's all-reduce
        s = res[r]["stopped"]
        assert s["status"] == "stopped" and s["step"] == 4, s
    assert (tmp_path / "signalled" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
