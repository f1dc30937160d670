"""The launcher entry point: `python -m meshpilot.orchestrator.worker --job J --run-dir D` on 2
processes with Slurm-style rank variables (as srun starts it), and a ConfigError exit (2) for a
missing data file before any process group is created."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dist_utils import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def _job_file(tmp_path, **train):
    from meshpilot.orchestrator.config.loader import dump_job
    from train_utils import tiny_job
    job = tiny_job({"dp": 2, "zero_stage": 1, "micro_batch": 4}, steps=3, **train)
    p = tmp_path / "job.yaml"
    p.write_text(dump_job(job))
    return p


def _launch(job_file, run_dir, world=2):
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, SLURM_PROCID=str(r), SLURM_NTASKS=str(world), SLURM_LOCALID=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "meshpilot.orchestrator.train.worker", "--job", str(job_file),
                                       "--run-dir", str(run_dir)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def test_worker_module_under_slurm_variables(tmp_path):
    codes, outs = _launch(_job_file(tmp_path), tmp_path / "run")
    assert codes == [0, 0], outs
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_worker_module_reports_config_errors(tmp_path):
    codes, outs = _launch(_job_file(tmp_path, data=str(tmp_path / "missing.bin")), tmp_path / "run")
    assert codes == [2, 2]
    assert "train.data=" in outs[0][1] and "no such token file" in outs[0][1]
