"""A small stand-in training function with the worker's signature (see
``meshpilot.orchestrator.train.worker.run_worker``): data-parallel SGD on a two-layer MLP over real
gloo, with complete-marker checkpoints and automatic resume. The controller's tests of the
launch machinery that need no transformer use it (``--worker meshpilot.launch.toy_worker:run_toy_worker``).

Math: every rank draws its own batch x ~ N(0, 1) seeded by (seed, step, rank), y = sum(x);
loss = mean((f(x) - y)^2); gradients are all-reduced (SUM over the world, then / world), so
every rank applies the same update and the result is independent of where a run resumed.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _latest_complete(ckdir: Path) -> Optional[Path]:
    done = [p for p in ckdir.glob("step_*") if (p / "complete").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def run_toy_worker(job: Any, plan: Any, *, rank: int, world_size: int, local_rank: int, master_addr: str,
                   master_port: int, run_dir: str, on_step: Optional[Callable[[int, dict], None]] = None,
                   stop_event: Any = None) -> dict:
    dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        t = job.train
        torch.manual_seed(t.seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ckdir = Path(run_dir) / "toy_checkpoints"
        start = 0
        latest = _latest_complete(ckdir)
        if latest is not None:
            state = torch.load(latest / "state.pt")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
            log.info("rank %d: resumed from %s (step %d)", rank, latest, start)
        lsum = torch.tensor(float("nan"))
        for step in range(start + 1, t.steps + 1):
            if stop_event is not None and stop_event.is_set():
                log.info("rank %d: stop requested at step %d", rank, step)
                break
            g = torch.Generator().manual_seed(t.seed * 1_000_003 + step * 1009 + rank)
            x = torch.randn(8, 16, generator=g)
            loss = ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            opt.step()
            lsum = loss.detach().clone()
            dist.all_reduce(lsum)
            if on_step is not None:
                on_step(step, {"loss": float(lsum) / world_size, "tokens": 8 * world_size})
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                dist.barrier()
                if rank == 0:
                    d = ckdir / f"step_{step}"
                    d.mkdir(parents=True, exist_ok=True)
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, d / "state.pt")
                    (d / "complete").write_text(str(time.time()))
                dist.barrier()
            time.sleep(float(os.environ.get("MESHPILOT_TOY_STEP_S", "0")))
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        return {"final_loss": float(lsum) / world_size, "param_checksum": checksum,
                "steps": t.steps}
    finally:
        dist.destroy_process_group()
