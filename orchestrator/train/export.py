"""Trained models out: a Hugging Face model directory from a run (``train.export: hf``) or from
one of its checkpoints (``meshpilot export RUN_DIR``).

What is written (:func:`write_hf_directory`)::

    OUT/config.json                     hf_config_dict(model), over the source model's config.json
                                        when model.path is set; "dtype" = the exported dtype
    OUT/model.safetensors               every tensor, when they fit in one shard, else
    OUT/model-0000K-of-0000N.safetensors + model.safetensors.index.json   (shards of <= 5 GB)
    OUT/tokenizer.json, ...             copied from model.path when it has them (TOKENIZER_FILES)

The built-in model's full tensors (names of :mod:`meshpilot.strategies.model`) become Hugging
Face names and layouts through :func:`meshpilot.strategies.hf_checkpoint.to_hf_state_dict`. The
directory is written into a hidden sibling folder, every file fsynced, and renamed into place
(an older export there is replaced only once the new one is complete): a reader sees the old
directory or the whole new one.

Which weights (``train.export_dtype``, default fp32): the fp32 master copy where DeepSpeed keeps
one (ZeRO 1-3 and the 16-bit optimizers of ZeRO 0 hold fp32 masters of bf16/fp16 module
weights), else the module's weights (fp32 training: they are the masters). Zeroth-order plans
keep no fp32 copy: their weights, in ``train.precision``, are cast (exactly) to the export dtype.
bf16/fp16 exports round the fp32 values to nearest.

In a run (:func:`export_at_end`, collective, after the final checkpoint) each parameter is
gathered in turn, so at most one full tensor beyond the result is alive on a rank:

- ZeRO 1-3 and the bf16 optimizer: ``safe_get_full_fp32_param`` (an all-reduce of the
  zero-padded fp32 partitions over the parameter's data-parallel group: dp, or edp for experts);
  ZeRO-3 without fp32 masters: ``GatheredParameters`` (all-gather over dp);
- tensor parallelism: all-gather of the shards over tp along ``param.meshpilot_tp_dim``, cut to
  ``param.meshpilot_full_size`` (vocabulary padding removed);
- expert parallelism: all-gather over ep along ``param.meshpilot_ep_dim`` (experts stacked);
- zeroth order: the trainer's ``full_state()`` (ZO2 gathers its host stores).

Rank 0 keeps the full fp32 tensors on the host and writes the directory.

Offline (:func:`export_checkpoint`, one CPU process, no process group) from the files of
``RUN_DIR/checkpoints/step_N`` (plan and world size from its ``meshpilot.json``, model from
``RUN_DIR/job.yaml``), per tensor-parallel rank t:

- ZeRO 0: ``mp_rank_t_model_states.pt``'s module (fp32 training), or its 16-bit optimizer's
  ``fp32_groups`` (lists in the engine's parameter-group order, :func:`meshpilot.strategies.zero.param_groups`);
- ZeRO 1-2 / 3: the fp32 partitions of the dp ranks' ``*zero_pp_rank_d_mp_rank_t_optim_states.pt``
  joined by DeepSpeed's own ``zero_to_fp32`` reconstruction (``_get_fp32_state_dict_from_zero2/3_checkpoint``),
  the files read here with ``torch.load(weights_only=True)`` (zero_to_fp32's own reader unpickles);
- then the tp ranks' tensors are concatenated along each parameter's tensor-parallel dimension,
  which a small single-process copy of the built-in model (same names, tiny sizes) tells;
- ep > 1: expert parameters from ``experts/rank_R.pt`` (module weights of every rank; fp32 masters
  of experts are partitioned over edp inside DeepSpeed's files and are not read), concatenated
  over ep along ``meshpilot_ep_dim``; the non-expert parameter groups are merged as above;
- zeroth order: ``zo_state.pt``'s ``model`` (tensors only).

Why a subprocess for ``meshpilot export``: the command line must not import torch (the driver is
torch-free, tests/test_architecture.py); ``python -m meshpilot.orchestrator.train.export`` is one
plain CPU process that needs no process group, Ray or worker start-up, and its error messages
and exit status (2 for ConfigError) pass through unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from meshpilot.orchestrator.atomic_io import fsync_path
from meshpilot.orchestrator.config.schema import JobConfig, ModelConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.train.checkpoint import (EXPERTS, CheckpointMeta, deepspeed_safe_globals, find_checkpoint,
                                                     read_meta, tag_for, usable)

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
MAX_SHARD_BYTES = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ZO_STATE_FILE = "zo_state.pt"          # engine_zo.STATE_FILE (not imported: the engine imports this module)


def export_dir_for(job: JobConfig, run_dir: str | Path) -> Path:
    """``train.export_dir``, or ``RUN_DIR/export``."""
    return Path(job.train.export_dir) if job.train.export_dir else Path(run_dir) / EXPORT_DIR


def _hf() -> Any:
    """The built-in <-> Hugging Face mapping (strategies/hf_checkpoint.py)."""
    from meshpilot.strategies import hf_checkpoint
    return hf_checkpoint


# --- the Hugging Face directory ---------------------------------------------------------------

def shard_groups(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names split into consecutive shards of at most ``max_bytes`` (a tensor larger than that is
    a shard of its own), in the given order."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[0] else []


def _source_dir(cfg: ModelConfig) -> Path | None:
    p = getattr(cfg, "path", None)
    return Path(p) if p else None


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents: :func:`hf_config_dict` over the source model's config (model.path), with
    the exported dtype."""
    src = _source_dir(cfg)
    base = None
    if src is not None and (src / "config.json").is_file():
        base = json.loads((src / "config.json").read_text())
    conf = dict(_hf().hf_config_dict(cfg, base=base))
    conf["dtype"] = HF_DTYPE_NAMES[dtype]
    if "torch_dtype" in conf:
        conf["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return conf


def write_hf_directory(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, *,
                       dtype: str = "fp32", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the full built-in ``state`` as a Hugging Face model directory at ``out`` (atomically,
    see the module docstring); returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    tdtype = DTYPES[str(dtype)]
    conf = hf_config(cfg, tdtype)
    hf_state = _hf().to_hf_state_dict(state, cfg)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in hf_state.items():
        t = t.detach().to("cpu", tdtype).contiguous()
        if t.data_ptr() in seen:                 # safetensors refuses tensors that share memory (tied weights)
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        groups = shard_groups(((n, t.numel() * t.element_size()) for n, t in tensors.items()), max_shard_bytes)
        if len(groups) <= 1:
            save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            for k, names in enumerate(groups, start=1):
                fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2, sort_keys=True) + "\n")
        src = _source_dir(cfg)
        copied = []
        for f in TOKENIZER_FILES:
            if src is not None and (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
                copied.append(f)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_path(out.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d tensors (%s, %d shard%s%s) to %s", len(tensors), HF_DTYPE_NAMES[tdtype], max(1, len(groups)),
             "" if len(groups) <= 1 else "s", f"; tokenizer files {', '.join(copied)}" if copied else "", out)
    return out


# --- in a run (collective) -----------------------------------------------------------------------

def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(t: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _fp16_optimizer_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(module parameter) -> fp32 master of DeepSpeed's unfused 16-bit optimizer (ZeRO 0 with
    bf16/fp16: ``fp16_groups[g][i]`` is stepped through ``fp32_groups[g][i]``); {} otherwise."""
    f16, f32 = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(f16, list) or not isinstance(f32, list) or len(f16) != len(f32):
        return {}
    out = {}
    for g16, g32 in zip(f16, f32):
        if not isinstance(g16, list) or not isinstance(g32, list) or len(g16) != len(g32):
            return {}
        out.update({id(p): m for p, m in zip(g16, g32) if m.shape == p.shape})
    return out


def gather_deepspeed_weights(engine: Any, *, rank: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Every parameter of the built-in model in a DeepSpeed engine as the full fp32 tensor, on
    rank 0's host (None on the other ranks), and which copy it came from (collective; see the
    module docstring for the communication)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    tp_group, ep_group = getattr(module, "tp_group", None), getattr(module, "ep_group", None)
    masters16 = _fp16_optimizer_masters(getattr(engine, "optimizer", None))
    out: dict[str, torch.Tensor] = {}
    experts_by_name: dict[str, torch.Tensor] = {}
    sources: set[str] = set()
    for name, p in module.named_parameters():
        t = safe_get_full_fp32_param(p)
        if t is not None:
            sources.add("DeepSpeed's fp32 master weights")
        elif id(p) in masters16:
            t = masters16[id(p)]
            sources.add("DeepSpeed's fp32 master weights")
        elif hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                t = p.detach().clone()
            sources.add(f"the module's {str(t.dtype).replace('torch.', '')} weights")
        else:
            t = p.detach()
            sources.add(f"the module's {str(t.dtype).replace('torch.', '')} weights")
        t = t.detach().float()
        dim = getattr(p, "meshpilot_tp_dim", None)
        if dim is not None:
            if _group_size(tp_group) > 1:
                t = _all_gather(t, dim, tp_group)
            t = t.narrow(dim, 0, p.meshpilot_full_size)
        if getattr(p, "meshpilot_expert", False) and _group_size(ep_group) > 1:
            ep_dim = getattr(p, "meshpilot_ep_dim", None)
            if ep_dim is None:
                experts_by_name[name] = t.cpu()
                continue
            t = _all_gather(t, ep_dim, ep_group)
        if rank == 0:
            out[name] = t.cpu().clone()
    if experts_by_name:
        parts: list[Any] = [None] * _group_size(ep_group)
        dist.all_gather_object(parts, experts_by_name, group=ep_group)
        if rank == 0:
            for part in parts:
                out.update(part)
    return (out if rank == 0 else None), " and ".join(sorted(sources))


def export_at_end(ctx: Any, engine: Any) -> Path | None:
    """``train.export: hf`` after the last step: gather the full weights (collective) and write the
    directory on rank 0; returns its path (None on the other ranks)."""
    job = ctx.job
    hf_config(job.model, DTYPES[str(job.train.export_dtype)])   # an unsupported model fails on every rank, first
    weights, source = engine.full_weights()
    if ctx.rank != 0:
        return None
    out = export_dir_for(job, ctx.run_dir)
    log.info("rank 0: exporting %s as %s from %s", job.model.name, job.train.export_dtype, source)
    return write_hf_directory(weights, job.model, out, dtype=str(job.train.export_dtype))


# --- offline, from a checkpoint --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    tp_dim: int | None
    ep_dim: int | None
    expert: bool


def model_structure(cfg: ModelConfig) -> tuple[dict[str, ParamInfo], list[list[str]]]:
    """Every parameter name of the built-in model for ``cfg`` with its tensor- and expert-parallel
    dimensions, and the names in the engine's optimizer parameter groups
    (:func:`~meshpilot.strategies.zero.param_groups`). Read off a single-process copy of the model
    with the same layers, heads, experts and arch but tiny sizes (names and sharding dimensions do
    not depend on sizes)."""
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model, resolved_model_config
    from meshpilot.strategies.zero import param_groups

    full = resolved_model_config(cfg)
    kv = full.kv_heads or full.heads
    tiny = dataclasses.replace(full, hidden=2 * full.heads, ffn=4, vocab=8, max_positions=4, kv_heads=kv)
    if hasattr(tiny, "path"):
        tiny = dataclasses.replace(tiny, path=None)
    model = build_model(tiny, Plan(), None, seed=0)
    info = {n: ParamInfo(getattr(p, "meshpilot_tp_dim", None), getattr(p, "meshpilot_ep_dim", None),
                         bool(getattr(p, "meshpilot_expert", False))) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay=1.0, plan=Plan())]
    return info, groups


def _load(path: Path, where: Path) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's few plain classes; a missing file or one
    holding other Python objects is a ConfigError."""
    import pickle
    if not path.is_file():
        raise ConfigError("RUN_DIR", str(where), reason=f"checkpoint has no {path.name} (incomplete, or written "
                          "by another plan)")
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError("RUN_DIR", str(where), reason=f"{path.name} holds Python objects that meshpilot does not "
                          f"unpickle: {str(e).splitlines()[0][:200]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError("RUN_DIR", str(where), reason=f"{path.name} is unreadable (damaged or truncated): "
                          f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def _optim_file(d: Path, dp_rank: int, tp_rank: int) -> Path:
    """``zero_pp_rank_D_mp_rank_TT_optim_states.pt`` (ZeRO optimizer) or its ``bf16_`` form (DeepSpeed's bf16 optimizer)."""
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
    return d / name if (d / name).is_file() or not (d / f"bf16_{name}").is_file() else d / f"bf16_{name}"


def _zero_model_state(ms: dict[str, Any], param_shapes: list[dict[str, Any]]) -> Any:
    from deepspeed.utils.zero_to_fp32 import zero_model_state
    return zero_model_state(buffers={}, param_shapes=param_shapes, shared_params=[], ds_version=ms.get("ds_version"),
                            frozen_param_shapes=None, frozen_param_fragments=None)


def _tp_rank_weights(d: Path, *, stage: int, dp: int, tp_rank: int, info: dict[str, ParamInfo],
                     groups: list[list[str]], sources: set[str]) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's (sharded) fp32 parameters, expert parameters of ep > 1 excluded."""
    from deepspeed.utils import zero_to_fp32 as z2f

    def keep(name: str) -> bool:
        return name in info and not (info[name].expert and skip_experts)

    skip_experts = any(i.expert for i in info.values()) and (d / EXPERTS).is_dir()
    if stage == 0:
        ms = _load(d / f"mp_rank_{tp_rank:02d}_model_states.pt", d)
        module = ms["module"]
        params = {n: v for n, v in module.items() if n not in set(ms.get("buffer_names") or ())}
        if all(v.dtype == torch.float32 for v in params.values()):
            sources.add("the fp32 module weights")
            return {n: v for n, v in params.items() if keep(n)}
        f32 = (ms.get("optimizer") or {}).get("fp32_groups")
        order = [n for g in groups for n in g]
        flat = [t for g in f32 for t in g] if isinstance(f32, list) and all(isinstance(g, list) for g in f32) else []
        if len(flat) == len(order) and all(n in params and params[n].shape == t.shape for n, t in zip(order, flat)):
            sources.add("DeepSpeed's fp32 master weights")
            return {n: t.float() for n, t in zip(order, flat) if keep(n)}
        sources.add(f"the module's {str(next(iter(params.values())).dtype).replace('torch.', '')} weights")
        return {n: v.float() for n, v in params.items() if keep(n)}
    sources.add("DeepSpeed's fp32 master weights")
    if stage in (1, 2):
        ms = _load(d / f"mp_rank_{tp_rank:02d}_model_states.pt", d)
        osds = [_load(_optim_file(d, r, tp_rank), d)["optimizer_state_dict"] for r in range(dp)]
        shapes = ms["param_shapes"]
        kept = [g for g, s in enumerate(shapes) if all(keep(n) for n in s)]
        flat = [[o["single_partition_of_fp32_groups"][g] for g in kept] for o in osds]
        pads = osds[0].get("param_alignment_paddings")
        state = z2f._get_fp32_state_dict_from_zero2_checkpoint(
            dp, flat, [_zero_model_state(ms, [shapes[g] for g in kept])], False,
            None if pads is None else [pads[g] for g in kept])
        return {n: t.clone() for n, t in state.items()}
    mss = [_load(d / f"zero_pp_rank_{r}_mp_rank_{tp_rank:02d}_model_states.pt", d) for r in range(dp)]
    osds = [_load(_optim_file(d, r, tp_rank), d)["optimizer_state_dict"] for r in range(dp)]
    flat = [o["fp32_flat_groups"] for o in osds]
    state = z2f._get_fp32_state_dict_from_zero3_checkpoint(
        dp, flat, [_zero_model_state(m, m["param_shapes"]) for m in mss], False)
    return {n: t.clone() for n, t in z2f.to_torch_tensor(state).items()}


def _cat_tp(parts: list[dict[str, torch.Tensor]], info: dict[str, ParamInfo], full_sizes: dict[str, int],
            where: Path) -> dict[str, torch.Tensor]:
    """Concatenate tensor-parallel shards along each parameter's tp dimension, cut to the full size."""
    out = {}
    for name, t in parts[0].items():
        i = info[name]
        if i.tp_dim is not None:
            if any(name not in p for p in parts):
                raise ConfigError("RUN_DIR", str(where), reason=f"parameter {name} is missing on some tensor-parallel rank")
            t = torch.cat([p[name] for p in parts], dim=i.tp_dim) if len(parts) > 1 else t
            if name in full_sizes:
                t = t.narrow(i.tp_dim, 0, full_sizes[name])
        out[name] = t
    return out


def plan_from_meta(meta: CheckpointMeta) -> Any:
    """The plan recorded in a checkpoint's metadata (its summary: every field as key=value)."""
    from meshpilot.orchestrator.plan.plan import Plan

    fields = dict(tok.partition("=")[::2] for tok in meta.plan.split())
    ints = ("dp", "tp", "ep", "zero_stage", "micro_batch", "grad_accum")
    try:
        kw: dict[str, Any] = {k: int(fields[k]) for k in ints}
        kw.update(offload_optimizer=fields["offload_optimizer"], offload_params=fields["offload_params"],
                  activation_checkpointing=fields["activation_checkpointing"],
                  sequence_parallel=fields["sequence_parallel"] == "True", zo_mode=fields["zo"])
        return Plan(**kw)
    except (KeyError, ValueError) as e:
        raise ConfigError("RUN_DIR", meta.tag, reason=f"its meshpilot.json records an unreadable plan "
                          f"({meta.plan[:200]!r}: {e})") from None


def checkpoint_weights(ckpt: Path, job: JobConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The full fp32 weights of the built-in model stored in checkpoint ``ckpt`` of a run of ``job``
    (built-in names), and which copy they came from. One process, CPU."""
    meta = read_meta(ckpt, key="RUN_DIR")
    plan = plan_from_meta(meta)
    info, groups = model_structure(job.model)
    if plan.zeroth_order:
        st = _load(ckpt / ZO_STATE_FILE, ckpt)
        if not isinstance(st, dict) or not isinstance(st.get("model"), dict):
            raise ConfigError("RUN_DIR", str(ckpt), reason=f"{ZO_STATE_FILE} is not a meshpilot zeroth-order state")
        w = st["model"]
        dtype = next(iter(w.values())).dtype if w else torch.float32
        weights, source = {n: t.float() for n, t in w.items()}, f"the zeroth-order {str(dtype).replace('torch.', '')} weights"
    else:
        sources: set[str] = set()
        full_sizes = _full_sizes(info, job.model)
        parts = [_tp_rank_weights(ckpt, stage=plan.zero_stage, dp=plan.dp, tp_rank=t, info=info, groups=groups,
                                  sources=sources) for t in range(plan.tp)]
        weights = _cat_tp(parts, info, full_sizes, ckpt)
        if plan.ep > 1 and any(i.expert for i in info.values()):
            weights.update(_expert_weights(ckpt, plan, job, info, full_sizes))
            sources.add("the experts' module weights")
        source = " and ".join(sorted(sources))
    unknown = sorted(set(weights) - set(info))
    missing = sorted(set(info) - set(weights))
    if unknown or missing:
        raise ConfigError("RUN_DIR", str(ckpt), reason="does not hold the built-in model of the run's job ("
                          + "; ".join(x for x in (f"unexpected {', '.join(unknown[:3])}" if unknown else "",
                                                  f"missing {', '.join(missing[:3])}" if missing else "") if x) + ")",
                          fix="export runs of the built-in model (a model given as a Python factory is not exportable)")
    return weights, source


def _full_sizes(info: dict[str, ParamInfo], cfg: ModelConfig) -> dict[str, int]:
    """Full size along the tp dimension of every parameter whose shards may be padded (the vocabulary)."""
    return {n: cfg.vocab for n in info if n in ("tok_embed.weight", "lm_head.weight")}


def _expert_weights(ckpt: Path, plan: Any, job: JobConfig, info: dict[str, ParamInfo],
                    full_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    layout = plan.layout(job.cluster.gpus_per_node)
    by_ep: dict[int, list[dict[str, torch.Tensor]]] = {}
    for r in range(plan.world_size):
        g = layout.groups_of(r)
        slots = by_ep.setdefault(g.ep_rank, [None] * plan.tp)
        if slots[g.tp_rank] is not None:       # ranks of one edp group hold the same experts: read one of them
            continue
        st = _load(ckpt / EXPERTS / f"rank_{r:05d}.pt", ckpt)
        slots[g.tp_rank] = {n: v.float() for n, v in st.items()}
    if sorted(by_ep) != list(range(plan.ep)) or any(p is None for ps in by_ep.values() for p in ps):
        raise ConfigError("RUN_DIR", str(ckpt), reason="its experts/ files do not cover every expert-parallel rank")
    per_ep = [_cat_tp(by_ep[e], info, full_sizes, ckpt) for e in range(plan.ep)]
    out = {}
    for name in per_ep[0]:
        dim = info[name].ep_dim
        out[name] = torch.cat([p[name] for p in per_ep], dim=dim) if dim is not None else per_ep[0][name]
    return out


def resolve_run(run_dir: str | Path, *, step: int | None, job_path: str | Path | None = None
                ) -> tuple[JobConfig, Path]:
    """(the run's job, the checkpoint directory to export): ``step`` None means the newest complete one."""
    from meshpilot.orchestrator.config.loader import load_job

    rd = Path(run_dir)
    if not rd.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), reason="no such run directory")
    jp = Path(job_path) if job_path else rd / "job.yaml"
    if not jp.is_file() and not job_path and (rd.parent / "job.yaml").is_file() and rd.name.startswith("fallback-"):
        jp = rd.parent / "job.yaml"             # an out-of-memory fallback's folder inside the run directory
    if not jp.is_file():
        raise ConfigError("RUN_DIR", str(run_dir), reason="has no job.yaml (not a directory of `meshpilot run`)",
                          fix="give the job file the run was started with: --job JOB.yaml")
    job = load_job(jp, recorded=True)
    root = rd / "checkpoints"
    if not root.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), reason="has no checkpoints (RUN_DIR/checkpoints is missing)",
                          fix="export a run that wrote a checkpoint (train.checkpoint_final, the default, writes one "
                              "after the last step)")
    if step is None:
        found = find_checkpoint(root, key="RUN_DIR")
        if found is None:
            raise ConfigError("RUN_DIR", str(run_dir), reason="has no complete checkpoint yet")
        return job, found[0] / found[1]
    if step < 0:
        raise ConfigError("--step", step, reason="must be >= 0")
    tag = tag_for(step)
    meta, problems = usable(root, tag, key="RUN_DIR")
    if meta is None:
        have = sorted(int(t.name.split("_")[-1]) for t in root.glob("step_*") if (t / "meshpilot.json").is_file())
        raise ConfigError("--step", step, reason="no complete checkpoint of that step in " + str(root),
                          allowed=have or None, fix=None if have else "this run has no complete checkpoint")
    if problems:
        raise ConfigError("--step", step, reason=f"checkpoint {tag} is damaged: " + "; ".join(problems[:3]))
    return job, root / tag


def export_checkpoint(run_dir: str | Path, out: str | Path, *, step: int | None = None,
                      dtype: str | None = None, job_path: str | Path | None = None,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """``meshpilot export``: the Hugging Face directory of a run's checkpoint, written at ``out``."""
    job, ckpt = resolve_run(run_dir, step=step, job_path=job_path)
    dtype = str(dtype or job.train.export_dtype)
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, allowed=tuple(DTYPES))
    hf_config(job.model, DTYPES[dtype])           # an architecture without a mapping fails before any loading
    weights, source = checkpoint_weights(ckpt, job)
    log.info("exporting %s from %s (%s) as %s", job.model.name, ckpt, source, dtype)
    return write_hf_directory(weights, job.model, out, dtype=dtype, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshpilot.orchestrator.train.export",
                                description="a Hugging Face model directory from a run's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--job", default=None)
    p.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        out = export_checkpoint(args.run_dir, args.out, step=args.step, dtype=args.dtype, job_path=args.job,
                                max_shard_bytes=args.max_shard_bytes)
    except ConfigError as e:
        print(f"meshpilot: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
