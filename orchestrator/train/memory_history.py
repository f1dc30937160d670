"""The caching allocator's history of one rank (``train.memory_history``): which code asked for which block, and
which requests made a new ``cudaMalloc`` segment.

PyTorch's caching allocator can record every allocation, free and segment event with the Python stack that caused
it (``torch.cuda.memory._record_memory_history``). This module starts that recording before the engine is built
and, when the run ends (completed, stopped or failed, out of memory included), writes a JSON summary to
``RUN_DIR/memory/rank<R>.json``:

- ``segments``: the segments the allocator holds at the end, each with its size, stream and blocks
  ``[size, state]`` (``active_allocated`` or ``inactive`` = cached and free);
- ``events``: the recorded ``alloc``, ``free_completed``, ``segment_alloc``, ``segment_free`` and ``oom`` events of
  at least ``min_bytes`` (default 1 MiB), in order, each with its size, address, stream, time (microseconds, the
  allocator's clock) and up to four frames of DeepSpeed's, meshpilot's or torch's Python code that made it
  (innermost first). An ``alloc`` right after a ``segment_alloc`` of the same address is a request no cached block
  could serve;
- ``steps``: the time at which each optimizer step ended, on the same clock, so events can be put in their step.

JSON rather than torch's pickle: the file is read by meshpilot's and a user's tools without unpickling anything.
Recording costs time (a Python stack per event): the key is for diagnosis, not for timed runs. Measured on 2 x H200
with torch 2.11: six dense, ZeRO 0-2 and tp=2 plans, ZeRO-3 plans without checkpointing and a tp=2 Mixtral recorded
without a fault; an ep=2 Mixtral plan and two ZeRO-3 plans with activation checkpointing failed in their first
backward (``SystemError`` from autograd's engine, "returned NULL without setting an exception", in the recomputed
block's ``LinearFunctionForZeroStage3.apply``) with recording on and ran without it
(benchmarks/results/2026-11-30-s6-h200x2/hist3, 2026-11-30-s9-h200x2/call1 and call3). Communication: none.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

KEPT_ACTIONS = ("alloc", "free_completed", "segment_alloc", "segment_free", "oom", "segment_map", "segment_unmap")
CODE = ("deepspeed/", "meshpilot", "/orchestrator/", "/strategies/", "torch/")


def start(device: torch.device, max_entries: int = 1_000_000) -> bool:
    """Start recording ``device``'s allocator history (Python stacks); False where the device is not CUDA."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=max_entries,
                                             device=device)
    return True


def now_us() -> float:
    """Wall time in microseconds since the epoch: the clock of the allocator's trace (``time_us``)."""
    return time.time() * 1e6


def code_frames(frames: list[dict[str, Any]], keep: int = 4) -> list[str]:
    """Up to ``keep`` frames (innermost first) from DeepSpeed's, meshpilot's or torch's Python files, as
    ``file:line:function`` with the file's path cut to its package."""
    out = []
    for f in frames or []:
        name = str(f.get("filename", ""))
        hit = next((c for c in CODE if c in name), None)
        if hit is None:
            continue
        short = name[name.index(hit):].lstrip("/")
        out.append(f"{short}:{f.get('line')}:{f.get('name')}")
        if len(out) == keep:
            break
    return out


def summarise(snapshot: dict[str, Any], device_index: int, step_ends_us: list[float],
              min_bytes: int = 2**20) -> dict[str, Any]:
    """The JSON summary of a ``torch.cuda.memory._snapshot()`` (module docstring)."""
    segments = [dict(address=s["address"], total_size=s["total_size"], stream=s["stream"],
                     segment_type=s.get("segment_type"),
                     blocks=[[b["size"], b["state"]] for b in s["blocks"]])
                for s in snapshot.get("segments", []) if s.get("device", device_index) == device_index]
    traces = snapshot.get("device_traces") or []
    trace = traces[device_index] if device_index < len(traces) else []
    events = [dict(action=e["action"], size=e["size"], addr=e["addr"], stream=e["stream"], t_us=e.get("time_us"),
                   where=code_frames(e.get("frames", [])))
              for e in trace if e["action"] in KEPT_ACTIONS and (e["size"] >= min_bytes or e["action"] == "oom")]
    return dict(device=device_index, segments=segments, events=events, steps=step_ends_us,
                reserved=sum(s["total_size"] for s in segments),
                allocated=sum(b[0] for s in segments for b in s["blocks"] if b[1] == "active_allocated"))


def write(device: torch.device, run_dir: str | Path, rank: int, step_ends_us: list[float]) -> Path | None:
    """Write this rank's summary to ``run_dir/memory/rank<rank>.json`` and stop recording; None off CUDA."""
    if device.type != "cuda":
        return None
    snap = torch.cuda.memory._snapshot(device)
    torch.cuda.memory._record_memory_history(enabled=None, device=device)
    path = Path(run_dir) / "memory" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(snap, device.index if device.index is not None else torch.cuda.current_device(),
                        step_ends_us)
    path.write_text(json.dumps(summary))
    log.info("allocator history: %d events, %d segments -> %s", len(summary["events"]), len(summary["segments"]),
             path)
    return path
