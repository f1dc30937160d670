"""The cluster a job describes against the machine an embedded run starts on.

A run with an embedded Ray (no ``--address``) trains on this machine, so its plan must fit this machine, not only
the cluster the job names. A preset or a profile written elsewhere may describe more host memory per node
(``cluster.cpu_memory_gib``) or a larger card (``cluster.gpu.memory_gib``) than this machine has (or than its
container may use: :mod:`meshpilot.orchestrator.config.node_limits`). The plan's predicted peaks, which do not depend
on those two numbers, are then checked against what the machine has: a plan that would not fit it is refused before
any resource is taken (exit 2), naming the key, both values and the fix; one that still fits runs, with a warning.
``--force`` turns the refusal into a warning. Pure: the caller passes what the machine has.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.estimate import Estimate
from meshpilot.orchestrator.sim.simulator import host_usable_gib

# a description within this fraction of the machine is the same machine (rounding, GiB against GB)
TOLERANCE = 0.02


def check_machine(job: JobConfig, estimate: Estimate, *, host_gib: Optional[float], gpu_gib: Optional[float],
                  force: bool = False) -> list[str]:
    """Warnings for a cluster that overstates this machine (module docstring); raises ConfigError where the plan would
    not fit the machine, unless ``force``. ``host_gib``: the node's memory a job may use; ``gpu_gib``: the smallest
    visible GPU's memory (None: not a GPU run, or unknown)."""
    c = job.cluster
    warnings: list[str] = []
    if host_gib is not None and c.cpu_memory_gib > host_gib * (1 + TOLERANCE):
        usable = host_usable_gib(dataclasses.replace(c, cpu_memory_gib=host_gib))
        need = estimate.cpu_memory_gib_per_node
        what = (f"cluster.cpu_memory_gib={c.cpu_memory_gib:g} but this machine has {host_gib:.1f} GiB a job may use "
                f"({usable:.1f} usable below Ray's memory_usage_threshold)")
        fix = f"set cluster.cpu_memory_gib={host_gib:.1f} (or use cluster: local, which reads this machine)"
        if need > usable:
            if not force:
                raise ConfigError("cluster.cpu_memory_gib", c.cpu_memory_gib,
                                  reason=f"{what}: the plan needs {need:.1f} GiB of host memory per node, more than "
                                         "this machine gives it (Ray's memory monitor would kill a worker)",
                                  fix=fix + "; or pass --force to run it anyway")
            warnings.append(f"{what}; the plan needs {need:.1f} GiB of host memory (--force)")
        else:
            warnings.append(f"{what}; the plan's {need:.1f} GiB of host memory fits it; {fix}")
    if gpu_gib is not None and c.gpu.memory_gib > gpu_gib * (1 + TOLERANCE):
        peak = estimate.peak_memory_gib
        what = f"cluster.gpu.memory_gib={c.gpu.memory_gib:g} but this machine's GPUs have {gpu_gib:.1f} GiB"
        fix = f"set cluster.gpu.memory_gib={gpu_gib:.1f} (or use cluster: local, which reads this machine)"
        if peak > gpu_gib:
            if not force:
                raise ConfigError("cluster.gpu.memory_gib", c.gpu.memory_gib,
                                  reason=f"{what}: the plan's predicted peak is {peak:.1f} GiB per GPU",
                                  fix=fix + "; or pass --force to run it anyway")
            warnings.append(f"{what}; the plan's predicted peak is {peak:.1f} GiB per GPU (--force)")
        else:
            warnings.append(f"{what}; the plan's predicted {peak:.1f} GiB per GPU fits them; {fix}")
    return warnings
