"""Loading a job: YAML file + dotlist overrides + presets -> a validated :class:`JobConfig`.

Order of operations (each step raises :class:`ConfigError` naming the full key):
1. read the YAML file (a mapping with the sections model, cluster, train, plan);
2. resolve section shorthands: ``model: <preset | config.json | HF model directory>`` (also
   ``model: {path: DIR, ...}``), ``cluster: <preset | file>``,
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
import io
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import meshpilot.orchestrator.config.schema as C
from meshpilot.orchestrator.config.clusters import cluster_preset
from meshpilot.orchestrator.config.deepspeed_keys import DEEPSPEED_TOP_LEVEL_KEYS
from meshpilot.orchestrator.config.inputs import check_dataset_options, check_path_text
from meshpilot.orchestrator.errors import ConfigError, check_choice, check_positive
from meshpilot.orchestrator.config.models import (fill_model_defaults, model_from_hf_config, model_preset,
                                                  model_preset_names)
from meshpilot.orchestrator.config.hf_layout import check_hf_checkpoint, model_from_hf_dir

SECTIONS = ("model", "cluster", "train", "plan")


def load_job(path: str | Path | None = None, overrides: Iterable[str] = (), *, recorded: bool = False) -> C.JobConfig:
    """Read a job file (or start from defaults when ``path`` is None) and apply overrides.
    ``recorded``: the file is a run's resolved job.yaml (:func:`recorded_job`).

    The file is read as UTF-8 YAML without resolving interpolations: a ``${...}`` anywhere (for
    instance ``${oc.env:TOKEN}``, which would copy a secret into the run directory's job.yaml)
    is refused naming its key."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            check_path_text("job file", str(path))
            if not p.is_file():
                raise ConfigError("job file", str(path), reason="no such file")
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("job file", str(path), reason=f"is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError("job file", str(path), reason=f"cannot be read: {e.strerror or e}") from None
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(io.StringIO(text)), resolve=False)
        except Exception as e:  # YAML syntax errors, duplicate keys, unknown tags
            raise ConfigError("job file", str(path), reason=f"cannot parse: {_first_line(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("job file", str(path), reason="must be a mapping with the sections "
                              + ", ".join(SECTIONS))
        raw = loaded
    return recorded_job(raw, overrides) if recorded else job_from_dict(raw, overrides)


def recorded_job(raw: dict[str, Any], overrides: Iterable[str] = ()) -> C.JobConfig:
    """A run's resolved job (its job.yaml: every model dimension written out) as a JobConfig, for
    reading the run back (status, calibrate, export). ``model.path`` only says where the run's
    starting weights came from: when that folder is gone (another machine, a removed download) the
    recorded shape stands and the path is dropped, instead of failing on the missing folder."""
    m = raw.get("model")
    if isinstance(m, dict) and m.get("path") and not Path(str(m["path"])).is_dir():
        raw = dict(raw, model={k: v for k, v in m.items() if k != "path"})
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
    _reject_interpolation(raw, "")
    _check_keys(raw, C.JobConfig, "")
    _tristate(raw["plan"], "comm_overlap", "plan.")
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
    return dataclasses.asdict(job, dict_factory=lambda items: {k: C.plain(v) for k, v in items})


# --- steps --------------------------------------------------------------------------------

def _shorthand(section: str, value: Any) -> Any:
    if value is None:
        return {}
    if section == "model" and isinstance(value, dict) and value.get("path") is not None:
        # model: {path: DIR, ...}: the shape from DIR/config.json, then the keys given here
        check_path_text("model.path", str(value["path"]))
        shape = model_from_hf_dir(str(value["path"]), key="model.path")
        return {**shape, **value, "path": shape["path"]}
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(section, value, reason="must be a mapping or a name")
    if section == "model":
        if value.endswith(".json"):
            return model_from_hf_config(value)
        # a Hugging Face model directory (shape and weights); a preset name wins unless written as a path (./gpt2)
        if (os.sep in value or value not in model_preset_names()) and Path(value).expanduser().is_dir():
            return model_from_hf_dir(value)
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
        raise ConfigError(key, text, reason=f"cannot parse value: {_first_line(e)}") from None
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


def _reject_interpolation(node: Any, prefix: str) -> None:
    """Refuse OmegaConf interpolations (``${...}``) in any key or value: resolving them would copy
    environment variables (tokens) or other keys into the resolved job that ``meshpilot run``
    writes to the run directory."""
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(node))
    else:
        if isinstance(node, str) and "${" in node:
            raise ConfigError(prefix.rstrip(".") or "job file", node, reason="interpolations (${...}) are not "
                              "allowed in job files (they could copy environment values such as tokens into "
                              "the run directory)", fix="write the value itself")
        return
    for k, v in items:
        key = f"{prefix}{k}" if not str(k).startswith("[") else f"{prefix.rstrip('.')}{k}"
        if isinstance(k, str) and "${" in k:
            raise ConfigError(key, reason="interpolations (${...}) are not allowed in job files")
        _reject_interpolation(v, key + ".")


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


def _tristate(section: dict[str, Any], key: str, prefix: str) -> None:
    """An ``auto | true | false`` key: ``auto`` (or null) becomes None, a YAML boolean stays; anything else
    (OmegaConf would read "yes" or 1 as true) raises naming the key."""
    if key not in section:
        return
    v = section[key]
    if v is None or v == "auto":
        section[key] = None
    elif not isinstance(v, bool):
        raise ConfigError(f"{prefix}{key}", v, reason="not a valid choice", allowed=("auto", "true", "false"))


def _unwrap_optional(hint: Any) -> Any:
    """``X`` for ``Optional[X]``, else the hint itself."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


MAX_NAME = 128                  # model.name, cluster.name, cluster.gpu.name
MAX_INT = 2**53                  # larger integers are not meant (and lose precision as floats)
_NAME_OK = re.compile(r"[^\x00-\x1f\x7f]*")    # no control characters (newlines would forge log lines)


def _numbers(node: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    """(full key, value) of every number in a section, nested dataclasses and mappings included."""
    if dataclasses.is_dataclass(node):
        items: Iterable[tuple[Any, Any]] = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            yield prefix.rstrip("."), node
        return
    for k, v in items:
        yield from _numbers(v, f"{prefix}{k}.")


def _check_finite(job: C.JobConfig) -> None:
    """No NaN or infinity anywhere (``train.lr: .inf`` trains to NaN), no integer beyond 2**53."""
    for section in SECTIONS:
        for key, v in _numbers(getattr(job, section), f"{section}."):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(key, v, reason="must be a finite number")
            if isinstance(v, int) and abs(v) > MAX_INT:
                raise ConfigError(key, v, reason=f"is out of range (at most {MAX_INT} in magnitude)")


def _check_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False) -> None:
    if value is None:
        return
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(key, value, reason=f"must be {'>' if lo_open else '>='} {lo}"
                          + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(key, value, reason=f"must be <= {hi}" + (f" and {'>' if lo_open else '>='} {lo}"
                                                                   if lo is not None else ""))


def _check_name(key: str, value: str) -> None:
    if len(value) > MAX_NAME:
        raise ConfigError(key, value, reason=f"is too long ({len(value)} characters, at most {MAX_NAME})")
    if not _NAME_OK.fullmatch(value):
        raise ConfigError(key, value, reason="holds control characters (newlines, tabs, escapes)")


def validate_job(job: C.JobConfig) -> None:
    """Check every value of each section on its own; cross-section checks live in the plan.

    Every number must be finite; each key's range is checked below. Choice fields are already
    members of their enum (:func:`_check_keys`); the integer choices (zero stage, perturbation
    degree) are checked here, and only here."""
    m, c, t, p = job.model, job.cluster, job.train, job.plan
    _check_finite(job)
    _check_name("model.name", m.name)
    _check_name("cluster.name", c.name)
    _check_name("cluster.gpu.name", c.gpu.name)
    for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_positions"):
        check_positive(f"model.{k}", getattr(m, k))
    if m.hidden % m.heads:
        raise ConfigError("model.hidden", m.hidden, reason=f"must be divisible by model.heads={m.heads}")
    if m.kv_heads > m.heads or m.heads % m.kv_heads:
        raise ConfigError("model.kv_heads", m.kv_heads, reason=f"must divide model.heads={m.heads}")
    _check_range("model.norm_eps", m.norm_eps, 0.0, 1.0, lo_open=True)
    _check_range("model.rope_theta", m.rope_theta, 0.0, lo_open=True)
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
    if not 0.0 < c.memory_usage_threshold <= 1.0:
        raise ConfigError("cluster.memory_usage_threshold", c.memory_usage_threshold,
                          reason="must be a fraction of the node's memory, > 0 and <= 1",
                          fix="the memory_usage_threshold of your Ray cluster (0.95 is Ray's default)")
    for k in ("intra_node_latency_us", "inter_node_latency_us"):
        check_positive(f"cluster.{k}", getattr(c, k), zero_ok=True)
    if c.cpu_threads_per_rank is not None:
        check_positive("cluster.cpu_threads_per_rank", c.cpu_threads_per_rank)
        if c.cpu_threads_per_rank > c.cpu_cores:
            raise ConfigError("cluster.cpu_threads_per_rank", c.cpu_threads_per_rank,
                              reason=f"exceeds cluster.cpu_cores={c.cpu_cores}",
                              fix=f"at most {c.cpu_cores}, or leave it unset for the gang's default")
    for f in dataclasses.fields(c.calibration):
        v = getattr(c.calibration, f.name)
        if f.name == "matmul_tflops_by_shape":          # {shape class: TFLOP/s}
            for cls, rate in v.items():
                try:
                    C.parse_shape_class(cls)
                except ValueError as e:
                    raise ConfigError(f"cluster.calibration.{f.name}", cls, reason=str(e),
                                      fix="keys as `meshpilot calibrate` writes them, e.g. h4096_t8192") from None
                check_positive(f"cluster.calibration.{f.name}.{cls}", rate)
        elif f.name != "measured_on":
            check_positive(f"cluster.calibration.{f.name}", v)

    for k in ("seq_len", "global_batch", "steps"):
        check_positive(f"train.{k}", getattr(t, k))
    check_positive("train.lr", t.lr)
    _check_range("train.lr", t.lr, 0.0, 10.0, lo_open=True)
    check_positive("train.zo_eps", t.zo_eps)
    _check_range("train.zo_eps", t.zo_eps, 0.0, 1.0, lo_open=True)
    for k in ("weight_decay", "warmup_steps", "grad_clip", "checkpoint_every"):
        check_positive(f"train.{k}", getattr(t, k), zero_ok=True)
    _check_range("train.weight_decay", t.weight_decay, 0.0, 10.0)
    _check_range("train.seed", t.seed, 0, 2**32 - 1)
    _check_range("train.keep_checkpoints", t.keep_checkpoints, 1)
    if t.max_split_size_mb is not None:
        _check_range("train.max_split_size_mb", t.max_split_size_mb, 21)     # torch refuses 20 MB and less
    if not t.data:
        raise ConfigError("train.data", t.data, reason="must be synthetic, demo, the path of a token file or "
                          "of a dataset (.txt, .jsonl, .json, .parquet, or a folder of them)")
    if t.data not in ("synthetic", "demo"):
        check_path_text("train.data", t.data)
    check_dataset_options(t)
    check_path_text("train.output_dir", t.output_dir)
    if t.export == C.ExportFormat.HF and m.implementation == C.Implementation.HF:
        raise ConfigError("train.export", t.export, reason="exports the built-in model's weights; with "
                          "model.implementation=hf the run's DeepSpeed checkpoint already holds transformers' names",
                          fix="model.implementation=builtin (it loads the same checkpoint), or train.export=none")
    if t.export_dir is not None:
        if not t.export_dir:
            raise ConfigError("train.export_dir", t.export_dir, reason="must be a directory path",
                              fix="leave it unset for RUN_DIR/export")
        check_path_text("train.export_dir", t.export_dir)
    unknown = sorted(str(k) for k in t.deepspeed_extra if k not in DEEPSPEED_TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"train.deepspeed_extra.{unknown[0]}", reason="is not a DeepSpeed config key (DeepSpeed "
                          "would ignore it silently)", fix=_close(unknown[0], DEEPSPEED_TOP_LEVEL_KEYS)
                          or "see https://www.deepspeed.ai/docs/config-json/")
    if m.path is not None:      # the weights' directory: every tensor there with its shape (headers only)
        check_path_text("model.path", m.path)
        check_hf_checkpoint(m, seq_len=t.seq_len)
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


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:3])[:300] if lines else type(e).__name__


def _short(e: OmegaConfBaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.split("\n")[0].strip()
