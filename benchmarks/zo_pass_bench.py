#!/usr/bin/env python
"""Time MeZO's three parameter passes (plus, switch, restore+update) over a whole model on
one GPU: the PyTorch ops, the fused Triton kernel launched per parameter, and the same
kernel launched once over all parameters (strategies/zo/fused.py).

The floor of a pass is one read and one write of every weight: ``2 * w * P`` bytes (w = 2
for bf16) over the device's copy bandwidth, which this script measures in the same run
(a large device-to-device copy, bytes read + written). The PyTorch passes also write and
read an fp32 ``z`` (and ``eps z``) per element and launch ~5 kernels and a generator per
parameter. Timed with CUDA events over ``--repeats`` steps after a warm-up; median.

    python benchmarks/zo_pass_bench.py --model opt-1.3b --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import metadata  # noqa: E402


def _params(model_name: str, device: torch.device):
    """The model's trainable parameters in MeZO's order, as bf16 N(0, 0.02^2) tensors on
    ``device`` (shapes from a meta-device build: the values do not matter for the timing)."""
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.config.models import model_preset
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies import model as model_mod, moe, tensor_parallel
    from meshpilot.strategies.model import build_model
    from meshpilot.strategies.zo import ZOParam, zo_parameters

    def meta_normal(name, shape, std, seed):
        return torch.empty(shape, device="meta")
    from meshpilot.strategies import init_utils
    for mod in (init_utils, model_mod, moe, tensor_parallel):     # init_utils: what RandomWeights calls
        if hasattr(mod, "full_normal"):
            mod.full_normal = meta_normal
    with torch.device("meta"):
        model = build_model(ModelConfig(**model_preset(model_name)), Plan(zo_mode="mezo"), None, seed=0,
                            device="meta")
    out = []
    for zp in zo_parameters(model):
        t = torch.nn.Parameter((torch.randn(zp.param.shape, device=device) * 0.02).to(torch.bfloat16),
                               requires_grad=False)
        out.append(ZOParam(zp.index, zp.name, t, zp.decay))
    return out


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 10)."""
    a = torch.empty(1 << 31, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def _time_passes(params, repeats: int, grouped: bool) -> dict[str, float]:
    """Median seconds of each pass over all ``params`` (per parameter, or one grouped launch)."""
    from meshpilot.strategies.zo import fused
    from meshpilot.strategies.zo.mezo import apply_passes
    groups = fused.GroupCache() if grouped else None
    tensors = [zp.param.data for zp in params]
    out: dict[str, list[float]] = {"plus": [], "switch": [], "restore+update": []}
    for r in range(repeats + 2):
        for kind in out:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            apply_passes(kind, params, tensors, 1000 + r, 1e-3, g=0.5, lr=1e-7, weight_decay=0.0, groups=groups)
            e.record()
            e.synchronize()
            if r >= 2:
                out[kind].append(s.elapsed_time(e) / 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT") or "zo_pass_bench_out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    params = _params(args.model, device)
    print(f"{len(params)} tensors on {torch.cuda.get_device_name(device)}", flush=True)
    n = sum(zp.param.numel() for zp in params)
    w = params[0].param.element_size()
    bw = _copy_bandwidth(device)
    floor_s = 2 * w * n / bw
    rows = {}
    for name, kernel, grouped in (("torch", "torch", False), ("triton per tensor", "triton", False),
                                  ("triton grouped", "triton", True)):
        os.environ["MESHPILOT_ZO_KERNEL"] = kernel
        rows[name] = _time_passes(params, args.repeats, grouped)
    step = {k: sum(v.values()) for k, v in rows.items()}
    res = dict(meta=metadata(), model=args.model, params=n, tensors=len(params), bytes_per_weight=w,
               copy_bandwidth_gbs=bw / 1e9, floor_s_per_pass=floor_s, seconds=rows, three_passes_s=step,
               speedup_vs_torch={k: step["torch"] / v for k, v in step.items()})
    print(f"{args.model}: {n / 1e9:.2f} B parameters in {len(params)} tensors, bf16; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s -> floor {floor_s * 1e3:.2f} ms per pass (one read + one write)")
    print(f"{'pass':<16}" + "".join(f"{k + ' ms':>20}" for k in rows) + f"{'grouped vs floor':>18}")
    for kind in rows["torch"]:
        print(f"{kind:<16}" + "".join(f"{rows[k][kind] * 1e3:>20.2f}" for k in rows)
              + f"{rows['triton grouped'][kind] / floor_s:>17.2f}x")
    print(f"{'three passes':<16}" + "".join(f"{v * 1e3:>20.2f}" for v in step.values()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zo_pass_bench.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'zo_pass_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
