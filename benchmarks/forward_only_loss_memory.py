#!/usr/bin/env python
"""Peak memory of the built-in model's loss without autograd (zeroth-order steps,
evaluation): the whole batch's cross-entropy at once against ``FORWARD_ONLY_ROWS`` tokens
at a time (strategies/model.py, ``Transformer.head_loss``).

Each setting runs in its own subprocess. On a GPU the peak is torch's max allocated
during the forward; on the CPU, the growth of the process's peak RSS. The losses of both
settings are printed next to each other (they must be equal). Writes
``forward_only_loss_memory.json`` (card, date, versions) into ``--out``.

    python benchmarks/forward_only_loss_memory.py --out $OUT                      # CPU: tiny-llama, 50k vocabulary
    python benchmarks/forward_only_loss_memory.py --model opt-1.3b --batch 32 --out $OUT   # GPU, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WHOLE = 1 << 40          # FORWARD_ONLY_ROWS larger than any batch: the whole cross-entropy at once


def _child(model: str, vocab: int | None, batch: int, seq: int, rows: int) -> dict:
    import torch
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.config.models import model_preset
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    cuda = torch.cuda.is_available()
    preset = model_preset(model)
    cfg = ModelConfig(**({**preset, "vocab": vocab} if vocab else preset))
    dev = torch.device("cuda" if cuda else "cpu")
    with torch.device(dev):
        m = build_model(cfg, Plan(), None, seed=0, dtype=torch.bfloat16 if cuda else torch.float32, device=dev)
    m.FORWARD_ONLY_ROWS = rows
    ids = torch.randint(0, cfg.vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    lab = torch.roll(ids, -1, 1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        loss = float(m(ids, lab))
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(rows=rows, loss=loss, peak_gib=peak / 2**30, tokens=batch * seq, vocab=cfg.vocab,
                measure="torch max allocated above the model" if cuda else "peak RSS growth")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary (CPU default 50272)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default=os.environ.get("OUT") or "forward_only_loss_memory_out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    vocab = args.vocab or (None if torch.cuda.is_available() else 50272)
    if args.child:
        print(json.dumps(_child(args.model, vocab, args.batch, args.seq, int(args.child))))
        return 0
    from harness import metadata
    from meshpilot.strategies.model import Transformer
    rows = []
    for r in (WHOLE, Transformer.FORWARD_ONLY_ROWS):
        cmd = [sys.executable, __file__, "--child", str(r), "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq)] + (["--vocab", str(vocab)] if vocab else [])
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, vocabulary {rows[0]['vocab']}, {rows[0]['tokens']} tokens, no autograd ({rows[0]['measure']})")
    print(f"{'tokens per chunk':<18}{'peak GiB':>10}{'loss':>14}")
    for r in rows:
        print(f"{'whole batch' if r['rows'] == WHOLE else r['rows']:<18}{r['peak_gib']:>10.2f}{r['loss']:>14.6f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_only_loss_memory.json").write_text(json.dumps(dict(meta=metadata(), model=args.model,
                                                                       batch=args.batch, seq=args.seq, rows=rows),
                                                                  indent=1))
    print(f"wrote {out / 'forward_only_loss_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
