"""Zeroth-order plans through the worker (engineer C's trainer): a DistZO2-style MeZO run with a
perturbation pair (pertp=2) on 2 processes equals the single-process MeZO run, and a killed
run resumes from its checkpoint with the same losses."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import DistributedWorkerError, run_distributed  # noqa: E402

pytestmark = pytest.mark.slow
ZO = {"zo": {"mode": "mezo", "pertp": 2, "dp": 1}}
TRAIN = dict(optimizer="zo-sgd", lr=1e-3, steps=8, warmup_steps=0, zo_eps=1e-3, weight_decay=0.0)


def _first(rank: int, world: int, tmp: str) -> None:
    from train_utils import run, tiny_job
    full = run(tiny_job(ZO, **TRAIN), rank, world, f"{tmp}/full", resume=False)
    if rank == 0:
        with open(f"{tmp}/full.json", "w") as f:
            json.dump(full["losses"], f)

    def die(rec: dict) -> None:
        if rec["step"] == 5:
            os._exit(17)
    run(tiny_job(ZO, checkpoint_every=4, **TRAIN), rank, world, f"{tmp}/killed", on_step=die)


def _second(rank: int, world: int, tmp: str) -> dict:
    from train_utils import run, tiny_job
    return run(tiny_job(ZO, checkpoint_every=4, **TRAIN), rank, world, f"{tmp}/killed")


def _single(rank: int, world: int, tmp: str) -> list:
    from train_utils import run, tiny_job
    return run(tiny_job({"zo": {"mode": "mezo", "pertp": 1, "dp": 1}}, **TRAIN), rank, world, f"{tmp}/single",
               resume=False)["losses"]


def test_zo_pair_matches_single_process_and_resumes(tmp_path):
    pytest.importorskip("meshpilot.strategies.zo")
    tmp = str(tmp_path)
    with pytest.raises(DistributedWorkerError) as e:
        run_distributed(_first, 2, tmp, timeout=300)
    assert all("code 17" in msg for msg in e.value.failures.values()), e.value
    full = json.loads((tmp_path / "full.json").read_text())
    single = run_distributed(_single, 1, tmp, timeout=300)[0]
    assert full == pytest.approx(single, rel=1e-5), (full, single)
    res = run_distributed(_second, 2, tmp, timeout=300)
    assert res[0]["start_step"] == 4 and res[0]["losses"] == pytest.approx(full[4:], rel=1e-6)
