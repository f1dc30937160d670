"""Bytes the element-wise kernels of one decoder layer move, per token, in the forward.

The step-time model prices a micro-batch's GPU work as matrix FLOPs at the achieved matrix rate plus these bytes
at the memory-bound rate (``hbm_efficiency`` x HBM bandwidth, the rate of the optimizer's streaming kernels). Eager
PyTorch runs every element-wise operation as its own kernel that reads its inputs from and writes its output to HBM,
so the bytes follow from the layer's code, operation by operation (w = 2 bytes of a bf16 value, fp32 = 4):

- RMSNorm (llama, mixtral: ``strategies.layers.RMSNorm`` and transformers' ``LlamaRMSNorm``, the same operations):
  upcast (read 2h, write 4h), square (4h, 4h), mean (read 4h), multiply by rsqrt (4h, 4h), downcast (4h, 2h),
  multiply by the weight (2h, 2h): 36h per norm, 72h for the two of a layer.
- LayerNorm (gpt2, opt): one fused kernel, read 2h and write 2h: 8h for two.
- rotary embedding (llama, mixtral), per rotated tensor of width d_t (q: h, k: the kv width): x cos (2, 2),
  the negated half (1, 1), the concatenation (2, 2), x sin (2, 2), the sum (4, 2): 20 d_t.
- grouped-query attention: k and v are repeated to the query width, read 2 kv and write 2h each.
- the attention output's transpose to [b, s, h] before the output projection: a copy, 4h.
- two residual additions: read 4h, write 2h each: 12h.
- SwiGLU: silu (read 2f, write 2f) and the product with up (read 4f, write 2f): 10f. ReLU (opt), GELU (gpt2):
  4f. Linear biases are added in the matrix product's epilogue.
- transformers' OPT (``model.implementation: hf``) also scales q (4h) and trains with dropout after the
  attention and the MLP (read 2h, write 2h and a 1-byte mask each: 10h).
- MoE layer (mixtral): per routed token (top_k x capacity_factor per token) the expert's SwiGLU (10f) and the
  dispatch and combine copies (read 2h, write 2h each: 8h).

The norms and residual additions act on the full hidden state of every token (sharded only with sequence
parallelism); the rest acts on tensor-parallel shards. The backward of an element-wise operation reads the output
gradient and its saved inputs and writes the input gradient: about twice the forward's bytes, as the matrix products
take twice the forward's FLOPs, so the time model's backward = 2 x forward holds for both parts (built-in blocks on
one H200: backward / forward 2.0-2.1 for llama and opt alike, benchmarks/results/2026-11-30-s4-h200x2/layers).

The time model's matrix rate (``matmul_efficiency`` and the shape factor) was fitted on Llama step times, so it
already holds the time of a Llama layer's element-wise kernels as a share of its FLOPs. What the step-time model
adds is the difference (:func:`elementwise_bytes_vs_llama`): the bytes of the model's layers less those of Llama
layers of the same dimensions, zero for llama and mixtral, negative for opt and gpt2 (a LayerNorm and a ReLU move
far less than an RMSNorm in fp32, rotary embeddings and SwiGLU). Measured, built-in blocks on one H200 at 8 x 2,048
tokens: opt-6.7b's forward took 0.80 of llama-2-7b's for the same FLOPs, and 1.29 ms against 3.76 ms outside the
matrix products (benchmarks/results/2026-11-30-s4-h200x2/layers).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.config.schema import Arch, Implementation, ModelConfig


LLAMA_LIKE = (Arch.LLAMA, Arch.MIXTRAL)
"""Architectures whose layers are Llama's (RMSNorm, rotary embeddings, SwiGLU; Mixtral's experts are SwiGLU too)."""


@dataclass(frozen=True)
class ElementwiseBytes:
    """Forward bytes per token of all layers' element-wise kernels: ``replicated`` on the full hidden state
    (divided by tp only with sequence parallelism), ``sharded`` on tensor-parallel shards (divided by tp)."""
    replicated: float
    sharded: float


def elementwise_bytes(m: ModelConfig) -> ElementwiseBytes:
    """Forward element-wise bytes per token of the model's layers (module docstring)."""
    h, f = float(m.hidden), float(m.ffn)
    kv = float((m.kv_heads or m.heads) * (m.hidden // m.heads))
    llama_like = m.arch in LLAMA_LIKE
    residual = 12.0 * h
    norms = 72.0 * h if llama_like else 8.0 * h
    attention = 4.0 * h
    if llama_like:
        attention += 20.0 * h + 20.0 * kv
        if kv < h:
            attention += 2.0 * (2.0 * kv + 2.0 * h)
    if m.arch == Arch.OPT and m.implementation == Implementation.HF:
        attention += 4.0 * h
        residual += 10.0 * h
    dense_mlp = 10.0 * f if llama_like else 4.0 * f
    pc = param_counts(m)
    routed = float(m.top_k * m.capacity_factor) if m.num_experts else 0.0
    moe_mlp = routed * (10.0 * f + 8.0 * h)
    replicated = m.layers * (norms + residual)
    sharded = m.layers * attention + pc.dense_layers * dense_mlp + pc.moe_layers * moe_mlp
    return ElementwiseBytes(replicated=float(replicated), sharded=float(sharded))


def elementwise_bytes_vs_llama(m: ModelConfig) -> ElementwiseBytes:
    """The model's element-wise bytes per token less those of Llama layers of its dimensions (module docstring)."""
    if m.arch in LLAMA_LIKE:
        return ElementwiseBytes(replicated=0.0, sharded=0.0)
    own, ref = elementwise_bytes(m), elementwise_bytes(replace(m, arch=Arch.LLAMA))
    return ElementwiseBytes(replicated=own.replicated - ref.replicated, sharded=own.sharded - ref.sharded)
