"""GPU time of one decoder block of the built-in model, forward and backward, per architecture, against the
simulator's compute for it.

The simulator's compute of a micro-batch is FLOPs / rate: ``2 P_mm + 4 L S h`` FLOPs per token at one
matrix rate for the shape class (hidden, tokens), backward = 2 x forward. opt-6.7b ran 10% faster in its
forward and 18% faster in backward + recompute than predicted while llama-2-7b, of the same FLOPs, ran as
predicted (benchmarks/results/2026-11-30-s3-h200x2/z3new): this script measures the blocks alone, one GPU,
no DeepSpeed, to see whether the block's own kernels (its matrix shapes, its element-wise layers) differ.

Per model: a block built as the worker builds it (``strategies.model.Block``, bf16, random weights), input
``[mb, seq, h]``; the median of ``--iters`` timed forwards (autograd on) and backwards (CUDA events) after
warm-up; the simulator's per-block forward (the block's share of ``forward_flops`` at the simulator's rate);
and the forward's matrix products alone, timed as bare ``torch.nn.functional.linear`` calls of the block's
shapes (the part FLOPs describe).

    python benchmarks/layer_compute.py --out $R/layers            # on one GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402

MODELS = ["llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-1b", "opt-6.7b", "opt-2.7b", "opt-13b"]
JOB = "benchmarks/configs/h200x2_check.yaml"


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, CUDA events around each."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def block_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every matrix product of one dense block: q, k, v, o, then the MLP's."""
    hd = cfg.hidden // cfg.heads
    kv = (cfg.kv_heads or cfg.heads) * hd
    attn = [(cfg.hidden, cfg.hidden), (cfg.hidden, kv), (cfg.hidden, kv), (cfg.hidden, cfg.hidden)]
    if cfg.arch.value in ("llama", "mixtral"):
        return attn + [(cfg.hidden, cfg.ffn), (cfg.hidden, cfg.ffn), (cfg.ffn, cfg.hidden)]
    return attn + [(cfg.hidden, cfg.ffn), (cfg.ffn, cfg.hidden)]


def measure(name: str, mb: int, seq: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.flops import forward_flops
    from meshpilot.orchestrator.sim.memory import model_terms
    from meshpilot.orchestrator.sim.step_time import achieved_rate
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.strategies.model import Block, resolved_model_config, weight_source

    job = load_job(JOB, [f"model={name}", "cluster.gpus_per_node=1", "plan.dp=1", f"plan.micro_batch={mb}",
                         f"train.global_batch={mb}", f"train.seq_len={seq}"])
    cfg = resolved_model_config(job.model)
    dev = torch.device("cuda")
    src = weight_source(cfg, 0)
    try:
        block = Block(cfg, 0, weights=src, tp_group=None, ep_group=None, sequence_parallel=False,
                      dtype=torch.bfloat16, device=dev).to(dev, torch.bfloat16)   # as the engine moves and casts it
    finally:
        src.close()
    x = torch.randn(mb, seq, cfg.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    fwd = timed(lambda: block(x), iters)
    y = block(x)
    g = torch.randn_like(y)

    def fwd_bwd():
        block(x).backward(g)
    both = timed(fwd_bwd, iters)
    # the forward's matrix products alone, at the block's shapes
    ws = [torch.randn(o, i, device=dev, dtype=torch.bfloat16) for i, o in block_shapes(cfg)]
    xs = {i: torch.randn(mb * seq, i, device=dev, dtype=torch.bfloat16) for i, _ in block_shapes(cfg)}
    gemm = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in ws], iters)
    # the simulator: one block's share of the forward at the simulator's rate
    mt = model_terms(job.model)
    c = SimulatorConstants()
    tokens = mb * seq
    rate = float(achieved_rate(job, mt.hidden, tokens, c))
    per_block_flops = (forward_flops(mt.matmul_params, mt.layers, seq, mt.hidden)
                       - 2.0 * cfg.vocab * cfg.hidden) / mt.layers
    pred_fwd = tokens * per_block_flops / rate
    gemm_flops = 2.0 * tokens * sum(i * o for i, o in block_shapes(cfg))
    return dict(model=name, arch=cfg.arch.value, hidden=cfg.hidden, ffn=cfg.ffn, heads=cfg.heads, mb=mb, seq=seq,
                forward_s=fwd, backward_s=both - fwd, fwd_bwd_s=both, gemm_forward_s=gemm,
                gemm_tflops=gemm_flops / gemm / 1e12, predicted_forward_s=pred_fwd,
                predicted_rate_tflops=rate / 1e12, bwd_over_fwd=(both - fwd) / fwd,
                fwd_measured_over_predicted=fwd / pred_fwd, bwd_measured_over_predicted=(both - fwd) / (2 * pred_fwd))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--mb", type=int, nargs="*", default=[8, 1])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    import torch
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':12s} {'mb':>3s} {'fwd ms':>8s} {'pred':>8s} {'meas/pred':>9s} {'bwd ms':>8s} {'bwd/fwd':>7s} "
          f"{'gemm ms':>8s} {'gemm TF':>8s} {'sim TF':>7s}")
    for mb in a.mb:
        for name in a.models:
            r = measure(name, mb, a.seq, a.iters)
            torch.cuda.empty_cache()                    # the block and its tensors went with measure's frame
            rows.append(r)
            print(f"{name:12s} {mb:3d} {1e3 * r['forward_s']:8.2f} {1e3 * r['predicted_forward_s']:8.2f} "
                  f"{r['fwd_measured_over_predicted']:9.3f} {1e3 * r['backward_s']:8.2f} {r['bwd_over_fwd']:7.2f} "
                  f"{1e3 * r['gemm_forward_s']:8.2f} {r['gemm_tflops']:8.1f} {r['predicted_rate_tflops']:7.1f}",
                  flush=True)
    write_json(a.out / "layer_compute.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
