"""Loading a job: YAML file + dotlist overrides + presets -> a validated :class:`JobConfig`.

Order of operations (each step raises :class:`ConfigError` naming the full key):
1. read the YAML file (a mapping with the sections model, cluster, train, plan);
2. resolve section shorthands: ``model: <preset | config.json>``, ``cluster: <preset | file>``,
   ``plan: auto``;
3. apply the overrides left to right, so ``cluster=dgx-h100 cluster.nodes=128`` first
   replaces the cluster by the preset and then changes one of its fields;
4. reject unknown keys (with the allowed ones and a close match) and values outside a
   choice field's :class:`~meshpilot.orchestrator.config.schema.Choice` (with the allowed
   values), merge onto the typed schema (type errors name the key), fill derived defaults
   and check every other value.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import meshpilot.orchestrator.config.schema as C
from meshpilot.orchestrator.config.clusters import cluster_preset
from meshpilot.orchestrator.errors import ConfigError, check_choice, check_positive
from meshpilot.orchestrator.config.models import fill_model_defaults, model_from_hf_config, model_preset

SECTIONS = ("model", "cluster", "train", "plan")


def load_job(path: str | Path | None = None, overrides: Iterable[str] = ()) -> C.JobConfig:
    """Read a job file (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("job file", str(path), reason="no such file")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        except Exception as e:  # YAML syntax errors and bad interpolations
            raise ConfigError("job file", str(path), reason=f"cannot parse: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("job file", str(path), reason="must be a mapping with the sections "
                              + ", ".join(SECTIONS))
        raw = loaded
    return job_from_dict(raw, overrides)


def job_from_dict(raw: dict[str, Any], overrides: Iterable[str] = ()) -> C.JobConfig:
    raw = copy.deepcopy(raw)
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(str(key), reason="unknown section", allowed=SECTIONS, fix=_close(key, SECTIONS))
    for s in SECTIONS:
        raw[s] = _shorthand(s, raw.get(s))
    for item in overrides:
        _apply_override(raw, item)
    _check_keys(raw, C.JobConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(C.JobConfig), raw)
        job = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(e.full_key, reason="is required (no default)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", "?") or "?", reason=_short(e)) from None
    fill_model_defaults(job.model)
    validate_job(job)
    return job


def dump_job(job: C.JobConfig) -> str:
    """The resolved job as YAML; loading it again gives an equal JobConfig.

    Choices are written as their values (``cpu``; OmegaConf's own dump of an Enum field writes
    the member name)."""
    return OmegaConf.to_yaml(OmegaConf.create(job_to_dict(job)))


def job_to_dict(job: C.JobConfig) -> dict[str, Any]:
    """The job as plain data: mappings, lists, numbers and strings (choices as their values)."""
    return dataclasses.asdict(job, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


# --- steps --------------------------------------------------------------------------------

def _shorthand(section: str, value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(section, value, reason="must be a mapping or a name")
    if section == "model":
        if value.endswith(".json"):
            return model_from_hf_config(value)
        return model_preset(value)
    if section == "cluster":
        return cluster_preset(value)
    if section == "plan":
        if value != "auto":
            raise ConfigError("plan", value, reason="must be a mapping or 'auto'",
                              fix="write plan: auto to let the planner choose, or give the degrees")
        return {"auto": True}
    raise ConfigError(section, value, reason="must be a mapping")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, reason="an override must be key=value", fix="e.g. plan.zero_stage=3")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as e:
        raise ConfigError(key, text, reason=f"cannot parse value: {e}") from None
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(key, value, reason="unknown section", allowed=SECTIONS, fix=_close(parts[0], SECTIONS))
    if len(parts) == 1:
        raw[key] = _shorthand(key, value)
        return
    node = raw[parts[0]]
    for i, p in enumerate(parts[1:-1], start=1):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), nxt, reason="is not a mapping; cannot set " + key)
        node = nxt
    node[parts[-1]] = value


def _check_keys(raw: dict[str, Any], cls: type, prefix: str) -> None:
    """Unknown keys and values outside a choice field's values raise, naming the full key."""
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in hints:
            names = sorted(f.name for f in dataclasses.fields(cls))
            raise ConfigError(full, reason="unknown key", allowed=names, fix=_close(key, names))
        ftype = _unwrap_optional(hints[key])
        if value is None or not isinstance(ftype, type):
            continue
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(full, value, reason="must be a mapping with keys "
                                  + ", ".join(f.name for f in dataclasses.fields(ftype)))
            _check_keys(value, ftype, full + ".")
        elif issubclass(ftype, C.Choice) and not (isinstance(value, ftype) or
                                                    (isinstance(value, str) and value in ftype.values())):
            raise ConfigError(full, value, reason="not a valid choice", allowed=ftype.values())


def _unwrap_optional(hint: Any) -> Any:
    """``X`` for ``Optional[X]``, else the hint itself."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def validate_job(job: C.JobConfig) -> None:
    """Check every value of each section on its own; cross-section checks live in the plan.

    Choice fields are already members of their enum (:func:`_check_keys`); the integer choices
    (zero stage, perturbation degree) are checked here, and only here."""
    m, c, t, p = job.model, job.cluster, job.train, job.plan
    for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_positions"):
        check_positive(f"model.{k}", getattr(m, k))
    if m.hidden % m.heads:
        raise ConfigError("model.hidden", m.hidden, reason=f"must be divisible by model.heads={m.heads}")
    if m.kv_heads > m.heads or m.heads % m.kv_heads:
        raise ConfigError("model.kv_heads", m.kv_heads, reason=f"must divide model.heads={m.heads}")
    check_positive("model.num_experts", m.num_experts, zero_ok=True)
    if m.arch == C.Arch.MIXTRAL and m.num_experts < 2:
        raise ConfigError("model.num_experts", m.num_experts, reason="arch mixtral needs at least 2 experts")
    if m.num_experts:
        if not 1 <= m.top_k <= m.num_experts:
            raise ConfigError("model.top_k", m.top_k, reason=f"must be between 1 and model.num_experts={m.num_experts}")
        check_positive("model.capacity_factor", m.capacity_factor)
        check_positive("model.moe_every", m.moe_every)
        if m.moe_every > m.layers:
            raise ConfigError("model.moe_every", m.moe_every, reason=f"exceeds model.layers={m.layers}: no MoE layer")

    for k in ("nodes", "gpus_per_node", "cpu_cores"):
        check_positive(f"cluster.{k}", getattr(c, k))
    for k in ("memory_gib", "bf16_tflops", "fp16_tflops", "fp32_tflops", "memory_bandwidth_gbs"):
        check_positive(f"cluster.gpu.{k}", getattr(c.gpu, k))
    for k in ("intra_node_bandwidth_gbs", "inter_node_bandwidth_gbs", "pcie_bandwidth_gbs", "cpu_memory_gib"):
        check_positive(f"cluster.{k}", getattr(c, k))
    for k in ("intra_node_latency_us", "inter_node_latency_us"):
        check_positive(f"cluster.{k}", getattr(c, k), zero_ok=True)

    for k in ("seq_len", "global_batch", "steps"):
        check_positive(f"train.{k}", getattr(t, k))
    check_positive("train.lr", t.lr)
    check_positive("train.zo_eps", t.zo_eps)
    for k in ("weight_decay", "warmup_steps", "grad_clip", "checkpoint_every"):
        check_positive(f"train.{k}", getattr(t, k), zero_ok=True)
    if m.arch in (C.Arch.GPT2, C.Arch.OPT) and t.seq_len > m.max_positions:
        raise ConfigError("train.seq_len", t.seq_len, reason=f"exceeds model.max_positions={m.max_positions} "
                          f"(learned positions of arch {m.arch})", fix=f"use train.seq_len<={m.max_positions}")

    for k in ("dp", "tp", "ep", "micro_batch"):
        check_positive(f"plan.{k}", getattr(p, k))
    if p.zero_stage is not None:
        check_choice("plan.zero_stage", p.zero_stage, C.ZERO_STAGES)
    if p.zo.pertp is not None:
        check_choice("plan.zo.pertp", p.zo.pertp, C.ZO_PERTP)
    check_positive("plan.zo.dp", p.zo.dp)


def _close(word: str, options: Iterable[str]) -> str | None:
    m = difflib.get_close_matches(str(word), list(options), n=1)
    return f"did you mean {m[0]!r}?" if m else None


def _short(e: OmegaConfBaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.split("\n")[0].strip()
