#!/usr/bin/env python
"""Bytes per logit that transformers' causal-LM loss holds at its peak without autograd (zeroth-order steps,
evaluation), counted on the CPU: the simulator's ``hf_logits_forward_only_bytes``.

A Hugging Face model (``model.implementation: hf``, and the MeZO loop of benchmarks/measure_zo.py) forms the logits of
every token of the micro-batch at once: bf16 logits (2 bytes), their fp32 copy (4) and the fp32 log-softmax inside
``cross_entropy`` (4). The built-in model forms them ``FORWARD_ONLY_ROWS`` tokens at a time instead.

Counted, not timed: a ``TorchDispatchMode`` adds the bytes of every storage an operator creates and subtracts them when
the storage is freed; the peak of that sum over one forward with labels, under ``torch.no_grad``, of a tiny bf16
``LlamaForCausalLM`` (hidden 64, 2 layers: the logits dominate) is divided by tokens x vocabulary. Both losses are
counted: transformers' own (``labels=``) and meshpilot's adapter (strategies/hf_adapter.py ``CausalLMLoss``).
Prints a table and writes ``hf_forward_only_loss_bytes.json`` (card, date, versions, command) into ``--out``.

    python benchmarks/hf_forward_only_loss_bytes.py --out $OUT
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402

SHAPES = [(32000, 4, 256), (32000, 8, 256), (64000, 4, 256), (128256, 2, 128)]   # vocabulary, batch, sequence


def peak_live_bytes(fn) -> int:
    """Peak of the bytes of live storages created by the operators ``fn`` runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key, n = st.data_ptr(), st.nbytes()
                    if n == 0 or key in self.seen:
                        continue
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
            return out

        def _free(self, key: int, n: int) -> None:
            self.live -= n
            self.seen.discard(key)

    mode = Live()
    with mode:
        fn()
    return mode.peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshpilot.strategies.hf_adapter import CausalLMLoss
    rows = []
    print(f"{'vocab':>7s} {'batch':>5s} {'seq':>4s} {'tokens':>6s} {'loss':12s} {'peak MiB':>9s} {'B/logit':>8s}")
    for V, b, s in SHAPES:
        cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        adapter = CausalLMLoss(model)
        x = torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(0))
        for name, fn in (("transformers", lambda: model(input_ids=x, labels=x).loss.item()),
                         ("adapter", lambda: adapter(x, x).item())):
            with torch.no_grad():
                fn()                                              # first call: lazy initialisations
                peak = peak_live_bytes(fn)
            per = peak / (b * s * V)
            rows.append(dict(vocab=V, batch=b, seq=s, loss=name, peak_bytes=peak, bytes_per_logit=per))
            print(f"{V:7d} {b:5d} {s:4d} {b * s:6d} {name:12s} {peak / 2**20:9.1f} {per:8.2f}")
    write_json(a.out / "hf_forward_only_loss_bytes.json",
               dict(metadata(), command=" ".join([sys.executable, *sys.argv]), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
