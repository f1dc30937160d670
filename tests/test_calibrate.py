"""`meshpilot calibrate`: refit a cluster's calibration from recorded run directories.

The run directories are written by the tests: job.yaml from a real job, summary.json by hand with
measurements generated from known constants (the simulator's own time model at a known matrix rate,
bus bandwidth and CPU Adam rate; peaks at known offsets from the memory model). The fit must recover
those constants, the written YAML must load as a cluster and move the predictions onto the
measurements, held-out runs must not move the fit, and the refusals exit 2. One end to end test runs
a real tiny CPU `meshpilot run` and calibrates from its run directory.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshpilot.orchestrator.cli.main import main
from meshpilot.orchestrator.config.loader import dump_job, load_job
from meshpilot.orchestrator.config.schema import CalibrationConfig
from meshpilot.orchestrator.plan.plan import resolve_plan
from meshpilot.orchestrator.sim import calibration as cal
from meshpilot.orchestrator.sim.calibration import calibrate, load_run, predict, with_calibration

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "results" / "2026-11-29-h200x2"
TRUE_TFLOPS, TRUE_BUSBW, TRUE_ADAM = 400.0, 150.0, 1.5
TRUE = CalibrationConfig(matmul_tflops=TRUE_TFLOPS, allreduce_busbw_gbs=TRUE_BUSBW, allgather_busbw_gbs=TRUE_BUSBW,
                         reducescatter_busbw_gbs=TRUE_BUSBW, alltoall_busbw_gbs=TRUE_BUSBW,
                         cpu_adam_rank_gparams_per_s=TRUE_ADAM)
BASE = ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "train.seq_len=2048",
        "train.global_batch=8", "train.precision=bf16", "train.steps=20", "plan.dp=2"]
# five plans that share the step differently between compute, communication and CPU Adam
PLANS = {"r1": ["plan.zero_stage=2", "plan.micro_batch=1"],
         "r2": ["plan.zero_stage=2", "plan.micro_batch=4"],
         "r3": ["plan.zero_stage=2", "plan.micro_batch=1", "plan.offload_optimizer=cpu"],
         "r4": ["plan.zero_stage=3", "plan.micro_batch=2"],
         "r5": ["plan.zero_stage=3", "plan.micro_batch=1", "plan.activation_checkpointing=full"]}
DEVICE_OFFSET = {"r1": 1.5, "r2": 2.5, "r3": 2.0, "r4": 1.0, "r5": 3.0}     # GiB above the model without fixed cost
HOST_OFFSET = {"r1": 1.0, "r2": 1.5, "r3": 1.25, "r4": 2.0, "r5": 0.5}      # GiB per rank, likewise


def _job(overrides):
    return load_job(None, BASE + overrides)


def _write_run(root: Path, name: str, overrides: list[str], *, device_offset: float, host_offset: float,
               phases: bool = True, true: CalibrationConfig = TRUE) -> Path:
    """A run directory whose measurements follow ``true`` exactly (times) and the given offsets (memory)."""
    job = _job(overrides)
    plan = resolve_plan(job)
    truth = predict(with_calibration(job, true), plan)
    mech = predict(with_calibration(job, dataclasses.replace(true, device_fixed_gib=0.0, host_process_gib=0.0)), plan)
    d = root / name
    d.mkdir(parents=True)
    (d / "job.yaml").write_text(dump_job(job))
    n = plan.world_size
    results = []
    for rank in range(n):
        results.append(dict(
            rank=rank, step_times_s=[10.0] + [truth["step_time_s"]] * 5,
            phases_s=dict(forward=0.25 * truth["phases_s"]["forward_backward"],
                          backward=0.75 * truth["phases_s"]["forward_backward"],
                          optimizer=truth["phases_s"]["optimizer"]) if phases else None,
            memory_peaks_gib=dict(nvml=mech["device_peak_gib"] + device_offset, allocated=1.0, reserved=2.0,
                                  host_rss=(mech["host_node_gib"] / n) + host_offset)))
    (d / "summary.json").write_text(json.dumps(dict(status="succeeded", plan=plan.describe(), results=results)))
    return d


@pytest.fixture
def runs(tmp_path):
    return [_write_run(tmp_path / "runs", k, v, device_offset=DEVICE_OFFSET[k], host_offset=HOST_OFFSET[k])
            for k, v in PLANS.items()]


def _quantities(result):
    return {q.name: q for q in result.quantities}


def test_fit_recovers_known_constants_and_excludes_the_held_out_run(runs):
    loaded = [load_run(d) for d in runs]
    res = calibrate(loaded, loaded[0].job.cluster, holdout_every=4)
    assert [r.run_id for r in res.held_out] == ["r4"]                       # every 4th by run id
    c = res.cluster.calibration
    assert c.matmul_tflops == pytest.approx(TRUE_TFLOPS, rel=1e-6)
    for f in cal.BUSBW_FIELDS.values():
        assert getattr(c, f) == pytest.approx(TRUE_BUSBW, rel=1e-6)
    assert c.cpu_adam_rank_gparams_per_s == pytest.approx(TRUE_ADAM, rel=1e-6)
    # hand-computed: mean of the fit runs' device offsets; sum n r / sum n^2 with n = 2 ranks, r = 2 x offset
    fit = [k for k in PLANS if k != "r4"]
    assert c.device_fixed_gib == pytest.approx(sum(DEVICE_OFFSET[k] for k in fit) / 4, rel=1e-9)
    assert c.host_process_gib == pytest.approx(sum(2 * 2 * HOST_OFFSET[k] for k in fit) / (4 * 4), rel=1e-9)
    # r4 (2 x 2048 tokens) is the only run of its shape class and held out: that class gets no rate
    only_held = "matmul_tflops_by_shape.h4096_t4096"
    assert all(q.fitted for q in res.quantities if q.name != only_held)
    assert "only held-out runs" in _quantities(res)[only_held].note and only_held.split(".")[1] not in \
        c.matmul_tflops_by_shape
    # after the fit every run's predicted step time is its measured median, the held-out one too
    for row in res.rows:
        assert row.after["step_time_s"] == pytest.approx(row.measured["step_time_s"], rel=1e-6)
        assert abs(row.before["step_time_s"] / row.measured["step_time_s"] - 1) > 0.01


def test_held_out_measurement_does_not_change_the_fit(runs, tmp_path):
    first = calibrate([load_run(d) for d in runs], load_run(runs[0]).job.cluster).cluster.calibration
    held = runs[3]                                         # r4: held out
    s = json.loads((held / "summary.json").read_text())
    for r in s["results"]:
        r["phases_s"] = {k: 3.0 * v for k, v in r["phases_s"].items()}
        r["memory_peaks_gib"]["nvml"] += 40.0
    (held / "summary.json").write_text(json.dumps(s))
    again = calibrate([load_run(d) for d in runs], load_run(runs[0]).job.cluster).cluster.calibration
    assert dataclasses.replace(again, measured_on=None) == dataclasses.replace(first, measured_on=None)
    # without the split the changed run moves the fit (r4 is a host-bound ZeRO-3 run: its ZeRO-3 host time first)
    moved = calibrate([load_run(d) for d in runs], load_run(runs[0]).job.cluster, holdout_every=0).cluster.calibration
    assert (moved.matmul_tflops, moved.zero3_fetch_ms) != (pytest.approx(first.matmul_tflops, rel=1e-3),
                                                          pytest.approx(first.zero3_fetch_ms, rel=1e-3))


def test_cli_writes_a_cluster_that_moves_predictions_to_the_measurements(runs, tmp_path, capsys):
    out = tmp_path / "calibrated.yaml"
    report = tmp_path / "report.html"
    assert main(["calibrate", *map(str, runs), "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "held out" in printed and "r4" in printed
    text = out.read_text()
    assert text.startswith("# Cluster calibrated by `meshpilot calibrate`")
    assert "#   r1 " in text and "# runs held out" in text
    data = yaml.safe_load(text)
    assert data["calibration"]["matmul_tflops"] == pytest.approx(TRUE_TFLOPS, rel=1e-6)
    assert "data:image/png;base64," in report.read_text()
    # the YAML is a cluster: a job on it predicts the measured step time and the peak of the model + fixed cost
    for name, d in zip(PLANS, runs):
        job = load_job(None, BASE + PLANS[name] + [f"cluster={out}", "cluster.gpus_per_node=2"])
        p = predict(job, resolve_plan(job))
        r = load_run(d)
        assert p["step_time_s"] == pytest.approx(r.measured["step_time_s"], rel=1e-6)
    # meshpilot simulate accepts it
    assert main(["simulate", str(runs[0] / "job.yaml"), f"cluster={out}", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["step_time_s"] == pytest.approx(load_run(runs[0]).measured["step_time_s"], rel=1e-6)


def test_step_time_only_runs_fit_the_matrix_rate(tmp_path):
    """Older summaries without phases: one observation per run (the median step)."""
    dirs = [_write_run(tmp_path, k, PLANS[k], device_offset=1.0, host_offset=1.0, phases=False) for k in ("r1", "r2")]
    loaded = [load_run(d) for d in dirs]
    base = dataclasses.replace(loaded[0].job.cluster,
                               calibration=dataclasses.replace(TRUE, matmul_tflops=None))
    res = calibrate(loaded, base)
    q = _quantities(res)
    assert res.cluster.calibration.matmul_tflops == pytest.approx(TRUE_TFLOPS, rel=1e-6)
    assert not q["cpu_adam_rank_gparams_per_s"].fitted and "offloads" in q["cpu_adam_rank_gparams_per_s"].note


def test_too_few_runs_keeps_the_old_value_and_says_so(runs, tmp_path, capsys):
    out = tmp_path / "one.yaml"
    assert main(["calibrate", str(runs[0]), "--out", str(out)]) == 0         # r1: no offload
    printed = " ".join(capsys.readouterr().out.split())
    assert "kept" in printed
    text = out.read_text()
    assert "#   cpu_adam_rank_gparams_per_s: kept None -> None (0 run(s)); no run depends on it (no run offloads " \
        "the optimizer); kept" in text
    # one run cannot tell the bandwidth from the matrix rate: the bandwidths keep their (unset) value
    assert "busbw_gbs (all four, one factor): kept None -> None (1 run(s)); cannot be told apart" in text
    data = yaml.safe_load(out.read_text())
    assert data["calibration"]["cpu_adam_rank_gparams_per_s"] is None
    assert "# runs held out" not in out.read_text()                           # fewer than 4 runs: no split


def test_probe_results_replace_fields_first(runs, tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"calibration": {"h2d_gbs": 40.0, "d2h_gbs": 38.0, "measured_on": "x"}}))
    probe2 = tmp_path / "probe2.json"
    probe2.write_text(json.dumps({"calibration": {"h2d_gbs": 50.0}}))
    loaded = [load_run(d) for d in runs[:2]]
    res = calibrate(loaded, loaded[0].job.cluster, probes=[cal.read_probe(probe), cal.read_probe(probe2)])
    assert res.cluster.calibration.h2d_gbs == pytest.approx(45.0)
    assert res.cluster.calibration.d2h_gbs == pytest.approx(38.0)


def _exit2(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_refusals_exit_2(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _exit2(["calibrate", str(runs[0]), str(empty), "--out", str(tmp_path / "x.yaml")], capsys)
    assert "summary.json" in err and "RUN_DIR" in err
    # another cluster shape
    other = tmp_path / "other"
    job = load_job(None, BASE + ["cluster.gpus_per_node=4", "plan.dp=4"])
    other.mkdir()
    (other / "job.yaml").write_text(dump_job(job))
    s = json.loads((runs[0] / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps(s))
    err = _exit2(["calibrate", str(runs[0]), str(other), "--out", str(tmp_path / "x.yaml")], capsys)
    assert "different cluster shapes" in err
    # a failed run
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "job.yaml").write_text((runs[0] / "job.yaml").read_text())
    (failed / "summary.json").write_text(json.dumps(dict(s, status="failed")))
    assert "did not succeed" in _exit2(["calibrate", str(failed)], capsys)
    # another accelerator
    assert "--cluster" in _exit2(["calibrate", str(runs[0]), "--cluster", "local"], capsys)
    assert "--holdout" in _exit2(["calibrate", str(runs[0]), "--holdout", "-1"], capsys)
    assert not (tmp_path / "x.yaml").exists()


def test_recorded_gpu_runs_calibrate(tmp_path, capsys):
    """The 2 x H200 run directories of benchmarks/results: summaries without the new rows (step times
    from metrics.jsonl), one of them with optimizer offload."""
    dirs = [BENCH / d for d in ("run_z2", "run_z3", "run_z2_off")]
    out = tmp_path / "h200.yaml"
    assert main(["calibrate", *map(str, dirs), "--out", str(out)]) == 0
    res = calibrate([load_run(d) for d in dirs], load_run(dirs[0]).job.cluster)
    q = _quantities(res)
    assert q["cpu_adam_rank_gparams_per_s"].fitted and q["cpu_adam_rank_gparams_per_s"].runs == 1
    # the ZeRO-3 run's step is its host-bound fetches: its one observation goes to ZeRO-3's host time (1.13 ms a
    # tensor on that host; 1.2 fitted on 2026-11-30-s3's), and with 3 runs for 4 quantities the bus bandwidth,
    # which no run isolates, is left alone (before the ZeRO-3 host time was a quantity, the fit blamed the links:
    # x 0.06, 18 GB/s over NVLink, refused as non-physical)
    bw, z3 = q["*_busbw_gbs (all four, one factor)"], q["zero3_fetch_ms"]
    assert not bw.fitted and q["matmul_tflops"].fitted
    assert z3.fitted and z3.run_ids == ["run_z3"] and 0.8 < res.cluster.calibration.zero3_fetch_ms < 1.6
    after = [abs(r.after["step_time_s"] / r.measured["step_time_s"] - 1) for r in res.rows]
    before = [abs(r.before["step_time_s"] / r.measured["step_time_s"] - 1) for r in res.rows]
    assert sum(after) < sum(before)
    # the offload run's step is the one observation CPU Adam has: fitted exactly
    off = next(r for r in res.rows if r.run_id == "run_z2_off")
    assert off.after["step_time_s"] == pytest.approx(off.measured["step_time_s"], rel=1e-6)
    # status of such a run computes the comparison from its summary and job
    pvm = load_run(dirs[0]).comparison()
    assert pvm["per_rank"]["1"]["nvml"]["measured"] == pytest.approx(21.14642333984375)
    assert pvm["step_time_s"]["measured"] == pytest.approx(load_run(dirs[0]).measured["step_time_s"])


@pytest.mark.slow
def test_end_to_end_cpu_run_then_calibrate(tmp_path):
    """A real tiny CPU `meshpilot run` (2 gloo workers), then `meshpilot calibrate` on its run
    directory and `meshpilot simulate` on the written cluster, all as subprocesses."""
    from ray_cluster import subprocess_env
    env = subprocess_env(tmp_path / "home")
    run_dir = tmp_path / "runs" / "tiny"
    cli = [sys.executable, "-m", "meshpilot.orchestrator.cli"]
    r = subprocess.run([*cli, "run", str(ROOT / "examples" / "quickstart.yaml"), "train.steps=5",
                        "train.checkpoint_every=0", "train.checkpoint_final=false",
                        f"train.output_dir={tmp_path / 'runs'}", "--run-dir", str(run_dir)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    pvm = summary["predicted_vs_measured"]
    assert pvm["accelerator"] == "cpu" and pvm["step_time_s"]["measured"] > 0
    assert set(pvm["phases_s"]) == {"forward_backward", "optimizer"} and pvm["phases_s"]["optimizer"]["measured"] > 0
    rss = [v["host_rss"]["measured"] for v in pvm["per_rank"].values()]
    assert len(rss) == 2 and all(x > 0.1 for x in rss)
    st = subprocess.run([*cli, "status", str(run_dir), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["predicted_vs_measured"]["step_time_s"] == pvm["step_time_s"]
    out = tmp_path / "local-calibrated.yaml"
    c = subprocess.run([*cli, "calibrate", str(run_dir), "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert c.returncode == 0, c.stdout + c.stderr
    data = yaml.safe_load(out.read_text())
    assert data["name"] == "local-calibrated"
    # CPU workers: the device row is the workers' RSS; the fixed cost is the mean residual (one run)
    assert data["calibration"]["device_fixed_gib"] > 0
    sim = subprocess.run([*cli, "simulate", str(run_dir / "job.yaml"), f"cluster={out}", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["peak_memory_gib"] == pytest.approx(max(rss), rel=1e-6)


def test_zero3_host_time_is_fitted_from_host_bound_zero3_runs(tmp_path):
    """Runs made on a host whose ZeRO-3 fetches cost 2.0 ms a tensor (the constant says 1.2): two ZeRO-3 runs at
    micro-batch 1 (host-bound passes) beside three ZeRO 1-2 runs of the same shape class. The fit recovers 2.0 ms
    (and the rate and bandwidth) and puts every run's predicted step on its measured one; the ZeRO 1-2 runs alone
    leave it unset."""
    true = dataclasses.replace(TRUE, zero3_fetch_ms=2.0)
    plans = {"z2a": ["plan.zero_stage=2", "plan.micro_batch=1"],
             "z2b": ["plan.zero_stage=2", "plan.micro_batch=1", "plan.activation_checkpointing=full"],
             "z1a": ["plan.zero_stage=1", "plan.micro_batch=1"],
             "z3a": ["plan.zero_stage=3", "plan.micro_batch=1"],
             "z3b": ["plan.zero_stage=3", "plan.micro_batch=1", "plan.activation_checkpointing=full"]}
    dirs = {k: _write_run(tmp_path / "runs", k, v, device_offset=1.0, host_offset=1.0, true=true)
            for k, v in plans.items()}
    loaded = [load_run(d) for d in dirs.values()]
    res = calibrate(loaded, loaded[0].job.cluster, holdout_every=0)
    q = _quantities(res)["zero3_fetch_ms"]
    assert q.fitted and q.run_ids == ["z3a", "z3b"] and res.cluster.calibration.zero3_fetch_ms == pytest.approx(2.0, rel=1e-6)
    for row in res.rows:
        assert row.after["step_time_s"] == pytest.approx(row.measured["step_time_s"], rel=1e-6)
    assert any(abs(r.before["step_time_s"] / r.measured["step_time_s"] - 1) > 0.05 for r in res.rows)
    assert res.cluster.calibration.matmul_tflops == pytest.approx(TRUE_TFLOPS, rel=1e-6)
    only_z2 = calibrate([load_run(dirs[k]) for k in ("z2a", "z2b", "z1a")], loaded[0].job.cluster, holdout_every=0)
    q2 = _quantities(only_z2)["zero3_fetch_ms"]
    assert not q2.fitted and only_z2.cluster.calibration.zero3_fetch_ms is None and "ZeRO-3" in q2.note
