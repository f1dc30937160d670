"""The CLI as a user runs it: `meshpilot presets` and `meshpilot validate`, errors exit 2 without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

JOB = """\
model: {arch: llama, layers: 2, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, vocab: 256}
cluster: h100-sxm-4
train: {seq_len: 128, global_batch: 8}
plan: {dp: 2, tp: 2, zero_stage: 1, micro_batch: 2}
"""


def meshpilot(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture()
def job(tmp_path) -> Path:
    f = tmp_path / "job.yaml"
    f.write_text(JOB)
    return f


def test_validate_prints_resolved_config_and_layout(job):
    r = meshpilot("validate", str(job))
    assert r.returncode == 0, r.stderr
    assert "gpus_per_node: 4" in r.stdout and "dp=2 tp=2 zero=1 mb=2x2" in r.stdout
    assert "0,1" in r.stdout and "0,2" in r.stdout           # tp group of rank 0, dp group of rank 0


def test_validate_zeroth_order_layout(job):
    r = meshpilot("validate", str(job), "train.optimizer=zo-sgd", "plan={}", "plan.zo.mode=mezo",
                  "plan.zo.pertp=2", "plan.zo.dp=2", "plan.micro_batch=4")
    assert r.returncode == 0, r.stderr
    assert "zo=mezo pertp=2 zo_dp=2" in r.stdout and "sign" in r.stdout


@pytest.mark.parametrize("overrides, words", [
    (["plan.tp=3"], ["plan.tp=3", "must divide model.heads=4"]),
    (["plan.zero_stage=5"], ["plan.zero_stage=5", "0, 1, 2, 3"]),
    (["plan.dp=4"], ["needs 8 GPUs"]),
    (["bogus.key=1"], ["unknown section"]),
])
def test_errors_exit_2_without_traceback(job, overrides, words):
    r = meshpilot("validate", str(job), *overrides)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("meshpilot: error: ")
    for w in words:
        assert w in r.stderr


def test_missing_job_file(tmp_path):
    r = meshpilot("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_presets_lists_models_and_clusters(tmp_path):
    r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "presets"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    for name in ("llama-2-7b", "mixtral-8x7b", "opt-175b", "dgx-h100", "h100-sxm-4"):
        assert name in r.stdout
