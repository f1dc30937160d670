"""Hugging Face checkpoints in and out of the built-in model (torch side of
:mod:`meshpilot.orchestrator.config.hf_layout`, which holds the name/layout table and the
torch-free checks of a model directory).

In: :class:`CheckpointWeights` is the :class:`~.weights.WeightSource` of a model built from a
local Hugging Face directory (``model.path``). Each layer asks for its tensor by full name and,
when sharded, for its part (rows or columns of one dimension); the source maps the name to
the Hugging Face tensor and index (:class:`~meshpilot.orchestrator.config.hf_layout.Source`),
composes the part into that index and reads only those elements with safetensors'
``safe_open(...).get_slice`` (a memory map: a tp=2 rank reads half of a sharded matrix, an
ep rank only its experts). Values are converted to fp32 on the build device; norms and biases
come from the checkpoint too. No communication.

Out (and the contract for the exporter)::

    hf_config_dict(cfg, base=None) -> dict                  config.json contents
    to_hf_state_dict(state, cfg) -> dict[str, Tensor]       built-in full names -> Hugging Face names/layouts
    from_hf_state_dict(state, cfg) -> dict[str, Tensor]     the inverse

``state`` holds what :meth:`Transformer.full_state_dict` returns: full unsharded tensors,
experts stacked (``blocks.i.mlp.w1`` [E, f, h]), no vocabulary padding, no ``lm_head.weight``
when tied. The Hugging Face side is what ``save_pretrained`` writes (mixtral's experts one
tensor each; gpt2's Conv1D weights transposed and c_attn fused). Values are copied, never
rounded: the dtype in is the dtype out.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from meshpilot.orchestrator.config.hf_layout import (MODEL_TYPES, Layout, Source, check_hf_checkpoint,
                                                     checkpoint_tensors, detect_variant, hf_layout, model_type_for,
                                                     read_hf_config)
from meshpilot.orchestrator.config.models import fill_model_defaults, is_moe_layer
from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.errors import ConfigError

from .init_utils import init_device
from .weights import Part, WeightSource

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(blocks\.\d+\.mlp)\.experts\.(\d+)\.(\w+)$")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM"}


def _hf_index(src: Source, hf_shape: tuple[int, ...], part: Part | None, size: int | None
              ) -> tuple[tuple[Any, ...], int]:
    """The Python index into the Hugging Face tensor for ``part`` of the built-in tensor ``src``
    stands for, and the number of zero rows to append (a part past the end: vocabulary padding).

    ``src.select`` fixes some Hugging Face dimensions (ints) and ranges others; the remaining
    dimensions, in order (reversed when transposed), are the built-in tensor's dimensions. The
    part's rows of built-in dimension j narrow the range of the Hugging Face dimension behind j."""
    sel: list[Any] = list(src.select) + [None] * (len(hf_shape) - len(src.select))
    pad = 0
    if part is not None:
        free = [i for i, s in enumerate(sel) if not isinstance(s, int)]
        if src.transpose:
            free = free[::-1]
        d = free[part.dim]
        lo, hi, pad = part.clipped(size)
        off = 0 if sel[d] is None else sel[d][0]
        sel[d] = (off + lo, off + hi)
    return tuple(s if isinstance(s, int) else slice(None) if s is None else slice(s[0], s[1]) for s in sel), pad


class CheckpointWeights(WeightSource):
    """The tensors of a Hugging Face model directory, by built-in full name (see the module docstring).

    Construction reads the headers and checks the directory against ``cfg``
    (:func:`~meshpilot.orchestrator.config.hf_layout.check_hf_checkpoint`: ConfigError naming
    a missing tensor, a shape mismatch or an unsupported model_type). The random-init
    arguments (``std``, ones, zeros) are ignored: every tensor comes from the checkpoint."""

    def __init__(self, directory: str | Path, cfg: ModelConfig):
        self.directory = Path(directory)
        self.cfg = cfg
        self.layout: Layout = check_hf_checkpoint(cfg)
        self._files: dict[str, Any] = {}
        self.bytes_read = 0

    def _handle(self, file: str) -> Any:
        if file not in self._files:
            from safetensors import safe_open
            self._files[file] = safe_open(str(self.directory / file), framework="pt", device="cpu")
        return self._files[file]

    def read(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        """``part`` of the built-in tensor ``name`` (full shape ``shape``), fp32 on :func:`init_device`."""
        src = self.layout.sources.get(name)
        if src is None:
            raise ConfigError("model.path", str(self.directory), reason=f"the built-in model needs {name}, which no "
                              f"tensor of this {self.layout.model_type} checkpoint holds")
        want = self.layout.shapes[name]
        if tuple(shape) != want:
            raise ConfigError("model.path", str(self.directory), reason=f"{name}: the model is built with shape "
                              f"{list(shape)}, the checkpoint's {src.name} gives {list(want)}")
        hf_shape = self.layout.hf_shapes[src.name]
        index, pad = _hf_index(src, hf_shape, part, None if part is None else shape[part.dim])
        out_shape = list(shape)
        if part is not None:
            out_shape[part.dim] = part.stop - part.start
        if part is not None and pad == part.stop - part.start:
            return torch.zeros(out_shape, device=init_device())     # wholly vocabulary padding
        f = self._handle(self.layout.files[src.name])
        if all(i == slice(None) for i in index):
            t = f.get_tensor(src.name)
        else:
            t = f.get_slice(src.name)[index]
        self.bytes_read += t.numel() * t.element_size()
        t = t.to(torch.float32)
        if src.transpose:
            t = t.t()
        if pad:
            rows = list(t.shape)
            rows[part.dim] = pad
            t = torch.cat([t, t.new_zeros(rows)], dim=part.dim)
        assert list(t.shape) == out_shape, (name, list(t.shape), out_shape)
        return t.contiguous().to(init_device())

    def normal(self, name: str, shape: tuple[int, ...], std: float, part: Part | None = None) -> torch.Tensor:
        return self.read(name, shape, part)

    def ones(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        return self.read(name, shape, part)

    def zeros(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        return self.read(name, shape, part)

    def close(self) -> None:
        self._files.clear()

    def describe(self) -> str:
        return f"the {self.layout.model_type} checkpoint {self.directory} ({self.bytes_read / 2**20:.1f} MiB read)"


# --- conversion of whole state dicts (export, tests) -----------------------------------------------

def _resolved(cfg: ModelConfig) -> ModelConfig:
    import dataclasses
    return fill_model_defaults(dataclasses.replace(cfg))


def _unstack(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Stacked expert tensors ``blocks.i.mlp.w1`` [E, ...] -> ``blocks.i.mlp.experts.e.w1``."""
    out = dict(state)
    if not cfg.num_experts:
        return out
    for i in range(cfg.layers):
        if not is_moe_layer(cfg, i):
            continue
        for w in ("w1", "w2", "w3", "fc1", "fc1_bias", "fc2", "fc2_bias"):
            key = f"blocks.{i}.mlp.{w}"
            if key in out:
                stacked = out.pop(key)
                for e in range(stacked.shape[0]):
                    out[f"blocks.{i}.mlp.experts.{e}.{w}"] = stacked[e]
    return out


def _restack(per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in per_expert.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = t
        else:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
    for name, by_e in groups.items():
        out[name] = torch.stack([by_e[e] for e in range(len(by_e))])
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Built-in full tensors (:meth:`Transformer.full_state_dict`) -> the Hugging Face checkpoint of
    ``cfg`` (names and layouts as ``save_pretrained`` writes them; the tied head omitted). Same dtype
    out as in; values copied exactly. KeyError naming a built-in tensor that is missing or left over."""
    cfg = _resolved(cfg)
    lay = hf_layout(cfg)
    flat = _unstack(state, cfg)
    extra = sorted(set(flat) - set(lay.sources))
    if extra:
        raise KeyError(f"to_hf_state_dict: no Hugging Face tensor for {extra[:3]} ({len(extra)} in all)")
    missing = sorted(set(lay.sources) - set(flat))
    if missing:
        raise KeyError(f"to_hf_state_dict: the state lacks {missing[:3]} ({len(missing)} in all)")
    out: dict[str, torch.Tensor] = {}
    for name, src in lay.sources.items():
        t = flat[name]
        if tuple(t.shape) != lay.shapes[name]:
            raise ValueError(f"to_hf_state_dict: {name} has shape {list(t.shape)}, the model needs "
                             f"{list(lay.shapes[name])}")
        hf_shape = lay.hf_shapes[src.name]
        if not src.select and not src.transpose:
            out[src.name] = t.detach().clone()
            continue
        if src.name not in out:
            out[src.name] = torch.empty(hf_shape, dtype=t.dtype, device=t.device)
        index, _ = _hf_index(src, hf_shape, None, None)
        out[src.name][index] = t.detach().t() if src.transpose else t.detach()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, *, model_type: str | None = None
                       ) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict -> built-in full names (experts stacked, as ``full_state_dict``).
    Reads both mixtral layouts and names with or without the base-model prefix. Ignores buffers
    the built-in model does not have (rotary inv_freq, gpt2's causal mask, a tied lm_head)."""
    cfg = _resolved(cfg)
    mt = model_type or model_type_for(cfg)
    fused, base_prefix = detect_variant(cfg, mt, set(state))
    lay = hf_layout(cfg, mt, fused_experts=fused, base_prefix=base_prefix)
    out: dict[str, torch.Tensor] = {}
    for name, src in lay.sources.items():
        if src.name not in state:
            raise KeyError(f"from_hf_state_dict: the {mt} state lacks {src.name} (for {name})")
        t = state[src.name]
        if tuple(t.shape) != lay.hf_shapes[src.name]:
            raise ValueError(f"from_hf_state_dict: {src.name} has shape {list(t.shape)}, the model needs "
                             f"{list(lay.hf_shapes[src.name])}")
        index, _ = _hf_index(src, tuple(t.shape), None, None)
        v = t[index]
        out[name] = (v.t() if src.transpose else v).contiguous().clone()
    return _restack(out)


def to_hf_names(name: str, cfg: ModelConfig) -> str:
    """The Hugging Face tensor holding the built-in tensor ``name`` (per-expert names for MoE)."""
    return hf_layout(_resolved(cfg)).sources[name].name


def to_builtin_names(hf_name: str, cfg: ModelConfig, model_type: str | None = None) -> tuple[str, ...]:
    """The built-in tensors read from the Hugging Face tensor ``hf_name`` (several for gpt2's fused
    c_attn and transformers 5's fused mixtral experts; empty for a buffer)."""
    cfg = _resolved(cfg)
    mt = model_type or model_type_for(cfg)
    for base_prefix in (True, False):
        for fused in ((False, True) if mt == "mixtral" else (False,)):
            lay = hf_layout(cfg, mt, fused_experts=fused, base_prefix=base_prefix)
            found = tuple(n for n, s in lay.sources.items() if s.name == hf_name)
            if found:
                return found
    return ()


def hf_config_dict(cfg: ModelConfig, *, base: dict | None = None) -> dict:
    """config.json contents for the built-in model ``cfg``: ``base`` (the source checkpoint's
    config.json) with the shape keys replaced, or a fresh config of :func:`model_type_for`.
    The rotary base is written both ways (``rope_theta`` and transformers 5's ``rope_parameters``)."""
    cfg = _resolved(cfg)
    mt = base.get("model_type") if base and base.get("model_type") in MODEL_TYPES else model_type_for(cfg)
    hf_layout(cfg, mt)                         # refuses what no Hugging Face class computes
    out: dict[str, Any] = dict(base or {})
    out.update(model_type=mt, architectures=[_ARCHITECTURES[mt]], vocab_size=cfg.vocab,
               tie_word_embeddings=bool(cfg.tie_embeddings))
    h = cfg.hidden
    if mt in ("gpt2",):
        out.update(n_embd=h, n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.ffn, n_positions=cfg.max_positions,
                   layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new")
    elif mt == "opt":
        out.update(hidden_size=h, ffn_dim=cfg.ffn, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                   max_position_embeddings=cfg.max_positions, word_embed_proj_dim=h, do_layer_norm_before=True,
                   activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True)
    else:
        out.update(hidden_size=h, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
                   num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=h // cfg.heads,
                   max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                   rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        out.pop("rope_scaling", None)
        if mt == "mixtral":
            out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k)
        if mt == "qwen2":
            out.setdefault("use_sliding_window", False)
        if mt == "llama":
            out.update(attention_bias=False, mlp_bias=False)
    return out


def read_hf_state_dict(directory: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every weight of a Hugging Face model directory as built-in full tensors (their stored dtype),
    checked against ``cfg`` first (ConfigError as for ``model.path``)."""
    from safetensors.torch import load_file
    d = Path(directory)
    cfg = _resolved(cfg)
    check_hf_checkpoint(_with_path(cfg, d))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, info in checkpoint_tensors(d).items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        loaded = load_file(str(d / file))
        state.update({n: loaded[n] for n in names})
    return from_hf_state_dict(state, cfg, model_type=read_hf_config(d).get("model_type"))


def _with_path(cfg: ModelConfig, d: Path) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, path=str(d))


__all__ = ["CheckpointWeights", "from_hf_state_dict", "hf_config_dict", "read_hf_state_dict", "to_builtin_names",
           "to_hf_names", "to_hf_state_dict"]
