"""Model FLOPs and MFU: the one rule used by the simulator, the per-step metrics and the run summary.

Forward FLOPs per token of a decoder-only transformer (recomputation never counted, as MFU is defined)::

    F_fwd = 2 * P_mm + 4 * L * S * h

``P_mm`` are the parameters in matrix products per token: the active parameters (top-k experts only)
less the embedding lookups (token and learned positions) and the norm weights (element-wise), plus
the LM head's ``V x h`` product (counted also when its weight is tied to the embedding). ``4 L S h`` are the attention score and
value products (2 matmuls of ``S x h`` per token per layer, causal masking not discounted).

A training step with backpropagation costs ``3 F_fwd`` per token (backward = 2 x forward); a
zeroth-order step (MeZO/ZO2: the loss at theta + eps z and at theta - eps z) costs ``2 F_fwd``.

``MFU = F * tokens_per_s / (world_size * peak)`` with the GPU's dense datasheet peak for the training
precision (``cluster.gpu.bf16_tflops`` ...).
"""
from __future__ import annotations

from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.config.schema import Arch, ClusterConfig, JobConfig, ModelConfig, Precision

BACKPROP_PASSES = 3.0
"""Forward-equivalents per token of a step with backpropagation (forward 1 + backward 2)."""
ZEROTH_ORDER_PASSES = 2.0
"""Forward passes per token of a zeroth-order step (two perturbed losses)."""


def matmul_params(m: ModelConfig) -> float:
    """Parameters used in matrix products per token (see the module docstring)."""
    pc = param_counts(m)
    return float(pc.active - pc.embedding - pc.head - norm_params(m) + m.vocab * m.hidden)


def norm_params(m: ModelConfig) -> int:
    """Weights (and biases) of every norm: two per block (RMSNorm h; LayerNorm 2h) and the final one."""
    per_norm = 2 * m.hidden if m.arch in (Arch.GPT2, Arch.OPT) else m.hidden
    return (2 * m.layers + 1) * per_norm


def forward_flops(matmul: float, layers: int, seq_len: int, hidden: int) -> float:
    """``2 P_mm + 4 L S h``: forward FLOPs per token."""
    return 2.0 * matmul + 4.0 * layers * seq_len * hidden


def model_flops_per_token(m: ModelConfig, seq_len: int, *, zeroth_order: bool) -> float:
    """Model FLOPs per trained token: 3 (backprop) or 2 (zeroth order) forwards."""
    passes = ZEROTH_ORDER_PASSES if zeroth_order else BACKPROP_PASSES
    return passes * forward_flops(matmul_params(m), m.layers, seq_len, m.hidden)


def peak_flops(cluster: ClusterConfig, precision: Precision) -> float:
    """Dense datasheet FLOP/s of one device for the training precision."""
    g = cluster.gpu
    return float({Precision.BF16: g.bf16_tflops, Precision.FP16: g.fp16_tflops,
                  Precision.FP32: g.fp32_tflops}[precision]) * 1e12


def mfu(job: JobConfig, tokens_per_s: float, world_size: int, *, zeroth_order: bool) -> float:
    """Model FLOPs utilisation of ``world_size`` devices training ``tokens_per_s``."""
    fpt = model_flops_per_token(job.model, job.train.seq_len, zeroth_order=zeroth_order)
    return fpt * tokens_per_s / (world_size * peak_flops(job.cluster, job.train.precision))
