"""Hugging Face checkpoints: the name and layout table, the model directory and its checks (no torch).

One table per Hugging Face ``model_type`` says where each tensor of the built-in model
(:mod:`meshpilot.strategies.model`, full unsharded names) lives in a Hugging Face checkpoint:
a :class:`Source` is the Hugging Face tensor's name, an index into it (``select``: per
Hugging Face dimension, ``None`` for all of it, an int, or a ``(start, stop)`` range) and
whether the selected matrix is transposed. So the built-in tensor is
``hf[select]`` (``.T`` when ``transpose``), and the export writes ``hf[select] = b`` (``b.T``).

- llama, mistral, qwen2 (``model.layers.i.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
  ``input_layernorm``, ``post_attention_layernorm``; qwen2 adds q/k/v biases). Rotary
  embeddings: Hugging Face's llama checkpoints are stored for ``rotate_half`` (the halves
  convention, not interleaved pairs), which is the built-in :func:`apply_rotary`: no permutation.
- mixtral: the router ``block_sparse_moe.gate.weight`` [E, h] and experts
  ``block_sparse_moe.experts.e.w1/w2/w3.weight`` (what the hub holds and transformers 5.24's
  ``save_pretrained`` writes); also read: the fused in-memory layout of transformers 5
  (``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` [E, 2f, h] = [w1; w3], ``down_proj`` [E, h, f]).
- gpt2: ``Conv1D`` weights are stored [in, out] (transposed), ``attn.c_attn`` fuses q, k, v
  along its output columns; always tied.
- opt: ``model.decoder.*``; the position table holds ``max_positions + 2`` rows (offset 2);
  ``project_in``/``project_out`` (word_embed_proj_dim != hidden) are refused.

Hub checkpoints saved from the base model lack the head prefix (gpt2's ``h.0.attn...``,
opt's ``decoder.layers...``): names are matched with or without it.

Weights are read from safetensors only: ``model.safetensors``, or the shards named by
``model.safetensors.index.json``. The driver checks a directory here without torch, from
the files' JSON headers (8-byte little-endian length, then the header): every tensor the
built-in model needs is there with its shape, nothing unexpected is left over, and the
checkpoint's settings are ones the built-in model computes.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from meshpilot.orchestrator.config.models import is_moe_layer, model_from_hf_config
from meshpilot.orchestrator.config.schema import Arch, ModelConfig
from meshpilot.orchestrator.errors import ConfigError

MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "gpt2", "opt")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# safetensors dtypes converted to fp32 on load
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 * 2**20           # safetensors' own limit on the JSON header
# Hugging Face tensors that are buffers, not parameters (older checkpoints hold them): ignored
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias")

Select = tuple[Union[None, int, tuple[int, int]], ...]


@dataclass(frozen=True)
class Source:
    """A built-in tensor = ``hf_tensor(name)[select]`` (``.T`` when ``transpose``)."""
    name: str
    select: Select = ()
    transpose: bool = False


@dataclass
class Layout:
    """The table for one model: built-in full name -> :class:`Source`, the built-in full shapes
    (MoE experts by their per-expert names ``blocks.i.mlp.experts.e.w1``) and the Hugging Face shapes."""
    model_type: str
    sources: dict[str, Source] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    hf_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)     # hf name -> file in the directory (when read)

    def add(self, name: str, shape: tuple[int, ...], src: str, hf_shape: tuple[int, ...], select: Select = (),
            transpose: bool = False) -> None:
        self.sources[name] = Source(src, select, transpose)
        self.shapes[name] = tuple(shape)
        self.hf_shapes[src] = tuple(hf_shape)

    def same(self, name: str, shape: tuple[int, ...], src: str) -> None:
        """A tensor stored as it is."""
        self.add(name, shape, src, shape)


def model_type_for(cfg: ModelConfig) -> str:
    """The Hugging Face model_type the built-in ``cfg`` is written as (llama names serve mistral too)."""
    if cfg.arch == Arch.LLAMA:
        return "qwen2" if cfg.qkv_bias else "llama"
    return str(cfg.arch)


def hf_layout(cfg: ModelConfig, model_type: str | None = None, *, fused_experts: bool = False,
              base_prefix: bool = True) -> Layout:
    """The table for ``cfg`` read as (or written to) a checkpoint of ``model_type``.

    ``fused_experts``: mixtral experts in transformers 5's fused in-memory layout.
    ``base_prefix=False``: names without ``model.`` / ``transformer.`` (checkpoints saved from
    the base model). Raises ConfigError for a configuration no Hugging Face class computes."""
    mt = model_type or model_type_for(cfg)
    if mt not in MODEL_TYPES:
        raise ConfigError("model.path", mt, reason=f"unsupported model_type {mt!r}", allowed=MODEL_TYPES)
    arch = str(cfg.arch)
    want_arch = {"mixtral": "mixtral", "gpt2": "gpt2", "opt": "opt"}.get(mt, "llama")
    if arch != want_arch:
        raise ConfigError("model.arch", arch, reason=f"a {mt} checkpoint holds a {want_arch}-style model")
    h, a, k = cfg.hidden, cfg.heads, cfg.kv_heads or cfg.heads
    d, f, V = h // a, cfg.ffn, cfg.vocab
    if mt == "mixtral":
        if cfg.num_experts < 1 or any(not is_moe_layer(cfg, i) for i in range(cfg.layers)):
            raise ConfigError("model.moe_every", cfg.moe_every, reason="a mixtral checkpoint has an MoE layer in "
                              "every block", fix="set model.moe_every=1")
    elif cfg.num_experts:
        raise ConfigError("model.num_experts", cfg.num_experts, reason=f"a {mt} checkpoint has no MoE layers",
                          fix="set model.num_experts=0")
    if cfg.qkv_bias and mt in ("llama", "mistral", "mixtral"):
        raise ConfigError("model.qkv_bias", True, reason=f"a {mt} checkpoint has no q/k/v biases")
    lay = Layout(mt)
    if mt in ("gpt2", "opt"):
        _gpt2_opt(lay, cfg, mt, base_prefix)
        return lay
    P = "model." if base_prefix else ""
    lay.same("tok_embed.weight", (V, h), f"{P}embed_tokens.weight")
    for i in range(cfg.layers):
        b, L = f"blocks.{i}", f"{P}layers.{i}"
        lay.same(f"{b}.attn_norm.weight", (h,), f"{L}.input_layernorm.weight")
        lay.same(f"{b}.mlp_norm.weight", (h,), f"{L}.post_attention_layernorm.weight")
        for proj, rows in (("q", a * d), ("k", k * d), ("v", k * d)):
            lay.same(f"{b}.attn.{proj}_proj.weight", (rows, h), f"{L}.self_attn.{proj}_proj.weight")
            if cfg.qkv_bias:
                lay.same(f"{b}.attn.{proj}_proj.bias", (rows,), f"{L}.self_attn.{proj}_proj.bias")
        lay.same(f"{b}.attn.o_proj.weight", (h, a * d), f"{L}.self_attn.o_proj.weight")
        if mt != "mixtral":
            for proj, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
                lay.same(f"{b}.mlp.{proj}_proj.weight", shape, f"{L}.mlp.{proj}_proj.weight")
            continue
        E = cfg.num_experts
        if not fused_experts:
            lay.same(f"{b}.mlp.router.weight", (E, h), f"{L}.block_sparse_moe.gate.weight")
            for e in range(E):
                for w, shape in (("w1", (f, h)), ("w2", (h, f)), ("w3", (f, h))):
                    lay.same(f"{b}.mlp.experts.{e}.{w}", shape, f"{L}.block_sparse_moe.experts.{e}.{w}.weight")
        else:
            lay.same(f"{b}.mlp.router.weight", (E, h), f"{L}.mlp.gate.weight")
            for e in range(E):
                lay.add(f"{b}.mlp.experts.{e}.w1", (f, h), f"{L}.mlp.experts.gate_up_proj", (E, 2 * f, h),
                        (e, (0, f)))
                lay.add(f"{b}.mlp.experts.{e}.w3", (f, h), f"{L}.mlp.experts.gate_up_proj", (E, 2 * f, h),
                        (e, (f, 2 * f)))
                lay.add(f"{b}.mlp.experts.{e}.w2", (h, f), f"{L}.mlp.experts.down_proj", (E, h, f), (e,))
    lay.same("final_norm.weight", (h,), f"{P}norm.weight")
    if not cfg.tie_embeddings:
        lay.same("lm_head.weight", (V, h), "lm_head.weight")
    return lay


def _gpt2_opt(lay: Layout, cfg: ModelConfig, mt: str, base_prefix: bool) -> None:
    h, f, V = cfg.hidden, cfg.ffn, cfg.vocab
    if mt == "gpt2":
        T = "transformer." if base_prefix else ""
        lay.same("tok_embed.weight", (V, h), f"{T}wte.weight")
        lay.same("pos_embed.weight", (cfg.max_positions, h), f"{T}wpe.weight")
        for i in range(cfg.layers):
            b, L = f"blocks.{i}", f"{T}h.{i}"
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                lay.same(f"{b}.{ours}.weight", (h,), f"{L}.{theirs}.weight")
                lay.same(f"{b}.{ours}.bias", (h,), f"{L}.{theirs}.bias")
            for j, proj in enumerate("qkv"):          # c_attn: [h, 3h] (Conv1D: in x out), columns q | k | v
                cols = (j * h, (j + 1) * h)
                lay.add(f"{b}.attn.{proj}_proj.weight", (h, h), f"{L}.attn.c_attn.weight", (h, 3 * h),
                        (None, cols), transpose=True)
                lay.add(f"{b}.attn.{proj}_proj.bias", (h,), f"{L}.attn.c_attn.bias", (3 * h,), (cols,))
            for ours, theirs, n_in, n_out in (("attn.o_proj", "attn.c_proj", h, h), ("mlp.up_proj", "mlp.c_fc", h, f),
                                              ("mlp.down_proj", "mlp.c_proj", f, h)):
                lay.add(f"{b}.{ours}.weight", (n_out, n_in), f"{L}.{theirs}.weight", (n_in, n_out), transpose=True)
                lay.same(f"{b}.{ours}.bias", (n_out,), f"{L}.{theirs}.bias")
        lay.same("final_norm.weight", (h,), f"{T}ln_f.weight")
        lay.same("final_norm.bias", (h,), f"{T}ln_f.bias")
    else:
        D = "model.decoder." if base_prefix else "decoder."
        lay.same("tok_embed.weight", (V, h), f"{D}embed_tokens.weight")
        lay.same("pos_embed.weight", (cfg.max_positions + 2, h), f"{D}embed_positions.weight")
        for i in range(cfg.layers):
            b, L = f"blocks.{i}", f"{D}layers.{i}"
            pairs = [("attn_norm", "self_attn_layer_norm", (h,)), ("mlp_norm", "final_layer_norm", (h,))]
            pairs += [(f"attn.{p}_proj", f"self_attn.{p}_proj", (h, h)) for p in "qkv"]
            pairs += [("attn.o_proj", "self_attn.out_proj", (h, h)), ("mlp.up_proj", "fc1", (f, h)),
                      ("mlp.down_proj", "fc2", (h, f))]
            for ours, theirs, shape in pairs:
                lay.same(f"{b}.{ours}.weight", shape, f"{L}.{theirs}.weight")
                lay.same(f"{b}.{ours}.bias", (shape[0],), f"{L}.{theirs}.bias")
        lay.same("final_norm.weight", (h,), f"{D}final_layer_norm.weight")
        lay.same("final_norm.bias", (h,), f"{D}final_layer_norm.bias")
    if not cfg.tie_embeddings:
        lay.same("lm_head.weight", (V, h), "lm_head.weight")


# --- the model directory ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    file: str          # file name inside the directory
    dtype: str         # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path, *, key: str = "model.path") -> dict[str, TensorInfo]:
    """Tensor name -> (file, dtype, shape) from a safetensors file's header (no tensor data is read).

    Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. A header that is not
    JSON, or a tensor whose bytes lie beyond the end of the file, is a ConfigError (truncated file)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out: dict[str, TensorInfo] = {}
        data_size = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= end <= data_size:
                raise ValueError(f"tensor {name!r} lies beyond the end of the file (truncated?)")
            out[name] = TensorInfo(p.name, str(info["dtype"]), shape)
        return out
    except OSError as e:
        raise ConfigError(key, str(p), reason=f"cannot read {p.name}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(p), reason=f"{p.name} is not a readable safetensors file: {str(e)[:200]}",
                          fix="re-save the checkpoint with save_pretrained(..., safe_serialization=True)") from None


def weight_files(directory: str | Path, *, key: str = "model.path") -> list[str]:
    """The safetensors files of a Hugging Face model directory: ``model.safetensors``, or every
    shard named by ``model.safetensors.index.json``. A directory with only pickled weights
    (``pytorch_model.bin``) or none is a ConfigError naming the file and the fix."""
    d = Path(directory)
    if (d / INDEX_FILE).is_file():
        try:
            index = json.loads((d / INDEX_FILE).read_bytes().decode("utf-8"))
            files = sorted(set(index["weight_map"].values()))
            if not files or not all(isinstance(x, str) for x in files):
                raise ValueError("its weight_map names no files")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ConfigError(key, str(d), reason=f"{INDEX_FILE} is not a safetensors index: {str(e)[:200]}") from None
        for name in files:
            if os.sep in name or name.startswith(".") or not (d / name).is_file():
                raise ConfigError(key, str(d), reason=f"{INDEX_FILE} names the shard {name!r}, which is not a file "
                                  "in the directory", fix="copy every shard of the checkpoint")
        return files
    if (d / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    pickled = [n for n in PICKLE_FILES if (d / n).is_file()]
    if pickled:
        raise ConfigError(key, str(d), reason=f"holds {pickled[0]}, a pickled PyTorch file; meshpilot reads weights "
                          "only from safetensors (nothing is unpickled)",
                          fix="convert it once: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                          "safe_serialization=True), and use OUT")
    raise ConfigError(key, str(d), reason=f"holds no weights ({SINGLE_FILE} or {INDEX_FILE})",
                      fix=f"for the shape only (random weights) name its config.json: model={d / 'config.json'}")


def checkpoint_tensors(directory: str | Path, *, key: str = "model.path") -> dict[str, TensorInfo]:
    """Every tensor of the directory's safetensors files, by name (headers only)."""
    d = Path(directory)
    out: dict[str, TensorInfo] = {}
    index_map: dict[str, str] | None = None
    if (d / INDEX_FILE).is_file():
        index_map = json.loads((d / INDEX_FILE).read_bytes().decode("utf-8"))["weight_map"]
    for name in weight_files(d, key=key):
        for t, info in read_safetensors_header(d / name, key=key).items():
            if index_map is None or index_map.get(t) == name:
                out[t] = info
    if index_map is not None:
        lost = sorted(t for t in index_map if t not in out)
        if lost:
            raise ConfigError(key, str(d), reason=f"{INDEX_FILE} places {lost[0]!r} in {index_map[lost[0]]}, which "
                              f"does not hold it" + (f" ({len(lost)} such tensors)" if len(lost) > 1 else ""),
                              fix="copy the checkpoint again (a shard is from another checkpoint)")
    return out


def read_hf_config(directory: str | Path, *, key: str = "model.path") -> dict[str, Any]:
    p = Path(directory) / "config.json"
    try:
        c = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(directory), reason=f"cannot read its config.json: {str(e)[:200]}") from None
    if not isinstance(c, dict):
        raise ConfigError(key, str(directory), reason="its config.json does not hold a JSON object")
    return c


def model_from_hf_dir(directory: str | Path, *, key: str = "model") -> dict[str, Any]:
    """ModelConfig fields for ``model: DIR`` (a Hugging Face model directory): the shape from its
    config.json (:func:`model_from_hf_config`), ``path`` = the absolute directory (the workers
    load its weights), and for mixtral ``capacity_factor = num_experts / top_k`` (no token is
    ever dropped, as the Hugging Face model computes; lower it to trade exactness for memory)."""
    d = Path(directory).expanduser()
    if not (d / "config.json").is_file():
        raise ConfigError(key, str(directory), reason="is a directory without config.json",
                          fix="name a Hugging Face model directory (config.json + model.safetensors)")
    weight_files(d, key=key)
    out = model_from_hf_config(d / "config.json")
    out["path"] = str(d.resolve())
    if out.get("num_experts"):
        out["capacity_factor"] = float(out["num_experts"]) / float(out.get("top_k", 2))
    return out


def _unsupported(c: dict[str, Any], mt: str) -> str | None:
    """Why the built-in model would compute something else than Hugging Face's for this config, or None."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if mt in ("llama", "mistral", "qwen2", "mixtral"):
        if rope_type not in (None, "default"):
            return f"rope_type {rope_type!r} (rotary scaling) is not implemented; only the default rotary embedding"
        if c.get("hidden_act", "silu") != "silu":
            return f"hidden_act {c.get('hidden_act')!r}: the built-in SwiGLU uses silu"
        if c.get("attention_bias") or c.get("mlp_bias"):
            return "attention_bias / mlp_bias are not implemented for llama-style models"
        hd = c.get("head_dim")
        if hd is not None and hd != c["hidden_size"] // c["num_attention_heads"]:
            return f"head_dim {hd} != hidden_size / num_attention_heads"
        if float(c.get("partial_rotary_factor", 1.0)) != 1.0:
            return "partial_rotary_factor != 1 is not implemented"
    if mt == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            return f"activation_function {c.get('activation_function')!r}: the built-in GPT-2 MLP uses tanh GELU"
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights", True) is False:
            return "scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not implemented"
    if mt == "opt":
        if not c.get("do_layer_norm_before", True) or c.get("_remove_final_layer_norm"):
            return "post-norm OPT (do_layer_norm_before=false, opt-350m) is not implemented"
        if c.get("activation_function", "relu") != "relu" or c.get("enable_bias", True) is False \
                or c.get("layer_norm_elementwise_affine", True) is False:
            return "OPT variants without relu, biases or affine layer norms are not implemented"
    return None


def sliding_window(c: dict[str, Any]) -> int | None:
    """The attention window of a mistral/qwen2 config (None: full causal attention)."""
    if c.get("model_type") == "qwen2" and not c.get("use_sliding_window", False):
        return None
    w = c.get("sliding_window")
    return int(w) if isinstance(w, int) and w > 0 else None


def detect_variant(cfg: ModelConfig, mt: str, names: set[str]) -> tuple[bool, bool]:
    """(fused_experts, base_prefix) of the checkpoint holding ``names``."""
    fused = mt == "mixtral" and any(n.endswith("layers.0.mlp.experts.gate_up_proj") for n in names)
    for base_prefix in (True, False):
        lay = hf_layout(cfg, mt, fused_experts=fused, base_prefix=base_prefix)
        if lay.sources["tok_embed.weight"].name in names:
            return fused, base_prefix
    return fused, True


def check_hf_checkpoint(m: ModelConfig, *, seq_len: int | None = None, key: str = "model.path") -> Layout:
    """The Hugging Face model directory ``m.path`` can be loaded into the built-in model ``m``:
    a supported model_type and settings, every tensor present with the right shape and a float
    dtype, no tensor left over, the vocabulary equal to the embedding's rows, and (mistral/qwen2
    with a sliding window) ``train.seq_len`` within the window. Headers only; returns the layout."""
    d = Path(m.path)
    c = read_hf_config(d, key=key)
    mt = c.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(key, str(d), reason=f"unsupported model_type {mt!r}", allowed=MODEL_TYPES)
    why = _unsupported(c, mt)
    if why:
        raise ConfigError(key, str(d), reason=f"{mt} checkpoint: {why}")
    window = sliding_window(c)
    if window is not None and seq_len is not None and seq_len > window:
        raise ConfigError("train.seq_len", seq_len, reason=f"exceeds the sliding attention window ({window}) of the "
                          f"{mt} checkpoint {d}; the built-in model attends over the whole causal context and would "
                          "differ from the pretrained model beyond the window",
                          fix=f"use train.seq_len<={window}")
    tensors = checkpoint_tensors(d, key=key)
    fused, base_prefix = detect_variant(m, mt, set(tensors))
    lay = hf_layout(m, mt, fused_experts=fused, base_prefix=base_prefix)
    emb = lay.sources["tok_embed.weight"].name
    if emb in tensors and tensors[emb].shape[:1] != (m.vocab,):
        rows = tensors[emb].shape[0] if tensors[emb].shape else 0
        raise ConfigError("model.vocab", m.vocab, reason=f"{'exceeds' if m.vocab > rows else 'differs from'} the "
                          f"checkpoint's embedding ({emb}: {rows} rows)", fix=f"set model.vocab={rows}")
    missing = sorted(n for n in lay.hf_shapes if n not in tensors)
    if missing:
        raise ConfigError(key, str(d), reason=f"the {mt} checkpoint lacks {_some(missing)} (needed by model.layers="
                          f"{m.layers}, hidden={m.hidden}, ...)", fix="use the complete checkpoint, or a model section "
                          "that matches its config.json")
    for n, shape in lay.hf_shapes.items():
        info = tensors[n]
        if info.shape != shape:
            raise ConfigError(key, str(d), reason=f"tensor {n} has shape {list(info.shape)}, the model section needs "
                              f"{list(shape)}", fix="use a model section that matches the checkpoint's config.json")
        if info.dtype not in FLOAT_DTYPES:
            raise ConfigError(key, str(d), reason=f"tensor {n} has dtype {info.dtype}", allowed=FLOAT_DTYPES)
    tied_head = "lm_head.weight" if m.tie_embeddings else None
    extra = sorted(n for n in tensors if n not in lay.hf_shapes and n != tied_head and not _ignored(n, mt))
    if extra:
        raise ConfigError(key, str(d), reason=f"the checkpoint holds {_some(extra)}, which the built-in {m.arch} "
                          f"model has no place for", fix="use a model section that matches the checkpoint's "
                          "config.json (layers, tie_embeddings, qkv_bias)")
    lay.files = {n: tensors[n].file for n in lay.hf_shapes}
    return lay


def _ignored(name: str, mt: str) -> bool:
    # gpt2's causal-mask buffer "h.i.attn.bias" (c_attn's bias ends in "c_attn.bias")
    return name.endswith(IGNORED_SUFFIXES) or (mt == "gpt2" and name.endswith(".attn.bias"))


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


__all__ = ["MODEL_TYPES", "Layout", "Source", "TensorInfo", "check_hf_checkpoint", "checkpoint_tensors",
           "detect_variant", "hf_layout", "model_from_hf_dir", "model_type_for", "read_hf_config",
           "read_safetensors_header", "sliding_window", "weight_files"]
