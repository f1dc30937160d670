"""The text forms of a plan: its one-line name, the parser of that name, and the checkpoint forms.

- :func:`describe`: ``dp=4 tp=2 zero=2 mb=2x4 off_opt ac=full`` (tables, logs, run state);
- :func:`parse`: that name (or ``plan.*`` overrides, or a mix) back into dotlist overrides;
- :func:`summary`: every field as ``key=value``, stored in a checkpoint's metadata;
- :func:`fingerprint`: a hash of every field that shapes a checkpoint; a checkpoint resumes only
  under an equal one. Its input is ``repr(sorted((field, plain value)))`` with choices as their
  string values, so the hashes of checkpoints written before choices became enums are unchanged;
  ``comm_overlap`` (which stream a collective runs on) is left out, so those written before it
  existed resume too, under either setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from meshpilot.orchestrator.config.schema import plain
from meshpilot.orchestrator.errors import ConfigError

# ``plan`` arguments below are :class:`meshpilot.orchestrator.plan.plan.Plan` objects; this module does not
# import it, since plan.py imports this one (Plan.describe delegates here)
Plan = Any

_SHORT_KEYS = {"dp": "plan.dp", "tp": "plan.tp", "ep": "plan.ep", "zero": "plan.zero_stage",
               "ac": "plan.activation_checkpointing", "zo": "plan.zo.mode", "pertp": "plan.zo.pertp",
               "zo_dp": "plan.zo.dp"}
_SHORT_FLAGS = {"off_opt": "plan.offload_optimizer=cpu", "off_param": "plan.offload_params=cpu",
                "sp": "plan.sequence_parallel=true", "overlap": "plan.comm_overlap=true"}
_UNFINGERPRINTED = ("comm_overlap",)


def describe(plan: Plan) -> str:
    """A short one-line name, e.g. ``dp=4 tp=2 zero=2 mb=2x4 ac=full`` (``mb`` is micro-batch x accumulation;
    ``overlap`` when DeepSpeed's overlap_comm is on)."""
    if plan.zeroth_order:
        return f"zo={plan.zo_mode} pertp={plan.zo_pertp} zo_dp={plan.zo_dp} mb={plan.micro_batch}x{plan.grad_accum}"
    s = f"dp={plan.dp} tp={plan.tp}"
    if plan.ep > 1:
        s += f" ep={plan.ep}"
    s += f" zero={plan.zero_stage} mb={plan.micro_batch}x{plan.grad_accum}"
    if plan.offloads_optimizer:
        s += " off_opt"
    if plan.offloads_params:
        s += " off_param"
    if plan.checkpoints_activations:
        s += f" ac={plan.activation_checkpointing}"
    if plan.sequence_parallel:
        s += " sp"
    if plan.comm_overlap:
        s += " overlap"
    return s


def parse(text: str) -> list[str]:
    """Dotlist overrides for a plan written as :func:`describe` prints it (``dp=4 tp=1 zero=3 mb=2x2 ac=full``)
    or as overrides (``plan.dp=4 plan.zero_stage=3``); the two forms may be mixed. The accumulation
    steps of ``mb=AxB`` follow from the batch, so only A is kept."""
    out: list[str] = []
    for tok in text.split():
        key, _, val = tok.partition("=")
        if key.startswith("plan."):
            out.append(tok)
        elif key in _SHORT_FLAGS and not val:
            out.append(_SHORT_FLAGS[key])
        elif key == "mb" and val:
            out.append(f"plan.micro_batch={val.split('x')[0]}")
        elif key in _SHORT_KEYS and val:
            out.append(f"{_SHORT_KEYS[key]}={val}")
        else:
            raise ConfigError("--explain", tok, reason="not a plan field",
                              fix="write the plan as the table prints it (dp=4 tp=1 zero=3 mb=2x2 ac=full) "
                                  "or as overrides (plan.dp=4 plan.zero_stage=3)")
    return out


def summary(plan: Plan) -> str:
    """Every field that shapes a checkpoint as ``key=value`` (those :func:`fingerprint` hashes): the plan
    section, then ``grad_accum`` and ``zo`` (the zeroth-order mode)."""
    c = plan.to_config()
    zo = c.pop("zo")
    for name in _UNFINGERPRINTED:
        c.pop(name)
    return " ".join(f"{k}={v}" for k, v in c.items()) + f" grad_accum={plan.grad_accum} zo={zo['mode']}"


def fingerprint(plan: Plan) -> str:
    """First 12 hex digits of the SHA-1 of ``repr(sorted((field, value)))``, choices as their values
    (``comm_overlap`` left out: see the module docstring)."""
    items = sorted((f.name, plain(getattr(plan, f.name))) for f in dataclasses.fields(plan)
                   if f.name not in _UNFINGERPRINTED)
    return hashlib.sha1(repr(items).encode()).hexdigest()[:12]


