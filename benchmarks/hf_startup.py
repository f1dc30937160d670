"""Start-up of `meshpilot run` from a Hugging Face checkpoint against random initialisation.

Issue #18's start-up target: a 7B checkpoint under tp=2 or ZeRO-3 on 2 GPUs reaches its first
step in under 60 s from the command (page cache warm). For each plan this script runs
`meshpilot run` twice in the same call, from the checkpoint and from random weights (the
baseline), and reports the run summary's ``time_to_first_step_s`` (command start to the end of
the first optimizer step), the worker's model-build phase, and their ratio.

A small warm-up run goes first (DeepSpeed's op builds). The checkpoint is written first by ``transformers`` (random weights of the preset's shape,
bf16, safetensors shards; not timed) and then read once end to end, so the page cache is warm
as the target assumes.

    python benchmarks/hf_startup.py --model llama-2-7b --ckpt /tmp/llama7b-hf --out $R/hf_startup \\
        --set cluster=h200-sxm-4 cluster.gpus_per_node=2 cluster.cpu_memory_gib=256 cluster.cpu_cores=32

Prints a table; writes ``OUT/hf_startup.json`` with card, date, versions and the command.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PLANS = {
    "tp2": ["plan.tp=2", "plan.dp=1", "plan.zero_stage=0", "plan.micro_batch=1"],
    "zero3": ["plan.tp=1", "plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=1",
              "plan.activation_checkpointing=full"],
}


def make_checkpoint(preset: str, out: Path) -> float:
    """Write a random-weight HF llama directory of ``preset``'s shape (bf16, 5 GB shards)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshpilot.orchestrator.config.loader import load_job
    m = load_job(None, [f"model={preset}", "cluster=h200-sxm-4"]).model
    cfg = LlamaConfig(hidden_size=m.hidden, intermediate_size=m.ffn, num_hidden_layers=m.layers,
                      num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab,
                      max_position_embeddings=m.max_positions, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                      tie_word_embeddings=bool(m.tie_embeddings), torch_dtype="bfloat16")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    del model
    return time.perf_counter() - t0


def make_checkpoint_in_subprocess(preset: str, out: Path) -> float:
    """:func:`make_checkpoint` in its own process: the GPU memory its model held (torch's caching
    allocator keeps it after ``del``) must not count in the NVML peaks of the runs measured after it
    (it added 28 GiB to every NVML reading of the first hf7b call, 2026-11-29-s2-h200x2)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); from hf_startup import "
            "make_checkpoint; print(make_checkpoint(sys.argv[1], Path(sys.argv[2])))")
    p = subprocess.run([sys.executable, "-c", code, preset, str(out), str(Path(__file__).resolve().parent)],
                       capture_output=True, text=True, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def checkpoint_args(ap: argparse.ArgumentParser, model: str) -> None:
    """The arguments of the benchmarks that run from a Hugging Face checkpoint of a preset."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--ckpt", type=Path, required=True, help="where the HF checkpoint is written (or reused)")
    ap.add_argument("--job", default="benchmarks/configs/h200x2_check.yaml")
    ap.add_argument("--out", type=Path, required=True)


def ensure_checkpoint(a: argparse.Namespace) -> float | None:
    """Create ``a.out``; write ``a.model``'s checkpoint to ``a.ckpt`` unless one is there (seconds taken,
    None when it was reused)."""
    a.out.mkdir(parents=True, exist_ok=True)
    if (a.ckpt / "config.json").exists():
        return None
    made = make_checkpoint_in_subprocess(a.model, a.ckpt)
    print(f"checkpoint written in {made:.1f} s to {a.ckpt}", flush=True)
    return made


def warm(path: Path) -> float:
    """Read every file once (page cache warm); returns the bytes read in GB."""
    n = 0
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 26):
                    n += len(chunk)
    return n / 1e9


def run_one(job: str, sets: list[str], plan: list[str], init: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "meshpilot.orchestrator.cli", "run", job, *sets, *plan, *init,
           "--run-dir", str(run_dir), "--no-progress", "--max-restarts", "0"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (run_dir.parent / f"{run_dir.name}.log").write_text(p.stdout + p.stderr)
    summary_path = run_dir / "summary.json"
    s = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    phases = s.get("startup_phases_s", {})
    return dict(rc=p.returncode, status=s.get("status"), wall_s=round(wall, 2),
                time_to_first_step_s=s.get("time_to_first_step_s"),
                model_build_s=phases.get("worker: model build"), startup_phases_s=phases,
                final_loss=s.get("final_loss"), command=" ".join(cmd))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkpoint_args(ap, "llama-2-7b")
    ap.add_argument("--plans", nargs="+", default=list(PLANS))
    ap.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides")
    a = ap.parse_args()
    made = ensure_checkpoint(a)
    gb = warm(a.ckpt)
    print(f"page cache warmed: {gb:.1f} GB", flush=True)
    sets = [*a.set, "train.steps=2", "train.global_batch=2", "train.seq_len=2048", "train.checkpoint_final=false"]
    # one small run first, not reported: DeepSpeed compiles its optimizer op on first use, which
    # would otherwise fall on whichever measured run came first
    w = run_one(a.job, [*sets, "model=tiny-llama", "train.seq_len=128"], PLANS[a.plans[0]], [], a.out / "warmup")
    print(f"warm-up run rc={w['rc']} in {w['wall_s']} s", flush=True)
    rows = []
    for name in a.plans:
        for init, extra in (("checkpoint", [f"model={a.ckpt}"]), ("random", [f"model={a.model}"])):
            r = run_one(a.job, sets, PLANS[name], extra, a.out / f"{name}_{init}")
            r.update(plan=name, init=init)
            rows.append(r)
            print(f"{name:6s} {init:10s} rc={r['rc']} first step {r['time_to_first_step_s']} s "
                  f"(model build {r['model_build_s']} s) loss {r['final_loss']}", flush=True)
    print(f"\n{'plan':6s} {'init':10s} {'first step s':>12s} {'build s':>8s} {'vs random':>9s}")
    for r in rows:
        base = next(b for b in rows if b["plan"] == r["plan"] and b["init"] == "random")
        ratio = (r["time_to_first_step_s"] / base["time_to_first_step_s"]
                 if r["time_to_first_step_s"] and base["time_to_first_step_s"] else None)
        print(f"{r['plan']:6s} {r['init']:10s} {r['time_to_first_step_s'] or float('nan'):12.1f} "
              f"{r['model_build_s'] or float('nan'):8.1f} {ratio or float('nan'):9.2f}")
    from harness import metadata, write_json       # card (from NVML: no CUDA context here), date, versions
    write_json(a.out / "hf_startup.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                               model=a.model, checkpoint_write_s=made, checkpoint_gb=round(gb, 2),
                                               rows=rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
