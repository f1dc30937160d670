"""`meshpilot probe`: bus-bandwidth arithmetic, the CPU probe (gloo collectives, matmul) and the profile it writes."""
from __future__ import annotations

import dataclasses
import math
import os
import time

import pytest
import torch

from meshpilot.comm.cost_model import alpha_beta_time, bus_bandwidth_gbs, bus_factor, fit_latency_bandwidth
from meshpilot.comm.probe import (ProbeReport, ProbeSettings, calibrated_profile, free_port, matmul_shapes,
                                  run_probe)
from meshpilot.orchestrator.cli.main import main
from meshpilot.orchestrator.config.clusters import cluster_preset
from meshpilot.orchestrator.config.schema import CalibrationConfig
from meshpilot.orchestrator.config.loader import load_job

KiB = 1024


# --- pure arithmetic --------------------------------------------------------------------------

def test_bus_factor_hand_values():
    assert bus_factor("all_reduce", 2) == 1.0            # 2 (n-1)/n
    assert bus_factor("all_reduce", 4) == 1.5
    assert bus_factor("all_reduce", 8) == 1.75
    assert bus_factor("all_gather", 4) == 0.75           # (n-1)/n
    assert bus_factor("reduce_scatter", 2) == 0.5
    assert bus_factor("all_to_all", 8) == 0.875
    assert bus_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError):
        bus_factor("broadcast", 2)
    # nccl-tests: 1 GiB all-reduce on 4 ranks in 4.5 ms -> algbw 238.6 GB/s, busbw 357.9 GB/s
    assert bus_bandwidth_gbs("all_reduce", 4, 2**30, 4.5e-3) == pytest.approx(1.5 * 2**30 / 4.5e-3 / 1e9)
    assert bus_bandwidth_gbs("all_reduce", 4, 2**30, 4.5e-3) == pytest.approx(357.91, abs=0.01)


def test_collective_time_inverts_bus_bandwidth():
    t = alpha_beta_time("all_gather", 256 * 2**20, 4, busbw_gbs=300.0, latency_s=10e-6)
    assert t == pytest.approx(10e-6 + 0.75 * 256 * 2**20 / 300e9)
    assert bus_bandwidth_gbs("all_gather", 4, 256 * 2**20, t - 10e-6) == pytest.approx(300.0)


def test_fit_latency_bandwidth_recovers_known_line():
    alpha_us, bw = 25.0, 42.0
    sizes = [2**k for k in range(16, 28, 2)]
    times = [alpha_us * 1e-6 + 1.5 * s / (bw * 1e9) for s in sizes]
    a, b = fit_latency_bandwidth(sizes, times, factor=1.5)
    assert a == pytest.approx(alpha_us, rel=1e-6)
    assert b == pytest.approx(bw, rel=1e-9)
    with pytest.raises(ValueError):
        fit_latency_bandwidth([1024, 1024], [1e-3, 2e-3], factor=1.0)


def test_matmul_mix_flops_are_three_times_a_layer_forward():
    T, h, f = 64, 32, 96
    shapes = matmul_shapes(T, h, f)
    assert len(shapes) == 12
    weights = h * 3 * h + h * h + h * 2 * f + f * h      # llama layer linears (q,k,v | o | gate,up | down)
    # forward 2*T*W FLOP, input gradient and weight gradient 2*T*W each: 6*T*W per layer
    assert sum(2 * m * k * n for _, m, k, n in shapes) == 6 * T * weights


def test_calibration_keys_are_calibration_config_fields():
    r = ProbeReport(device_name="x", date="d", settings=ProbeSettings())
    fitted_from_runs = {"cpu_adam_rank_gparams_per_s", "device_fixed_gib", "host_process_gib",   # meshpilot calibrate
                        "zero3_fetch_ms"}
    fitted_from_runs |= {"matmul_tflops_by_shape"}    # calibrate's read_probe: the mix's rate at the settings' shape
    assert set(r.calibration()) == {f.name for f in dataclasses.fields(CalibrationConfig)} - fitted_from_runs


def test_cpu_adam_per_thread_comes_from_the_rank_measurement():
    """A rank's 8 threads at 2.4 G parameters/s are 0.3 per thread; the node's 16 threads at 3.0 are its ceiling. The
    simulator's CPU Adam of one rank on that node is then min(8 x 0.3, 3.0 / 1) = 2.4 G/s, and two ranks share the
    ceiling: min(2.4, 3.0 / 2) = 1.5 G/s each."""
    import numpy as np

    from meshpilot.comm.probe import CpuAdamSample
    from meshpilot.orchestrator.config.loader import job_from_dict
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.step_time import cpu_adam_rate
    node = CpuAdamSample(params=3 * 10**9, steps=3, load_s=0.0, median_step_s=1.0, gparams_per_s=3.0, threads=16)
    rank = CpuAdamSample(params=24 * 10**8, steps=3, load_s=0.0, median_step_s=1.0, gparams_per_s=2.4, threads=8,
                         grad_scale_gparams_per_s=9.0, cast_gparams_per_s=7.0)
    cal = ProbeReport(device_name="x", date="d", settings=ProbeSettings(), cpu_adam=node, cpu_adam_rank=rank).calibration()
    assert cal["cpu_adam_gparams_per_thread"] == pytest.approx(0.3) and cal["cpu_adam_gparams_per_s"] == 3.0
    # the step's host passes are the rank's (its threads), not the node's
    assert cal["host_grad_scale_gparams_per_s"] == 9.0 and cal["host_cast_gparams_per_s"] == 7.0
    probed = {k: cal[k] for k in ("cpu_adam_gparams_per_thread", "cpu_adam_gparams_per_s")}
    job = job_from_dict({"model": "tiny-llama", "cluster": "h200-sxm-4"},
                        ["cluster.gpus_per_node=2", "cluster.cpu_cores=16",
                         *(f"cluster.calibration.{k}={v}" for k, v in probed.items())])
    rates = cpu_adam_rate(job.cluster, SimulatorConstants(), np.array([1, 2]))
    assert rates == pytest.approx([2.4e9, 1.5e9])


def test_cast_copy_rate_is_parameters_per_second_of_the_fp32_side():
    """4 GB of fp32 in 1.0 s is 1 G parameters per second; pinned copies do not count."""
    from meshpilot.comm.probe import CopySample, CpuAdamSample
    r = ProbeReport(device_name="x", date="d", settings=ProbeSettings(),
                    copies=[CopySample("h2d", 10**9, 0.02, 50.0), CopySample("cast_h2d", 4 * 10**9, 1.0, 4.0)])
    cal = r.calibration()
    assert cal["host_cast_copy_gparams_per_s"] == pytest.approx(1.0) and cal["h2d_gbs"] == pytest.approx(50.0)
    assert ProbeReport(device_name="x", date="d", settings=ProbeSettings()).cast_copy_gparams_per_s() is None
    # a rank's threads, at a sub-group's size, measure ZeRO-3's copies as its step runs them: they replace this
    # process's measurement, and give the copy the other way (parameter offload, the optimizer on the GPU)
    rank = CpuAdamSample(params=2**28, steps=3, load_s=0.0, median_step_s=0.1, gparams_per_s=2.6, threads=8,
                         cast_copy_h2d_gparams_per_s=1.5, cast_copy_d2h_gparams_per_s=0.35)
    both = ProbeReport(device_name="x", date="d", settings=ProbeSettings(), cpu_adam=rank, cpu_adam_rank=rank,
                       copies=[CopySample("cast_h2d", 4 * 10**9, 1.0, 4.0)]).calibration()
    assert both["host_cast_copy_gparams_per_s"] == 1.5 and both["host_cast_copy_d2h_gparams_per_s"] == 0.35


# --- the CPU probe: real gloo processes --------------------------------------------------------

SMALL = ProbeSettings(device="cpu", world=2, collective_sizes=(64 * KiB, 1024 * KiB), collective_warmup=1,
                      collective_iters=3, matmul_tokens=64, matmul_hidden=128, matmul_ffn=352, matmul_iters=2,
                      skip=("cpu_adam",), timeout_s=120.0)


@pytest.fixture(scope="module")
def cpu_report() -> ProbeReport:
    return run_probe(SMALL)


@pytest.mark.slow
def test_cpu_probe_collectives_consistent_with_timing(cpu_report):
    r = cpu_report
    ops = {s.op for s in r.collectives}
    assert ops == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
    for s in r.collectives:
        assert s.ranks == 2
        assert s.nbytes in (64 * KiB, 1024 * KiB)        # sizes divisible by 2 ranks: exact
        assert 0 < s.min_s <= s.median_s < 10.0
        # bus bandwidth is exactly f(op, n) * S / t of the recorded median time
        assert s.busbw_gbs == pytest.approx(bus_factor(s.op, 2) * s.nbytes / s.median_s / 1e9)
        assert s.algbw_gbs == pytest.approx(s.nbytes / s.median_s / 1e9)
        assert 1e-4 < s.busbw_gbs < 1000.0               # loopback gloo: far below memory bandwidth
    cal = r.calibration()
    best = max((s for s in r.collectives if s.op == "all_reduce"), key=lambda s: s.busbw_gbs)
    assert cal["allreduce_busbw_gbs"] == pytest.approx(best.busbw_gbs, rel=1e-3)
    # the cost model with the calibrated bandwidth reproduces that measurement's time
    t = alpha_beta_time("all_reduce", best.nbytes, 2, cal["allreduce_busbw_gbs"], 0.0)
    assert t == pytest.approx(best.median_s, rel=1e-3)
    assert r.latency_sample is not None and r.latency_sample.nbytes == 8 * KiB
    assert 0 <= cal["collective_latency_us"] <= r.latency_sample.median_s * 1e6


def _timed_allreduce(rank: int, world: int, port: int, nbytes: int, iters: int, out: str) -> None:
    """An independent measurement: wall time of ``iters`` back-to-back all-reduces on 2 gloo ranks."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.ones(nbytes // 4)
    dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    dt = (time.perf_counter() - t0) / iters
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(dt))
    dist.destroy_process_group()


@pytest.mark.slow
def test_cpu_probe_allreduce_agrees_with_independent_timing(cpu_report, tmp_path):
    nbytes = 1024 * KiB
    out = str(tmp_path / "t.txt")
    torch.multiprocessing.spawn(_timed_allreduce, args=(2, free_port(), nbytes, 5, out), nprocs=2)
    t_indep = float(open(out).read())
    probe = next(s for s in cpu_report.collectives if s.op == "all_reduce" and s.nbytes == nbytes)
    # same operation, same size: the two timings agree within the noise of a shared 2-core machine
    assert 1 / 8 < probe.median_s / t_indep < 8, (probe.median_s, t_indep)
    assert probe.busbw_gbs == pytest.approx(nbytes / probe.median_s / 1e9)   # n = 2: busbw = algbw


@pytest.mark.slow
def test_cpu_probe_matmul_and_skips(cpu_report):
    r = cpu_report
    assert len(r.matmul) == 12
    for m in r.matmul:
        assert m.tflops == pytest.approx(2 * m.m * m.k * m.n / m.median_s / 1e12)
        assert 0 < m.tflops < 100                       # a 2-core CPU is nowhere near 100 TFLOP/s
    mix = r.matmul_tflops()
    assert min(m.tflops for m in r.matmul) <= mix <= max(m.tflops for m in r.matmul)
    assert "copies" in r.skipped and "cpu_adam" in r.skipped and "gpu" in r.skipped
    cal = r.calibration()
    assert cal["h2d_gbs"] is None and cal["d2h_gbs"] is None and cal["cpu_adam_gparams_per_s"] is None
    assert "cpu" in cal["measured_on"]


@pytest.mark.slow
def test_profile_loads_as_job_cluster(cpu_report, tmp_path):
    base = cluster_preset("local")
    prof = calibrated_profile(base, cpu_report)
    assert prof["name"] == "local-probed"              # not re-detected on load
    import yaml
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(prof, sort_keys=False))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"model: tiny-llama\ncluster: {path}\ntrain: {{global_batch: 2, seq_len: 32}}\n")
    job = load_job(job_file)
    cal = job.cluster.calibration
    assert cal.allreduce_busbw_gbs == pytest.approx(cpu_report.calibration()["allreduce_busbw_gbs"])
    assert cal.matmul_tflops > 0 and cal.alltoall_busbw_gbs > 0
    assert cal.h2d_gbs is None
    assert job.cluster.gpus_per_node == base["gpus_per_node"]
    # and as an override of a job given with another cluster
    job2 = load_job(job_file, [f"cluster={path}"])
    assert job2.cluster.calibration == cal


# --- the command line ---------------------------------------------------------------------------

def test_cli_rejects_bad_arguments_before_measuring(capsys, tmp_path):
    assert main(["probe", "--cluster", "no-such-cluster", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "unknown cluster preset" in capsys.readouterr().err
    assert main(["probe", "--skip", "matmul,bogus", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where no GPU is visible")
def test_cli_refuses_a_gpu_cluster_without_a_gpu_before_measuring(tmp_path, capsys, monkeypatch):
    import meshpilot.comm.probe as probe

    def measure(*a, **k):
        raise AssertionError("measured although the calibration would be refused")

    monkeypatch.setattr(probe, "run_probe", measure)
    out = tmp_path / "my.yaml"
    t0 = time.monotonic()
    assert main(["probe", "--cluster", "h100-sxm-4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "h100-sxm-4" in err and "no visible GPU" in err and "--cluster local" in err
    assert not out.exists() and time.monotonic() - t0 < 30


def test_cli_writes_profile_without_collectives(tmp_path, capsys):
    """The CLI path end to end on a preset base: matmul only (fast), the rest skipped and said so.
    The base is a GPU preset where a GPU is visible, else the detected local CPU cluster."""
    gpu = torch.cuda.is_available()
    base = "h100-sxm-4" if gpu else "local"
    out = tmp_path / "profile.yaml"
    assert main(["probe", "--quick", "--cluster", base, "--skip", "collectives,cpu_adam",
                 "--out", str(out), "--json", str(tmp_path / "raw.json")]) == 0
    text = out.read_text()
    assert "# skipped collectives: skipped on request" in text
    job = load_job(None, ["model=tiny-llama", f"cluster={out}"])
    preset = cluster_preset(base)
    assert job.cluster.name == ("h100-sxm-4" if gpu else "local-probed")
    assert job.cluster.gpus_per_node == preset["gpus_per_node"]
    assert job.cluster.intra_node_bandwidth_gbs == preset["intra_node_bandwidth_gbs"]   # datasheet fields are kept
    assert job.cluster.calibration.matmul_tflops > 0
    assert job.cluster.calibration.allreduce_busbw_gbs is None
    import json
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert len(raw["matmul"]) == 12 and math.isclose(raw["calibration"]["matmul_tflops"],
                                                     job.cluster.calibration.matmul_tflops)
    assert "skipped collectives" in capsys.readouterr().out


# --- the accuracy report: fit on synthetic measurements -------------------------------------------

def _bench_modules():
    import importlib
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("harness"), importlib.import_module("accuracy_report")


def test_accuracy_report_fits_constants_on_synthetic_measurements(tmp_path):
    """Measurements made by the simulator with known 'true' constants: the fit must recover them on the holdout."""
    import json
    H, R = _bench_modules()
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.simulator import simulate
    d = SimulatorConstants()
    # 'true' constants on the fit's grid from the defaults: context x 2.0, matrix rate x 0.7
    true = d.replace(cuda_context_gib=2.0 * d.cuda_context_gib, matmul_efficiency=0.7 * d.matmul_efficiency)
    names = ["m04-z0-dp2-mb4", "m1b-z2-dp4-mb4", "m04-z3-dp2-mb4", "m3b-z2-dp4-mb2", "m7b-z0-dp4-mb1"]
    configs = H.load_configs(names=names)
    results = []
    from meshpilot.orchestrator.config.loader import job_from_dict
    from meshpilot.orchestrator.plan.plan import resolve_plan
    for c in configs:
        # what measure_deepspeed runs: DeepSpeed's own defaults on transformers' Llama, which load_cases
        # predicts with as well
        stage = int((c.raw.get("plan") or {}).get("zero_stage") or 0)
        raw = dict(c.raw, train=dict(c.raw.get("train") or {}, deepspeed_extra=R.deepspeed_defaults(stage)))
        job = job_from_dict(raw, [*c.overrides, "model.implementation=hf"])
        e = simulate(job, resolve_plan(job), constants=true)
        ok = e.fits
        results.append(dict(name=c.name, kind=c.kind, job=c.raw, overrides=list(c.overrides),
                            status="ok" if ok else "oom", nvml_peak_gib=[e.peak_memory_gib] if ok else None,
                            step_time_s=e.step_time_s if ok else None))
    # the 7B ZeRO-0 job needs > 100 GiB per GPU: it is the OOM case; and one config that "OOMed" although
    # the simulator says it fits must be counted as predicted-fits-but-OOMed
    assert [r["status"] for r in results].count("oom") == 1
    results.append(dict(results[0], name="fake-oom", status="oom", nvml_peak_gib=None, step_time_s=None))
    path = tmp_path / "m.json"
    path.write_text(json.dumps(dict(card="synthetic", gpus=4, date="-", versions={}, results=results)))
    cases, _ = R.load_cases([str(path)])
    base = SimulatorConstants()
    rows = R.predict(cases, base, R.default_predictor())
    s = R.summarize(rows)
    assert s.missed_oom == 1 and s.n == 6
    assert s.mem_mape > 1.0 and s.time_mape > 10.0            # the defaults are off by construction
    # hand check of one error: (pred - measured) / measured
    r0 = rows[0]
    assert r0.mem_err == pytest.approx(100 * (r0.peak_gib - r0.case.peak_gib) / r0.case.peak_gib)
    cases = [c for c in cases if c.name != "fake-oom"]
    cal, hold = R.split(cases)
    assert {c.name for c in cal} | {c.name for c in hold} == set(names) and not {c.name for c in cal} & {c.name for c in hold}
    fitted = R.fit_constants(cal, base, R.default_predictor(), sweeps=2,
                             fields={"memory": ["cuda_context_gib"], "time": ["matmul_efficiency"]})
    assert fitted.cuda_context_gib == pytest.approx(true.cuda_context_gib, rel=1e-6)    # x 2.0 is on the grid
    after = R.summarize(R.predict(hold, fitted, R.default_predictor()))
    before = R.summarize(R.predict(hold, base, R.default_predictor()))
    assert after.mem_mape < 0.5 < before.mem_mape
    assert after.time_mape < before.time_mape / 3
    R.save_constants(tmp_path / "c.yaml", fitted, {"note": "test"})
    assert R.load_constants(tmp_path / "c.yaml") == fitted


def _cpu_adam_built() -> bool:
    from pathlib import Path
    from torch.utils.cpp_extension import _get_build_directory
    d = Path(_get_build_directory("cpu_adam", verbose=False))
    return any(d.glob("cpu_adam*.so")) and not (d / "lock").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeedCPUAdam not built yet (a first build takes minutes on 2 cores)")
def test_cpu_adam_probe_rate_matches_its_timing():
    from meshpilot.comm.probe import probe_cpu_adam
    import torch

    from meshpilot.orchestrator.config.node_limits import node_cpu_cores
    threads = torch.get_num_threads()
    s = probe_cpu_adam(ProbeSettings(adam_params=2**18, adam_steps=3))
    assert s.params == 2**18 and s.load_s >= 0 and s.threads == node_cpu_cores()
    assert s.gparams_per_s == pytest.approx(s.params / s.median_step_s / 1e9)
    one = probe_cpu_adam(ProbeSettings(adam_params=2**18, adam_steps=3), threads=1)
    assert one.threads == 1 and torch.get_num_threads() == threads          # the process's threads restored
    assert 1e-5 < s.gparams_per_s < 100          # params per second of 2 shared cores: well below 1e11
    # the host passes beside Adam, timed on the same parameters and threads (at 2^18 parameters on 2 shared cores
    # fixed costs dominate, so their rates are bounded, not compared with Adam's)
    assert 1e-5 < s.grad_scale_gparams_per_s < 1000 and 1e-5 < s.cast_gparams_per_s < 1000


# --- the GPU accuracy harness: config list and scheduling (no GPU needed) ---------------------------

@pytest.fixture(scope="module")
def bench_configs():
    H, _ = _bench_modules()
    return H.load_configs()


def test_accuracy_config_list_covers_the_issue(bench_configs):
    """>= 20 DeepSpeed configs (ZeRO 0-3, both offloads, micro-batch, checkpointing, 0.3B-7B, dp 2 and 4) and >= 5 ZO."""
    from meshpilot.orchestrator.config.models import param_counts
    ds = [c for c in bench_configs if c.kind == "deepspeed"]
    zo = [c for c in bench_configs if c.kind == "zo"]
    assert len(ds) >= 20 and len(zo) >= 5
    plans = [c.plan() for c in ds]
    assert {p.zero_stage for p in plans} == {0, 1, 2, 3}
    assert any(p.offload_optimizer == "cpu" for p in plans) and any(p.offload_params == "cpu" for p in plans)
    assert any(p.activation_checkpointing == "full" for p in plans) and any(p.grad_accum > 1 for p in plans)
    assert {p.dp for p in plans} == {2, 4} and len({p.micro_batch for p in plans}) >= 3
    sizes = [param_counts(c.job().model).total for c in ds]
    assert min(sizes) < 0.5e9 and max(sizes) > 6e9
    assert all(c.plan().zeroth_order for c in zo)
    assert all(c.job().cluster.name == "h100-sxm-4" and c.job().model.arch == "llama" for c in bench_configs)
    # offload configs run alone (CPU Adam uses every core) and come after the others (FusedAdam built first)
    first_off = min(i for i, c in enumerate(ds) if c.plan().offload_optimizer != "none")
    assert all(c.exclusive for c in ds[first_off:]) and not any(c.exclusive for c in ds[:first_off])


def test_scheduler_packs_disjoint_gpus_and_runs_exclusive_alone(bench_configs):
    import threading
    H, _ = _bench_modules()
    picked = [c for c in bench_configs if c.kind == "deepspeed"]
    picked = [c for c in picked if c.world == 2 and not c.exclusive][:3] + \
             [c for c in picked if c.world == 4 and not c.exclusive][:1] + [c for c in picked if c.exclusive][:2]
    lock, active, log, results = threading.Lock(), {}, [], {}

    def run_one(cfg, gpus):
        with lock:
            busy = [g for _, gs in active.values() for g in gs]
            assert not set(gpus) & set(busy), (cfg.name, gpus, busy)
            if cfg.exclusive:
                assert not active, f"{cfg.name} started beside {list(active)}"
            assert not any(c.exclusive for c, _ in active.values()), f"{cfg.name} started beside an exclusive config"
            active[cfg.name] = (cfg, gpus)
            log.append((cfg.name, tuple(gpus), len(active)))
        time.sleep(0.3)
        with lock:
            del active[cfg.name]
        return dict(status="ok")

    H.schedule(picked, 4, run_one, lambda cfg, res: results.__setitem__(cfg.name, res))
    assert set(results) == {c.name for c in picked}
    assert all(r["status"] == "ok" for r in results.values()), results
    assert all(len(g) == c.world for c in picked for n, g, _ in log if n == c.name)
    assert max(k for _, _, k in log) == 2               # two dp=2 configs ran side by side
    big = H.load_configs(names=["m04-z2-dp4-mb8"])
    skipped = {}
    H.schedule(big, 2, run_one, lambda cfg, res: skipped.__setitem__(cfg.name, res))
    assert skipped["m04-z2-dp4-mb8"]["status"] == "skipped"


def test_accuracy_report_reads_train_bench_rows():
    """train_bench.py rows become one case per config: the median of the meshpilot launches' medians,
    the largest NVML reading over ranks and launches, and the plan the benchmark ran (dp = world)."""
    _, R = _bench_modules()
    mem = lambda nvml: [{"rank": 0, "nvml_used": nvml, "torch_reserved_peak": 2**30, "torch_allocated_peak": 2**29}]
    row = dict(config="1b_zero2_offload_opt", model="llama-1b", plan={"zero_stage": 2, "offload_optimizer": "cpu"},
               world=4, seq_len=2048, global_batch=8)
    data = dict(benchmark="train_bench", card="NVIDIA H200", gpus=4, rows=[
        dict(row, mode="meshpilot", step_time_s=0.40, memory=mem(12 * 2**30)),
        dict(row, mode="meshpilot", step_time_s=0.50, memory=mem(13 * 2**30)),
        dict(row, mode="meshpilot", step_time_s=0.90, memory=mem(11 * 2**30)),
        dict(row, mode="direct", step_time_s=0.10, memory=mem(99 * 2**30)),        # not meshpilot: not a case
        dict(row, config="failed", mode="meshpilot", error="OOM")])                 # no step time: not a case
    (c,) = R.train_bench_cases(data, "x.json")
    assert c.name == "1b_zero2_offload_opt_dp4" and c.step_s == 0.50 and c.peak_gib == 13.0
    assert c.reserved_gib == 1.0 and c.allocated_gib == 0.5
    assert (c.plan.dp, c.plan.tp, c.plan.micro_batch, c.plan.grad_accum) == (4, 1, 2, 1)
    assert c.plan.zero_stage == 2 and c.plan.offload_optimizer == "cpu"
    assert c.job.cluster.name == "h200-sxm-4" and c.job.cluster.gpus_per_node == 4


def test_run_warns_when_workers_compile_their_imports():
    from meshpilot.orchestrator.cli.cmd_run import bytecode_hint
    assert "PYTHONPYCACHEPREFIX" in bytecode_hint({"PYTHONDONTWRITEBYTECODE": "1"})
    assert bytecode_hint({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/tmp/pyc"}) is None
    assert bytecode_hint({}) is None
