"""Model presets and parameter arithmetic.

A preset is a table row of dimensions; every count is computed from the dimensions with
the formulas below (the published count is kept beside each preset only so that tests can
check the arithmetic to 1%).

Per transformer layer, with h = hidden, a = heads, k = kv_heads, d = h/a, f = ffn:
- llama/mixtral (no biases): attention h*a*d + 2*h*k*d + a*d*h (+ a*d + 2*k*d with
  ``qkv_bias``, qwen2); SwiGLU MLP 3*h*f; two RMSNorms 2*h. An MoE layer has E experts of 3*h*f and a router h*E.
- gpt2/opt (biases, LayerNorm with bias): attention 4*h*h + 4*h; GELU MLP 2*h*f + f + h;
  two LayerNorms 4*h.
Embeddings V*h (+ learned positions P*h for gpt2, (P+2)*h for opt's offset table), a final
norm, and an LM head V*h unless tied.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.config.schema import Arch, ModelConfig
from meshpilot.orchestrator.errors import ConfigError

# name: (arch, layers, hidden, heads, kv_heads, ffn, vocab, max_positions, extra, published params)
_PRESETS: dict[str, dict[str, Any]] = {}


def _add(name: str, arch: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int,
         published: float, kv_heads: int | None = None, max_positions: int = 2048, **extra: Any) -> None:
    _PRESETS[name] = dict(name=name, arch=arch, layers=layers, hidden=hidden, heads=heads,
                          kv_heads=kv_heads or heads, ffn=ffn, vocab=vocab,
                          max_positions=max_positions, _published=published, **extra)


# GPT-2 (Radford et al. 2019; Hugging Face configs): tied embeddings, 1024 positions.
for _n, _L, _h, _a, _p in [("gpt2", 12, 768, 12, 124e6), ("gpt2-medium", 24, 1024, 16, 355e6),
                           ("gpt2-large", 36, 1280, 20, 774e6), ("gpt2-xl", 48, 1600, 25, 1.56e9)]:
    _add(_n, "gpt2", _L, _h, _a, 4 * _h, 50257, _p, max_positions=1024)
# OPT (Zhang et al. 2022, Table 1); vocab 50272, 2048 positions (+2 offset rows). The names round
# the size; the counts here are those of the released checkpoints (1.3b holds 1.316B, 2.7b 2.652B, 13b 12.85B).
for _n, _L, _h, _a, _p in [("opt-125m", 12, 768, 12, 125e6), ("opt-1.3b", 24, 2048, 32, 1.316e9),
                           ("opt-2.7b", 32, 2560, 32, 2.652e9), ("opt-6.7b", 32, 4096, 32, 6.658e9),
                           ("opt-13b", 40, 5120, 40, 12.85e9), ("opt-30b", 48, 7168, 56, 29.97e9),
                           ("opt-66b", 64, 9216, 72, 65.7e9), ("opt-175b", 96, 12288, 96, 175e9)]:
    _add(_n, "opt", _L, _h, _a, 4 * _h, 50272, _p)
# LLaMA 2 (Touvron et al. 2023) and LLaMA 3; published counts as reported by the HF checkpoints.
_add("llama-2-7b", "llama", 32, 4096, 32, 11008, 32000, 6.74e9, max_positions=4096)
_add("llama-2-13b", "llama", 40, 5120, 40, 13824, 32000, 13.02e9, max_positions=4096)
_add("llama-2-70b", "llama", 80, 8192, 64, 28672, 32000, 68.98e9, kv_heads=8, max_positions=4096)
_add("llama-3-8b", "llama", 32, 4096, 32, 14336, 128256, 8.03e9, kv_heads=8, max_positions=8192,
     rope_theta=500000.0)
# Small llama-style models for tests and demos (no published count: None).
_add("llama-1b", "llama", 16, 2048, 16, 5632, 32000, None)
_add("tiny-llama", "llama", 2, 64, 4, 128, 256, None, kv_heads=2, max_positions=256)
_add("tiny-gpt2", "gpt2", 2, 64, 4, 256, 256, None, max_positions=256)
# Mixtral 8x7B (Jiang et al. 2024): 46.7B total, 12.9B active per token (top-2 of 8).
_add("mixtral-8x7b", "mixtral", 32, 4096, 32, 14336, 32000, 46.7e9, kv_heads=8, max_positions=32768,
     num_experts=8, top_k=2, moe_every=1, rope_theta=1e6, _published_active=12.9e9)
_add("tiny-mixtral", "mixtral", 2, 64, 4, 128, 256, None, kv_heads=2, max_positions=256,
     num_experts=4, top_k=2, moe_every=1)


def model_preset_names() -> list[str]:
    return sorted(_PRESETS)


def published_params(name: str) -> tuple[float | None, float | None]:
    """The published (total, active) parameter counts of a preset, for checking the arithmetic."""
    row = _PRESETS[name]
    return row["_published"], row.get("_published_active")


def model_preset(name: str) -> dict[str, Any]:
    """The preset as a plain mapping of ModelConfig fields."""
    if name not in _PRESETS:
        raise ConfigError("model", name, reason="unknown model preset",
                          fix="use one of " + ", ".join(model_preset_names())
                          + ", a mapping of dimensions, a path to a Hugging Face config.json (shape only) or a "
                          "Hugging Face model directory (shape and weights)")
    return {k: v for k, v in _PRESETS[name].items() if not k.startswith("_")}


def model_from_hf_config(path: str | Path) -> dict[str, Any]:
    """Translate a Hugging Face ``config.json`` (llama, mistral, qwen2, mixtral, gpt2, opt) into ModelConfig fields
    (the shape; :func:`meshpilot.orchestrator.config.hf_layout.model_from_hf_dir` adds the weights' path)."""
    path = Path(path)
    try:
        c = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("model", str(path), reason=f"Hugging Face config is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError("model", str(path), reason=f"cannot read Hugging Face config: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError("model", str(path), reason=f"cannot read Hugging Face config: {e}") from None
    if not isinstance(c, dict):
        raise ConfigError("model", str(path), reason=f"a Hugging Face config.json holds a JSON object, this one a "
                          f"{type(c).__name__}")
    mt = c.get("model_type")
    name = c.get("_name_or_path") or path.parent.name or "hf-model"
    try:
        if mt in ("llama", "mistral", "qwen2", "mixtral"):
            out = dict(arch="mixtral" if mt == "mixtral" else "llama", layers=c["num_hidden_layers"],
                       hidden=c["hidden_size"], heads=c["num_attention_heads"],
                       kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                       ffn=c["intermediate_size"], vocab=c["vocab_size"],
                       max_positions=c.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=_rope_theta(c))
            if mt == "qwen2":
                out["qkv_bias"] = True              # Qwen2's q/k/v projections carry biases (o_proj does not)
            if mt == "mixtral":
                out.update(num_experts=c["num_local_experts"], top_k=c.get("num_experts_per_tok", 2))
        elif mt == "gpt2":
            h = c["n_embd"]
            out = dict(arch="gpt2", layers=c["n_layer"], hidden=h, heads=c["n_head"],
                       ffn=c.get("n_inner") or 4 * h, vocab=c["vocab_size"],
                       max_positions=c.get("n_positions", 1024), tie_embeddings=True,
                       norm_eps=c.get("layer_norm_epsilon", 1e-5))
        elif mt == "opt":
            if c.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"]:
                raise ConfigError("model", str(path), reason="OPT with word_embed_proj_dim != hidden_size "
                                  "(opt-350m) is not supported")
            out = dict(arch="opt", layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                       heads=c["num_attention_heads"], ffn=c["ffn_dim"], vocab=c["vocab_size"],
                       max_positions=c.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(c.get("tie_word_embeddings", True)))
        else:
            raise ConfigError("model", str(path), reason=f"unsupported model_type {mt!r}",
                              allowed=["llama", "mistral", "qwen2", "mixtral", "gpt2", "opt"])
    except KeyError as e:
        raise ConfigError("model", str(path), reason=f"Hugging Face config lacks {e.args[0]!r}") from None
    out["name"] = str(name)
    return out


def _rope_theta(c: dict[str, Any]) -> float:
    """The rotary base of a Hugging Face config: ``rope_theta`` at the top level (transformers 4),
    or inside ``rope_parameters`` (transformers 5 writes it there)."""
    rope = c.get("rope_parameters")
    if c.get("rope_theta") is not None:
        return float(c["rope_theta"])
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        return float(rope["rope_theta"])
    return 10000.0


def llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """LLaMA's default MLP width: 2/3 of 4h, rounded up to a multiple of 256."""
    f = int(2 * 4 * hidden / 3)
    return multiple_of * math.ceil(f / multiple_of)


def fill_model_defaults(m: ModelConfig) -> ModelConfig:
    """Fill the derived defaults left None, in place: kv_heads = heads, tied embeddings for
    gpt2/opt, ffn = 4h (gpt2/opt) or :func:`llama_ffn`. Returns ``m``."""
    if m.kv_heads is None:
        m.kv_heads = m.heads
    if m.tie_embeddings is None:
        m.tie_embeddings = m.arch in (Arch.GPT2, Arch.OPT)
    if m.ffn is None:
        m.ffn = 4 * m.hidden if m.arch in (Arch.GPT2, Arch.OPT) else llama_ffn(m.hidden)
    return m


def is_moe_layer(model: ModelConfig, i: int) -> bool:
    return model.num_experts > 0 and i % model.moe_every == model.moe_every - 1


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, split the way the simulator and the executor need them."""
    embedding: int          # token (+ position) embeddings
    head: int               # LM head (0 when tied)
    final_norm: int
    attention: int         # per layer, including its norm(s)
    mlp: int                # per dense layer (MLP only)
    expert: int             # one expert's MLP
    router: int             # per MoE layer
    dense_layers: int
    moe_layers: int
    num_experts: int
    top_k: int

    @property
    def layer_dense(self) -> int:
        return self.attention + self.mlp

    @property
    def layer_moe(self) -> int:
        return self.attention + self.router + self.num_experts * self.expert

    @property
    def total(self) -> int:
        return (self.embedding + self.head + self.final_norm
                + self.dense_layers * self.layer_dense + self.moe_layers * self.layer_moe)

    @property
    def experts_total(self) -> int:
        return self.moe_layers * self.num_experts * self.expert

    @property
    def active(self) -> int:
        """Parameters that one token touches (top_k experts per MoE layer)."""
        return self.total - self.moe_layers * (self.num_experts - min(self.top_k, self.num_experts)) * self.expert


def param_counts(m: ModelConfig) -> ParamCounts:
    h, a, k = m.hidden, m.heads, m.kv_heads or m.heads
    d = h // a
    f = m.ffn
    biased = m.arch in (Arch.GPT2, Arch.OPT)
    if biased:
        attention = 4 * h * h + 4 * h + 4 * h            # qkv+o weights and biases, two LayerNorms
        mlp = 2 * h * f + f + h
        embedding = m.vocab * h + (m.max_positions + (2 if m.arch == Arch.OPT else 0)) * h
        final_norm = 2 * h
    else:
        attention = h * a * d + 2 * h * k * d + a * d * h + 2 * h
        if m.qkv_bias:
            attention += a * d + 2 * k * d               # q, k, v biases (qwen2)
        mlp = 3 * h * f
        embedding = m.vocab * h
        final_norm = h
    moe_layers = sum(is_moe_layer(m, i) for i in range(m.layers))
    return ParamCounts(embedding=embedding, head=0 if m.tie_embeddings else m.vocab * h,
                       final_norm=final_norm, attention=attention, mlp=mlp,
                       expert=mlp if m.num_experts else 0, router=h * m.num_experts if m.num_experts else 0,
                       dense_layers=m.layers - moe_layers, moe_layers=moe_layers,
                       num_experts=m.num_experts, top_k=m.top_k)
