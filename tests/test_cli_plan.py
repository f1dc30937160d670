"""`meshpilot simulate` and `meshpilot plan` through the installed command line (subprocess)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.plan.plan import resolve_plan

# the installed console script; the module form when the script is not on PATH
CLI = [shutil.which("meshpilot")] if shutil.which("meshpilot") else [sys.executable, "-m", "meshpilot.orchestrator.cli"]

JOB = """\
model: llama-2-7b
cluster: h100-sxm-4
train: {seq_len: 2048, global_batch: 16}
plan: {dp: 4, zero_stage: 2, micro_batch: 1}
"""


def _run(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture
def job_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(JOB)
    return p


def test_simulate_json_keys(job_file):
    r = _run("simulate", str(job_file), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("fits", "peak_memory_gib", "step_time_s", "tokens_per_s", "mfu", "memory_breakdown_gib",
              "time_breakdown_s", "plan", "reasons"):
        assert k in d
    assert set(d["memory_breakdown_gib"]) >= {"weights", "gradients", "optimizer_states", "activations", "temporary",
                                              "communication_buffers", "framework_overhead", "cpu_offload"}
    assert set(d["time_breakdown_s"]) >= {"forward", "backward", "recompute", "tp_communication",
                                          "dp_reduction_exposed", "zero3_gathers", "expert_alltoall",
                                          "offload_transfers", "cpu_optimizer", "optimizer_step"}
    assert d["fits"] is True
    assert d["tokens_per_s"] == pytest.approx(16 * 2048 / d["step_time_s"])
    # the breakdown adds up to the peak and to the step time
    mem = d["memory_breakdown_gib"]
    assert sum(v for k, v in mem.items() if k != "cpu_offload") == pytest.approx(d["peak_memory_gib"])
    assert sum(d["time_breakdown_s"].values()) == pytest.approx(d["step_time_s"])


def test_simulate_table_and_not_fitting(job_file):
    r = _run("simulate", str(job_file), "plan.zero_stage=0")
    assert r.returncode == 0, r.stderr
    assert "peak memory per GPU" in r.stdout and "does not fit" in r.stdout and "zero_stage=3" in r.stdout


def test_bad_input_exits_2(job_file):
    r = _run("simulate", str(job_file), "plan.zero_stage=5")
    assert r.returncode == 2 and "plan.zero_stage" in r.stderr and "Traceback" not in r.stderr
    r = _run("plan", str(job_file), "--objective", "fast")
    assert r.returncode == 2 and "--objective" in r.stderr and "throughput" in r.stderr
    r = _run("simulate", str(job_file), "plan.tp=3")
    assert r.returncode == 2 and "plan.tp" in r.stderr


def test_plan_exports_and_report(job_file, tmp_path):
    out_yaml, ds, rep = tmp_path / "best.yaml", tmp_path / "ds.json", tmp_path / "report.html"
    r = _run("plan", str(job_file), "plan.auto=true", "--json", "--top", "3", "--export-yaml", str(out_yaml),
             "--export-deepspeed", str(ds), "--report", str(rep), "--explain", "plan.dp=4 plan.zero_stage=3")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["top"]) == 3 and d["fitting"] > 0 and d["explain"]["plan"].startswith("dp=4 tp=1 zero=3")
    job = load_job(out_yaml)
    best = resolve_plan(job)
    assert best.to_config() == d["top"][0]["plan_config"]
    cfg = json.loads(ds.read_text())
    assert cfg["train_micro_batch_size_per_gpu"] == best.micro_batch
    assert cfg["zero_optimization"]["stage"] == best.zero_stage
    assert rep.read_text().startswith("<!doctype html>") and "data:image/png;base64," in rep.read_text()
    png = tmp_path / "r.png"
    r = _run("plan", str(job_file), "plan.auto=true", "--report", str(png))
    assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_with_fixed_section_explains_it(job_file):
    r = _run("plan", str(job_file), "--top", "2")
    assert r.returncode == 0, r.stderr
    assert "the job's own plan: dp=4 tp=1 zero=2" in r.stdout and "top plans by throughput" in r.stdout


def test_simulate_reads_bucket_sizes_from_deepspeed_extra(job_file):
    """The simulator scores the DeepSpeed config the worker runs, train.deepspeed_extra merged in."""
    from meshpilot.strategies.deepspeed_config import DEFAULT_BUCKET
    base = json.loads(_run("simulate", str(job_file), "--json").stdout)
    r = _run("simulate", str(job_file), "--json",
             "train.deepspeed_extra.zero_optimization.reduce_bucket_size=100000000")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    # the bf16 staging buffer shrinks from the builder's DEFAULT_BUCKET (2e8) to 1e8 elements: 2 x 1e8 bytes
    drop = base["memory_breakdown_gib"]["communication_buffers"] - d["memory_breakdown_gib"]["communication_buffers"]
    assert drop * 2**30 == pytest.approx(2 * (DEFAULT_BUCKET - 1e8))
    r = _run("simulate", str(job_file), "--deepspeed-config", "ds.json")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_plan_explain_prints_only_that_plan(job_file):
    r = _run("plan", str(job_file), "plan.auto=true", "--explain", "plan.dp=4 plan.zero_stage=3")
    assert r.returncode == 0, r.stderr
    assert "explain: dp=4 tp=1 zero=3" in r.stdout and "memory per GPU (GiB)" in r.stdout
    assert "top plans by" not in r.stdout and "chosen:" not in r.stdout and "plans enumerated" not in r.stdout
    r = _run("plan", str(job_file), "plan.auto=true", "--explain", "plan.dp=4 plan.zero_stage=0")
    assert r.returncode == 0 and "does not fit:" in r.stdout and "top plans by" not in r.stdout


def test_report_bars_are_labelled_by_plan_and_legends_cover_nothing(tmp_path):
    """The report's memory bars carry each plan's short description (not only #1..#10), and both
    legends lie outside their axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshpilot.orchestrator.sim.planner import search
    from meshpilot.orchestrator.sim.report import _figure

    p = tmp_path / "job.yaml"
    p.write_text(JOB)
    res = search(load_job(str(p), ["plan.auto=true"]), top=10)
    fig = _figure(res)
    try:
        fig.canvas.draw()
        ax1, ax2 = fig.axes[:2]
        labels = [t.get_text() for t in ax1.get_yticklabels()]
        assert labels == [f"#{i}  {e.plan}" for i, e in enumerate(res.top, 1)]
        renderer = fig.canvas.get_renderer()
        for ax in (ax1, ax2):
            box, leg = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
            assert leg.y1 <= box.y0 or leg.x0 >= box.x1, (ax.get_title(), box, leg)     # below or beside the axes
    finally:
        plt.close(fig)
