"""Read the allocator histories a run wrote with ``train.memory_history`` (RUN_DIR/memory/rank<R>.json) and say where
the reserve comes from: which code made each segment the allocator holds at the end, and which segments served the
large requests of the steps after the first.

    python benchmarks/allocator_history.py RUN_DIR [RUN_DIR ...] [--rank 0] [--min-gib 1]

Per run and rank it prints:
- the segments held at the end, grouped by the code whose request made each (the innermost frame outside torch:
  DeepSpeed's or meshpilot's file:line) and the step it was made in (0 = up to the end of the first optimizer step,
  the engine's build included); their sum is torch's reserved memory;
- for the requests of at least ``--min-gib`` in steps >= 1 (the steady state): the code that asked and the code that
  made the segment serving it ("new segment" where none could);
- the free bytes and the largest free block at the end;
- with ``--peak``: the tensors alive at the run's largest allocated total, grouped by the two innermost frames outside
  torch that asked for them (what the peak is made of).
"""
from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from pathlib import Path

GIB = 2.0**30


def code_of(where: list[str]) -> str:
    """The innermost frame that is not torch's own (else the innermost), as file:line."""
    own = [w for w in where if not w.startswith("torch/")]
    first = (own or where or ["(no Python frame):0:"])[0]
    return first.rsplit(":", 1)[0]


def analyse(history: dict, min_bytes: float) -> dict:
    """Segments by origin (code, step) and steady-state requests by (asking code, serving segment's origin)."""
    steps = history.get("steps") or []
    live: dict[int, tuple[int, str, int]] = {}      # segment address -> (size, code that made it, step)
    pending: dict | None = None                     # a segment_alloc waiting for the request it serves
    served = defaultdict(lambda: [0, 0.0])          # (asking code, origin) -> [count, bytes]
    for e in history["events"]:
        act = e["action"]
        if act in ("segment_alloc", "segment_map"):
            pending = e
            continue
        if act in ("segment_free", "segment_unmap"):
            live.pop(e["addr"], None)
            continue
        if act != "alloc":
            continue
        step = bisect.bisect_left(steps, e.get("t_us") or 0.0)
        code = code_of(e.get("where") or [])
        if pending is not None and pending["addr"] <= e["addr"] < pending["addr"] + pending["size"]:
            live[pending["addr"]] = (pending["size"], code, step)
            pending = None
            origin = "new segment"
        else:
            seg = next((a for a, (sz, _, _) in live.items() if a <= e["addr"] < a + sz), None)
            origin = f"{live[seg][1]} (step {live[seg][2]})" if seg is not None else "?"
        if step >= 1 and e["size"] >= min_bytes:
            r = served[(code, origin)]
            r[0] += 1
            r[1] += e["size"]
    held = defaultdict(float)
    for s in history["segments"]:
        size, code, step = live.get(s["address"], (s["total_size"], "(made by a request under 1 MiB)", -1))
        held[(step, code)] += s["total_size"]
    return dict(held=held, served=served)


def at_peak(history: dict) -> tuple[float, int, dict[str, list[float]]]:
    """(the largest allocated total over the history, the step it happened in, the tensors alive then grouped by the
    two innermost frames outside torch that asked for them: code -> [count, bytes])."""
    steps = history.get("steps") or []
    live: dict[int, tuple[int, str]] = {}
    cur, best, when, at = 0, -1, 0.0, {}
    for e in history["events"]:
        if e["action"] == "alloc":
            where = e.get("where") or []
            own = [w for w in where if not w.startswith("torch/")] or where
            live[e["addr"]] = (e["size"], " <- ".join(w.rsplit(":", 1)[0] for w in own[:2]))
            cur += e["size"]
            if cur > best:
                best, when, at = cur, e.get("t_us") or 0.0, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for size, code in at.values():
        groups[code][0] += 1
        groups[code][1] += size
    return best, bisect.bisect_left(steps, when), dict(groups)


def report_peak(path: Path) -> None:
    total, step, groups = at_peak(json.loads(path.read_text()))
    print(f"\n== {path}: largest allocated {total / GIB:.2f} GiB, in step {step}; alive then (GiB, tensors, code):")
    for code, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        if b >= 0.01 * GIB:
            print(f"  {b / GIB:8.2f} {n:6d}  {code}")


def report(path: Path, min_gib: float) -> None:
    h = json.loads(path.read_text())
    a = analyse(h, min_gib * GIB)
    print(f"\n== {path}: reserved {h['reserved'] / GIB:.2f} GiB, allocated {h['allocated'] / GIB:.2f} GiB at the end, "
          f"{len(h['segments'])} segments, {len(h['events'])} events")
    print("segments held at the end, by the code that made them (step made, GiB):")
    for (step, code), b in sorted(a["held"].items(), key=lambda kv: (kv[0][0], -kv[1])):
        if b >= 0.1 * GIB:
            print(f"  step {step:2d} {b / GIB:8.2f}  {code}")
    print(f"requests >= {min_gib} GiB in steps >= 1, by the code that asked <- the segment that served them "
          "(count, GiB):")
    for (code, origin), (n, b) in sorted(a["served"].items(), key=lambda kv: -kv[1][1]):
        print(f"  {code:58s} <- {origin:64s} {n:4d} {b / GIB:8.2f}")
    free = [b[0] for s in h["segments"] for b in s["blocks"] if b[1] == "inactive"]
    print(f"free at the end {sum(free) / GIB:.2f} GiB, largest free block {max(free, default=0) / GIB:.2f} GiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rank", type=int, nargs="*", default=None, help="ranks to read (default: every file)")
    ap.add_argument("--min-gib", type=float, default=1.0)
    ap.add_argument("--peak", action="store_true", help="what the largest allocated total is made of, instead")
    a = ap.parse_args()
    for run in a.runs:
        files = sorted((run / "memory").glob("rank*.json"))
        if a.rank is not None:
            files = [f for f in files if int(f.stem[4:]) in a.rank]
        if not files:
            print(f"{run}: no memory/rank*.json (run with train.memory_history=true)", file=sys.stderr)
        for f in files:
            report_peak(f) if a.peak else report(f, a.min_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
