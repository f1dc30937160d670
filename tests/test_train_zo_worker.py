"""Zeroth-order plans through the worker: a DistZO2-style run with a perturbation pair (pertp=2)
on 2 processes, MeZO or ZO2 (whose blocks the two ranks then upload in slices, all-gathered),
equals the single-process MeZO run, a killed run resumes from its checkpoint with the same
losses, and a stop signal on one rank stops both at the same step (the training loop is the
DeepSpeed worker's)."""
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
PAIRS = {"mezo": {"zo": {"mode": "mezo", "pertp": 2, "dp": 1}}, "zo2": {"zo": {"mode": "zo2", "pertp": 2, "dp": 1}}}
TRAIN = dict(optimizer="zo-sgd", lr=1e-3, steps=8, warmup_steps=0, zo_eps=1e-3, weight_decay=0.0)


def _first(rank: int, world: int, tmp: str, mode: str) -> None:
    from train_utils import run, tiny_job
    ZO = PAIRS[mode]
    full = run(tiny_job(ZO, **TRAIN), rank, world, f"{tmp}/full", resume=False)
    if rank == 0:
        with open(f"{tmp}/full.json", "w") as f:
            json.dump({"losses": full["losses"], "checksum": full["param_checksum"]}, f)

    def die(rec: dict) -> None:
        if rec["step"] == 5:
            os._exit(17)
    run(tiny_job(ZO, checkpoint_every=4, **TRAIN), rank, world, f"{tmp}/killed", on_step=die)


def _second(rank: int, world: int, tmp: str, mode: str) -> dict:
    from train_utils import run, tiny_job
    resumed = run(tiny_job(PAIRS[mode], checkpoint_every=4, **TRAIN), rank, world, f"{tmp}/killed")

    def usr2(rec: dict) -> None:
        if rec["step"] == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
    stopped = run(tiny_job(PAIRS[mode], **TRAIN), rank, world, f"{tmp}/signalled", on_step=usr2, resume=False)
    return {"resumed": resumed, "stopped": stopped}


def _single(rank: int, world: int, tmp: str) -> dict:
    from train_utils import run, tiny_job
    return run(tiny_job({"zo": {"mode": "mezo", "pertp": 1, "dp": 1}}, **TRAIN), rank, world, f"{tmp}/single",
               resume=False)


@pytest.mark.parametrize("mode", ["mezo", "zo2"])
def test_zo_pair_matches_single_process_and_resumes(tmp_path, mode):
    pytest.importorskip("meshpilot.strategies.zo")
    tmp = str(tmp_path)
    with pytest.raises(DistributedWorkerError) as e:
        run_distributed(_first, 2, tmp, mode, timeout=300)
    assert all("code 17" in msg for msg in e.value.failures.values()), e.value
    full = json.loads((tmp_path / "full.json").read_text())
    single = run_distributed(_single, 1, tmp, timeout=300)[0]
    assert full["losses"] == pytest.approx(single["losses"], rel=1e-5), (full, single)
    # final weights (ZO2: gathered from the ranks' slices) equal the single-process run's
    assert full["checksum"] == pytest.approx(single["param_checksum"], rel=1e-6)
    both = run_distributed(_second, 2, tmp, mode, timeout=300)
    res = [b["resumed"] for b in both]
    assert res[0]["start_step"] == 4 and res[0]["losses"] == pytest.approx(full["losses"][4:], rel=1e-6)
    assert res[0]["param_checksum"] == res[1]["param_checksum"] == pytest.approx(full["checksum"], rel=1e-6)
    assert res[0]["zo_transfer"] == {"mezo": "NoneType", "zo2": "SlicedTransfer"}[mode]
    for r in (0, 1):
        # the same loop as the DeepSpeed worker: the flag raised during step 3 is agreed in step 4
        s = both[r]["stopped"]
        assert s["status"] == "stopped" and s["step"] == 4 and s["losses"] == full["losses"][:4], s
        assert s["checkpoint"].endswith("step_00000004")
        peaks = res[r]["memory_peaks_gib"]
        assert set(peaks) == {"nvml", "allocated", "reserved", "host_rss"} and peaks["nvml"] is None, peaks
        assert res[r]["tokens_per_s"] > 0 and len(res[r]["peak_memory"]) == 2     # every rank's, last step


def _bf16(rank: int, world: int, tmp: str) -> dict:
    from train_utils import run, tiny_job
    return run(tiny_job({"zo": {"mode": "zo2", "pertp": 1, "dp": 1}}, **dict(TRAIN, steps=2, precision="bf16")),
               rank, world, f"{tmp}/bf16", resume=False)


def test_zo_worker_keeps_the_weights_in_train_precision(tmp_path):
    """train.precision=bf16 builds the model in bf16 (it was built in fp32 whatever the precision:
    a ZO2 run on 4 H200s moved twice the bytes it needed)."""
    res = run_distributed(_bf16, 1, str(tmp_path), timeout=300)[0]
    assert res["param_dtype"] == "torch.bfloat16" and len(res["losses"]) == 2
