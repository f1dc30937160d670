"""GPU and CPU memory per rank: model states, activations, buffers, fixed costs.

Notation: P_r = parameters a rank holds before ZeRO sharding (tensor-parallel shard of the
sharded matrices, experts divided by ep, replicated norms/routers whole); P_s = its ZeRO
shard (non-expert parameters over the dp group, expert parameters over the expert-data-
parallel group of dp/ep ranks); w = bytes of a 16-bit (or 32-bit) value; K = 12 for
mixed-precision AdamW (fp32 master 4 + momentum 4 + variance 4), 4 for SGD (master only).

What DeepSpeed 0.19 allocates with bf16 (read from runtime/fp16/fused_optimizer.py,
runtime/zero/stage_1_and_2.py, runtime/zero/stage3.py); bucket sizes and the stage-3 window caps are
those of the config the worker runs (:mod:`.deepspeed_settings`):
- stage 0 (FP16_Optimizer): w·P_r weights, w·P_r gradients, K·P_r optimizer state; at the step
  ``_flatten_dense_tensors([p.grad.to(fp32) for p in group])`` holds the per-tensor fp32 copies and
  their flat concatenation at once (8·P_r; checked against torch's max_allocated of a 3.4B Llama at
  dp=2 on H200: 76.7 GiB measured, 76.6 predicted); the bucketed all-reduce flat buffer of
  the engine's backward (w·min(P_r, bucket)) is freed before the step;
- stage 1/2 (DeepSpeedZeroOptimizer): w·P_r weights, gradients w·P_r (stage 1) or w·P_s
  (stage 2), K·P_s states, one ``reduce_bucket_size`` staging buffer (torch.empty, model dtype, even
  for tiny models), at the step the gradient partition flattened into one w·P_s buffer and its fp32 copy
  (4·P_s) at once (stage 1 first drops the gradients of the parameters outside its partition,
  w·(P_r - P_s): ``free_grad_in_param_list(params_not_in_partition)``); with optimizer offload no gradient
  partition on the GPU but ``temp_grad_buffer_for_gpu_offload`` (w x the largest parameter);
- stage 3: w·P_s weights plus the gathered window (largest module + prefetch bucket, capped by
  max_live_parameters), w·P_s gradient partition, K·P_s states, the staging buffer, and at the step
  one optimizer sub-group's gradients at a time, flattened to 16 bits and copied to fp32 while both
  live ((w + 4)·min(P_s, sub_group_size): ``_prepare_fp32_grad_for_sub_group``);
- offload_optimizer=cpu / offload_params=cpu: the optimizer states, fp32 gradients and (parameter
  offload) the w·P_s weight partition move to host memory, in pinned blocks that torch rounds up to
  powers of two, plus per-parameter accumulation buffers: :func:`.host_memory.host_memory_terms`.

overlap_comm (the plan's ``comm_overlap``; :func:`overlap_comm_terms`). With it on, DeepSpeed issues
work on side streams, and PyTorch's caching allocator keeps one pool per stream: a block freed by
one stream's allocation never serves another stream's. What the side streams allocate therefore
stays reserved beside the compute stream's peak instead of being reused by it (the optimizer
step's fp32 sub-group, the activations):
- stages 1-2: a second ``reduce_bucket_size`` bucket (``setup_buckets`` double-buffers so the next
  bucket fills while the last is reduced; allocated, w·B), and on the ``reduction_stream`` the
  flattened copy of one bucket that ``allreduce_bucket`` reduces (a pool of w·B);
- stage 3: on the ``reduce_and_partition_stream`` the interleaved copy of one bucket that
  ``reduce_scatter_coalesced`` concatenates (w·B; the gradient accumulation dtype is the model's, so
  the partitions are views); on the all-gather stream every gathered parameter (the coordinator runs
  ``all_gather_coalesced``, whose flat buffers are allocated, under that stream). That pool grows to
  the most parameters gathered at once: the window counted above, plus the parameters kept because
  they are used again within ``stage3_max_reuse_distance`` elements of the trace (at the turn from
  forward to backward, the last layers of the forward), min(P_r - window, reuse distance) elements.
  With one data-parallel rank nothing is gathered.
With it off all of this runs on the compute stream and shares its pool: the kept parameters are then
part of the activation phase (allocated from the end of the forward until the backward reaches them;
:func:`kept_parameters`, read off an allocator trace of a 1B model). Measured on 2 x H200 (llama-2-13b
ZeRO-3 dp=2, mb 1x8, checkpointing, bucket 2e8): 110.7 GiB NVML peak without overlap_comm (109.9
predicted), +3.45 GiB with it, +4.94 GiB with DeepSpeed's defaults (bucket 5e8); this model gives
+0.34 and +1.47: the side-stream pools hold about 3 GiB more than it explains
(benchmarks/results/2026-11-29-s2-h200x2/z3knobs, tests/test_comm_overlap.py). With DeepSpeed's defaults on llama-2-7b
dp=2 (2026-11-30-s9-h200x2/call3): 79.5 GiB against 75.8 at micro-batch 1, and transformers' model with checkpointing
72.1 against 64.5 (63.7 without overlap_comm, 63.1 predicted). The allocator's history of the first shows the side
streams holding 4.4 GiB at the end and, on the compute stream, the step's fp32 sub-group copies taking two new 3.7 GiB
segments at the second step (the first step's blocks were split by the forward's tensors). Where the card has room
that reserve keeps growing: llama-2-13b plans at 10 and 14 x 1 reserved 137.8 GiB, 21 and 14 above allocated, and
ran, the allocator returning its free cached blocks when a cudaMalloc fails (2026-11-30-s9 call4). Not modelled:
ZeRO-3 with overlap_comm is a regime of its own in sim/error_bands.py, whose band carries that evidence.

The caching allocator's reserve, by phase. Allocated = static + max(activation phase, step phase), static
being the weights, gradients, optimizer states and buckets; the activation phase the saved activations
and the backward's working set, the step phase its temporaries (stages 1-2: the flat 16-bit gradient
partition and its fp32 copy; stage 3: one sub-group's, likewise; stage 0: the per-tensor fp32
copies and their concatenation). In PyTorch's default allocator mode a freed block serves a later
request only where that request fits inside it: the activation phase frees many per-tensor blocks, the
step asks for a few flat buffers of P_s elements, so neither phase reuses the other's blocks and both
stay reserved. Reserved = (static + step phase + max(activation phase, load hole)) x (1 + fragmentation),
and at least allocated + load hole (the loaded model's per-parameter blocks serve the activations, not
the flat buffers). Measured (built-in llama-2-7b dp=2 ZeRO-2, mb 1 x 8, no checkpointing, 2 x H200,
benchmarks/results/2026-11-30-s2-h200x2/trace_std): the engine build leaves 31.6 GiB of free blocks, which
serve the activations and the step's 6 P_s in turn; reserved rises by the two Adam moments (2 x 4 P_s, new
segments) at the first step and stays at 88.46 GiB against 75.40 allocated; this model, which counts the two
phases side by side, gives 88.9 and 75.7. Where the activation phase is large (micro-batch 4, no
checkpointing) part of the step fits in its blocks and the model is 4-9% high (2026-11-30-s2 alloc3). ``fragmentation`` is the
rest, fitted with ``model_load_fragmentation`` on the calibration half of the 2026-11-27 sets (0.0155,
1.1017). With ``train.expandable_segments`` (free neighbours merge) the phases can share and the
reserve measured 0.2-18.6 GiB on 8 runs, with no rule found: the model stays that of the default mode.
The allocator's history of six ZeRO 0-2 plans (``train.memory_history``; 2026-11-30-s6-h200x2/allocator_history.txt)
shows where the segments come from: all but one of the segments held at the end (0.98 GiB, on one plan) were made by
the end of the first optimizer step, and the engine's build leaves free blocks that later phases reuse - the construction's fp32
per-parameter segments (all of them at stage 0; at stages 1-2 those still holding a cast 16-bit parameter when
DeepSpeed empties the cache, about w P_r), the partition's clone (w P_s) and the flat fp32 gradient with which the
optimizer initialises its states (4 P_s; stage 0: 4 P). The step's flat buffers come back to the clone and that block
each step. Where the phases share those blocks in turn, reserved = static + max(build's free blocks, activation
phase, step) (measured: llama-3-8b tp=2 92.3 GiB against 89.8, opt-2.7b ZeRO-1
38.6 against 38.5; this model gives 107.5 and 46.7); where it does not, which blocks the first step's tensors land in
decides whether the step's flat buffers find theirs (llama-2-7b tp=2 at micro-batch 4: the 16-bit gradients sat in
the 4 P block at the first step, so its flat copy took a new 4 P segment that stays cached: 98.1 GiB, against 80.1
from sharing and 106.8 from this model). No closed rule follows that first step's packing across the six, so the
phases stay counted side by side: 0-20% over on these plans, never under.

Peak (what NVML reports) = max(reserved, the engine build's reserve at stages 1-2) + side-stream pools +
CUDA context + NCCL buffers, but not past the card where the live tensors fit it: the allocator returns its free
cached segments to the driver when a cudaMalloc fails and retries, so such a plan runs at the card or runs out of
memory, depending on whether the blocks it then needs hold live tensors (``at_card``; the simulator calls it risky).
The engine build (:func:`engine_build_terms`): DeepSpeedZeroOptimizer.__init__ holds the parameters and their flat
copy at once (2 w·P_r allocated) and clones the rank's partition (w·P_s) into a segment of its own; with optimizer
offload, where the run itself is small, that is the peak (built-in llama-2-7b dp=2: 25.10 GiB allocated, 31.97
reserved). ``calibration.device_fixed_gib`` (a
per-rank constant fitted by ``meshpilot calibrate``: measured peak minus the rest of this model)
replaces the CUDA context (CPU workers: runtime) term when set, and ``calibration.host_process_gib`` the constants'
``cpu_process_gib`` in the host memory of every rank of a node. Host memory per node = ranks on the node x
(process + max(offloaded buffers + ``pinned_node_overhead`` x their page-locked bytes, ZeRO-3's defragmentation
copy - what the process allocates after it) + a zeroth-order model built on the host), in the node's used memory
(MemTotal - MemAvailable: anonymous and shared pages, not the file-backed pages RSS also counts), compared by the
simulator with ``cluster.memory_usage_threshold`` x ``cluster.cpu_memory_gib`` (where Ray's memory monitor kills)
less what the node holds beside the workers (``node_base_gib`` + ``ray_node_gib``: the system, Ray's processes and
the driver, which the monitor counts too; simulator.host_usable_gib).

The second allocator term is the hole the model leaves behind when it is transformers' model
class (``model.implementation: hf``) at ZeRO 0-2 (at ZeRO-3 ``zero.Init`` partitions each parameter as it is
created, so there is none): the model is loaded as separate per-parameter 16-bit
tensors (w·P_r), then DeepSpeed copies them into its own flat buffers and frees the originals;
the caching allocator keeps those blocks reserved, and later tensors of other sizes reuse them
only in part; the per-tensor gradients of stages 0-1 (autograd's, of the parameters' own shapes) do fit
them, block for block, so there the gradients and the hole are one phase. Measured reserved - allocated
on the H200 runs of Hugging Face Llama grows with
the model, not with the activations (0.8-2.2 GiB at 0.37B, 12-19 GiB at 6.7B at any
micro-batch), which a fraction of the allocated peak alone cannot follow. The built-in model
leaves no such hole (it is built layer by layer where it runs): measured 1.0-2.1 GiB at 7B
tp=2 and 4.9 GiB at 7B and 13B ZeRO-3, so the term is 0 for ``builtin``.

Activations are counted from the saved tensors of the Hugging Face layers with SDPA (no s^2
scores): see :func:`layer_activation_bytes`. Every evaluation function takes numpy arrays (one
entry per plan) so the planner scores thousands of plans in one call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.config.schema import (Accelerator, Arch, Implementation, JobConfig, ModelConfig, Optimizer,
                                                  Precision)
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.sim.deepspeed_settings import DeepSpeedSettings, deepspeed_settings
from meshpilot.orchestrator.sim.elementwise import elementwise_bytes_vs_llama
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.flops import matmul_params
from meshpilot.orchestrator.sim.host_memory import host_memory_terms, parameter_tensors
from meshpilot.orchestrator.sim.loss_blocks import loss_segments


# --- published formulas (paper mode, for tests and explanation) ----------------------------

def zero_model_states_paper(params: float, dp: int, stage: int, k: float = 12.0) -> float:
    """Bytes per GPU of model states in the ZeRO paper (Rajbhandari et al. 2019, Figure 1):
    stage 0: (2+2+K)P; 1: 4P + KP/d; 2: 2P + (2+K)P/d; 3: (2+2+K)P/d."""
    P, d = float(params), float(dp)
    if stage == 0:
        return (4 + k) * P
    if stage == 1:
        return 4 * P + k * P / d
    if stage == 2:
        return 2 * P + (2 + k) * P / d
    if stage == 3:
        return (4 + k) * P / d
    raise ValueError(f"stage must be 0-3, got {stage}")


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, mode: str = "none") -> float:
    """Activation bytes per transformer layer (Korthikanti et al. 2022, Table 2), 16-bit activations
    and 1-byte dropout masks. mode: none | tp | tp+sp | full (full recomputation)."""
    sbh = s * b * h
    if mode == "none":
        return sbh * (34 + 5 * a * s / h)
    if mode == "tp":
        return sbh * (10 + 24 / t + 5 * a * s / (h * t))
    if mode == "tp+sp":
        return sbh * (34 / t + 5 * a * s / (h * t))
    if mode == "full":
        return 2 * sbh
    raise ValueError(f"mode must be none, tp, tp+sp or full, got {mode!r}")


# --- the model's fixed terms ---------------------------------------------------------------

@dataclass(frozen=True)
class LayerActivations:
    """Saved bytes per token of one layer, split by how tensor/sequence parallelism divides them.

    ``replicated`` (norm inputs/outputs, dropout masks) is divided by t only with sequence
    parallelism; ``attention`` and ``mlp`` (inside the tensor-parallel region) by t; ``router`` is the
    fp32 router output of an MoE layer (not divided).
    """
    replicated: float
    attention: float
    mlp: float
    router: float = 0.0


def layer_bytes_per_token(mt: ModelTerms, a: PlanArrays, c: SimulatorConstants):
    """Bytes per token on a rank: (a dense layer's saved tensors, an MoE layer's, the largest layer's, one layer's
    transient buffers in its backward). An MoE layer saves its routed experts' ``mlp`` bytes (top_k x capacity_factor
    per token) and the dispatch and combine buffers (2h each); the working set is ``working_set_factor`` x 2
    (h + f x routed) / tp (autograd's activation gradients, fp32 norm upcasts)."""
    L, h = mt.acts, mt.hidden
    spdiv = np.where(a.sp, a.tp, 1)
    routed = mt.top_k * mt.capacity_factor
    dense = L.replicated / spdiv + (L.attention + L.mlp) / a.tp
    moe = L.replicated / spdiv + L.attention / a.tp + routed * (L.mlp / a.tp + 4.0 * h) + L.router
    one_layer = np.maximum(dense if mt.dense_layers else 0.0, moe if mt.moe_layers else 0.0)
    working = c.working_set_factor * 2.0 * (h + mt.ffn * max(routed, 1.0)) / a.tp
    return dense, moe, one_layer, working


def layer_backward_bytes(mt: ModelTerms, seq_len: int, a: PlanArrays, c: SimulatorConstants):
    """(one layer's saved tensors, its transient buffers in its backward) in bytes per rank: the largest layer's
    activations (recomputed first where checkpointed) and its working set (:func:`layer_bytes_per_token`)."""
    tokens = a.micro_batch * float(seq_len)
    _, _, one_layer, working = layer_bytes_per_token(mt, a, c)
    return tokens * one_layer, tokens * working


def layer_activation_bytes(m: ModelConfig) -> LayerActivations:
    """Count the tensors autograd saves in one layer (bf16, SDPA attention), built-in or Hugging Face.

    llama/mixtral: each RMSNorm upcasts to fp32 and saves the fp32 input (4h), the bf16 normalised
    output (2h, for the weight's gradient) and hands its weighted output (2h) to the projections that
    follow, which save it: 16h for two. Attention saves q after RoPE, the GQA-expanded k and v
    (repeat_kv copies them to h each) and the SDPA output (2h each), plus the fp32 log-sum-exp per
    head (4a): 8h + 4a. The output projection's input is a view of the SDPA output (the fused kernel
    writes it as [b, s, a, d], so transpose(1, 2).reshape copies nothing). SwiGLU saves gate output g,
    silu(g), up output u and silu(g)*u (2f each): 8f. MoE adds fp32 router logits (4E).
    gpt2/opt: LayerNorm inputs and outputs (2h each, two norms: 8h) are replicated, and with
    transformers' layers (``model.implementation: hf``, which train with dropout) two 1-byte dropout
    masks (2h: Korthikanti's 10h); the built-in layers have no dropout. Attention saves q, k, v (6h),
    the SDPA output (2h, the output projection's input is a view of it) and the log-sum-exp (4a):
    8h + 4a; gpt2's GELU MLP saves fc output and GELU output (2f each): 4f; opt's ReLU saves its
    output, which is also fc2's input: 2f.
    Measured: the allocator history of built-in opt-6.7b ZeRO-2 mb 8 x 1 on 2 x H200 at its allocated
    peak (the loss's forward, every layer's saved tensors alive) holds per layer q, k, v, the SDPA output
    and log-sum-exp, two LayerNorm outputs, two residual sums and the ReLU output, and no copy of the SDPA
    output (benchmarks/results/2026-11-30-s8-h200x2/hist4, allocator_history.py --peak); counted on the
    CPU with autograd's saved-tensor hooks, the built-in llama and opt layers save these bytes
    (tests/test_memory_model.py::test_saved_activation_bytes_per_layer_counted_by_autograd). Until
    2026-11-30 the count had 12h for llama's norms and 10h for attention (the SDPA output copied):
    2h per layer under for llama, 2h over for gpt2 and opt.
    In an MoE layer each token routed to an expert (top_k x capacity_factor per token) saves that
    expert's ``mlp`` bytes plus the dispatch and combine buffers (2h each); see :func:`activation_terms`.
    """
    h, a, f = m.hidden, m.heads, m.ffn
    if m.arch in (Arch.GPT2, Arch.OPT):
        masks = 2.0 * h if m.implementation == Implementation.HF else 0.0
        return LayerActivations(replicated=8.0 * h + masks, attention=8.0 * h + 4.0 * a,
                                mlp=(2.0 if m.arch == Arch.OPT else 4.0) * f)
    return LayerActivations(replicated=16.0 * h, attention=8.0 * h + 4.0 * a, mlp=8.0 * f,
                            router=4.0 * m.num_experts)


@dataclass(frozen=True)
class ModelTerms:
    """Parameter and activation quantities of one model, precomputed once per job."""
    total: float
    active: float
    replicated: float          # never tensor-parallel sharded (norms, routers)
    sharded_dense: float       # tensor-parallel sharded, not experts
    experts_total: float
    largest_module: float      # largest single module gathered by ZeRO-3 (embedding or a layer)
    layer_max: float           # parameters of the largest transformer block
    blocks_total: float        # all transformer blocks (ZO2 offloads them)
    resident_zo2: float        # embedding, head, final norm (ZO2 keeps them on the GPU)
    matmul_params: float       # parameters in matrix products per token (head included, embedding excluded)
    layers: int
    moe_layers: int
    dense_layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    top_k: int
    capacity_factor: float
    acts: LayerActivations
    # module structure (host-side overheads of the time model): counts for the whole model, experts split out
    param_tensors: float = 0.0          # parameter tensors outside the experts (each gets a DeepSpeed grad hook)
    expert_param_tensors: float = 0.0   # parameter tensors of all experts
    modules: float = 0.0                # nn.Modules ZeRO-3 hooks (pre/post forward and backward) outside experts
    expert_modules: float = 0.0         # modules inside the experts
    # forward bytes per token of all layers' element-wise kernels less those of Llama layers of the same dimensions
    # (sim/elementwise.py): on the full hidden state, on tensor-parallel shards
    elementwise_vs_llama_replicated: float = 0.0
    elementwise_vs_llama_sharded: float = 0.0
    replicated_matrices: float = 0.0   # elements of the 2-D tensors never tp-sharded (positional embedding, routers)


def module_structure(m: ModelConfig) -> dict[str, float]:
    """Parameter tensors and nn.Modules of the Hugging Face model of ``m``, experts counted apart.

    llama/mixtral layer: q, k, v, o, gate, up, down projections (7 weight matrices) and two RMSNorm
    weights = 9 tensors; modules: the decoder layer, self_attn, 4 projections, mlp, 3 projections,
    act_fn, 2 norms = 13. A Mixtral MoE layer replaces the MLP by the block (router gate + E experts of
    w1, w2, w3 and act_fn: 5 modules, 3 tensors each). gpt2 block: ln_1, c_attn, c_proj, ln_2, c_fc,
    mlp.c_proj with weights and biases = 12 tensors; 13 modules (with dropouts). opt layer: q, k, v,
    out_proj, fc1, fc2 and 2 LayerNorms with biases = 16 tensors; 11 modules. Outside the layers: token
    (+ position) embeddings, final norm, LM head unless tied; top-level, inner model, rotary/dropout modules.
    """
    pc = param_counts(m)
    E = float(m.num_experts)
    head = 0.0 if m.tie_embeddings else 1.0
    if m.arch in (Arch.GPT2, Arch.OPT):
        per_t, per_m = (12.0, 13.0) if m.arch == Arch.GPT2 else (16.0, 11.0)
        outer_t = 2.0 + 2.0 + head                  # token + position embeddings, final LN w+b
        outer_m = 7.0 + head
    else:
        per_t, per_m = 9.0, 13.0
        outer_t = 2.0 + head                        # embeddings, final norm, head
        outer_m = 5.0 + head                        # CausalLM, model, embed, rotary, norm
    dense, moe = float(pc.dense_layers), float(pc.moe_layers)
    # an MoE layer: attention + norms as a dense layer, the MLP (3 tensors, 4 modules) replaced by router + experts
    moe_t, moe_m = per_t - 3.0 + 1.0, per_m - 4.0 + 2.0
    return dict(param_tensors=outer_t + dense * per_t + moe * moe_t, expert_param_tensors=moe * E * 3.0,
                modules=outer_m + dense * per_m + moe * moe_m, expert_modules=moe * E * 5.0)


def fetched_tensors(m: ModelConfig, persistence_threshold):
    """(outside experts, inside experts): the tensors ZeRO-3 partitions and fetches, i.e. those with more
    than ``persistence_threshold`` elements (DeepSpeed's stage3_param_persistence_threshold: smaller ones stay
    gathered). A scalar or an array of thresholds (one per plan).

    The weight matrices of the layers and the embeddings are counted as above any threshold; the vectors
    are compared: llama/mixtral norms (h) and router (E h); gpt2 LayerNorm weights and biases (4 of h), the
    attention output and MLP output biases (h), the fused qkv bias (3h) and the MLP input bias (f); opt
    LayerNorms (4 of h), the q, k, v, out_proj and fc2 biases (h) and the fc1 bias (f); the final norm
    (h, with a bias for gpt2/opt)."""
    pc = param_counts(m)
    h, f = m.hidden, m.ffn
    t = np.asarray(persistence_threshold, dtype=float)
    big = lambda n: (n > t) * 1.0  # noqa: E731
    head = 0.0 if m.tie_embeddings else 1.0
    if m.arch == Arch.GPT2:
        per = 4.0 + 6.0 * big(h) + big(3 * h) + big(f)
        outer = 2.0 + 2.0 * big(h) + head
    elif m.arch == Arch.OPT:
        per = 6.0 + 9.0 * big(h) + big(f)
        outer = 2.0 + 2.0 * big(h) + head
    else:
        per = 7.0 + 2.0 * big(h)
        outer = 1.0 + big(h) + head
    moe_per = per - 3.0 + big(pc.router)
    dense = outer + pc.dense_layers * per + pc.moe_layers * moe_per
    experts = pc.moe_layers * m.num_experts * 3.0 * big(pc.expert / 3.0 if pc.expert else 0)
    return dense, experts


def model_terms(m: ModelConfig) -> ModelTerms:
    pc = param_counts(m)
    norm_per_layer = (4 * m.hidden) if m.arch in (Arch.GPT2, Arch.OPT) else 2 * m.hidden
    replicated = m.layers * norm_per_layer + pc.final_norm + pc.moe_layers * pc.router
    layer_max = max(pc.layer_dense if pc.dense_layers else 0, pc.layer_moe if pc.moe_layers else 0)
    ew = elementwise_bytes_vs_llama(m)
    blocks = pc.dense_layers * pc.layer_dense + pc.moe_layers * pc.layer_moe
    # learned positional embedding (gpt2/opt: max_positions rows, opt's 2 more) and the routers: 2-D, never tp-sharded
    positions = (m.max_positions + (2 if m.arch == Arch.OPT else 0)) * m.hidden if m.arch in (Arch.GPT2, Arch.OPT) else 0
    return ModelTerms(
        total=float(pc.total), active=float(pc.active), replicated=float(replicated),
        replicated_matrices=float(positions + pc.moe_layers * pc.router),
        sharded_dense=float(pc.total - pc.experts_total - replicated), experts_total=float(pc.experts_total),
        largest_module=float(max(layer_max, pc.embedding, pc.head)), layer_max=float(layer_max),
        blocks_total=float(blocks), resident_zo2=float(pc.embedding + pc.head + pc.final_norm),
        matmul_params=matmul_params(m),
        layers=m.layers, moe_layers=pc.moe_layers, dense_layers=pc.dense_layers, hidden=m.hidden, ffn=m.ffn,
        heads=m.heads, vocab=m.vocab, top_k=m.top_k if m.num_experts else 0,
        capacity_factor=m.capacity_factor, acts=layer_activation_bytes(m), **module_structure(m),
        elementwise_vs_llama_replicated=ew.replicated, elementwise_vs_llama_sharded=ew.sharded)


def precision_bytes(job: JobConfig) -> tuple[float, float]:
    """(bytes of a weight/gradient value, optimizer-state bytes K per parameter)."""
    mixed = job.train.precision in (Precision.BF16, Precision.FP16)
    w = 2.0 if mixed else 4.0
    master = 4.0 if mixed else 0.0
    states = {Optimizer.ADAMW: 8.0, Optimizer.SGD: 0.0, Optimizer.ZO_SGD: 0.0}[job.train.optimizer]
    return w, master + states


# --- vectorised evaluation ------------------------------------------------------------------

def rank_params(mt: ModelTerms, tp, ep, dp):
    """(P_r, P_s, P_n, P_e): parameters on a rank before/after ZeRO sharding, non-expert and expert parts."""
    pn = mt.sharded_dense / tp + mt.replicated
    pe = mt.experts_total / (tp * ep)
    pr = pn + pe
    ps = pn / dp + pe / np.maximum(dp / ep, 1)
    return pr, ps, pn, pe


def activation_terms(mt: ModelTerms, seq_len: int, a: PlanArrays, c: SimulatorConstants, *, hf: bool = False):
    """(saved activations at the end of forward, transient working set) in bytes per rank; their sum is the
    activation phase's peak.

    Without checkpointing every layer's saved tensors are alive when the loss's backward starts, and the backward
    of the last layer follows while most of them still are: saved = all layers + the head's, working = one layer's
    working set + the loss backward's. With full checkpointing the two happen one after the other: the loss's
    backward (the head's saved tensors and its gradients) ends before the last block is recomputed, so the
    phase's peak is the layer inputs + max(head + loss backward, one layer recomputed + its working set):
    saved = layer inputs + head, working = max(loss backward, one layer + its working set - head). Measured
    (built-in llama-2-7b with 8 layers, ZeRO-3 dp=2, mb 8, checkpointing; benchmarks/autotune_train.py
    --trace-loss-phase, benchmarks/results/2026-11-30-s4-h200x2/trace): allocated peaks 10.33 GiB above the
    static at the loss and 6.43 in the layers' backward; this model puts the peak at 24.93 GiB against 24.79
    measured, the sum of both phases at 28.57.

    ``a`` is the plan arrays object (fields micro_batch, tp, sp, ac, zo); ``c`` the constants; ``hf``: the model
    is transformers' class (``model.implementation: hf``), whose loss keeps fewer bytes per logit.
    """
    tokens = a.micro_batch * float(seq_len)
    tp = a.tp
    spdiv = np.where(a.sp, tp, 1)
    h = mt.hidden
    dense_full, moe_full, one_layer, layer_working = layer_bytes_per_token(mt, a, c)
    full_layers = mt.dense_layers * dense_full + mt.moe_layers * moe_full
    logits_saved = c.hf_logits_saved_bytes if hf else c.logits_saved_bytes
    head = 6.0 * h / spdiv + logits_saved * mt.vocab / tp       # final norm + logits/log-softmax
    logits_backward = c.logits_backward_bytes * mt.vocab / tp
    ac = a.checkpoints_activations
    saved = tokens * (np.where(ac, mt.layers * 2.0 * h / spdiv, full_layers) + head)
    working = tokens * np.where(ac, np.maximum(logits_backward, one_layer + layer_working - head),
                                layer_working + logits_backward)
    # zeroth order: inference, nothing saved; one layer's tensors and one chunk of the forward-only loss
    # (at most forward_only_rows tokens' logits) live at once
    zo_working = tokens * one_layer + np.minimum(tokens, c.forward_only_rows) * c.logits_forward_only_bytes * mt.vocab
    zo = a.zeroth_order
    return np.where(zo, 0.0, saved), np.where(zo, zo_working, working)


def overlap_comm_terms(a: PlanArrays, ds: DeepSpeedSettings, w: float, kept):
    """(reduction buckets allocated, side-stream pools reserved) in bytes per rank (module docstring).

    ``kept``: the stage-3 parameters kept gathered into the backward (elements, :func:`kept_parameters`; 0 at
    other stages). Buckets: w·B at stages 1-3, 2·w·B at stages 1-2 with overlap_comm. Pools, with overlap_comm:
    w·B at stages 1-2; w·B + w·kept at stage 3."""
    st = a.zero
    on = ds.overlap_comm & (st >= 1)
    B = w * ds.reduce_bucket_size
    bucket = np.where(st >= 1, B, 0.0) * (1.0 + (on & (st <= 2)))
    pools = np.where(on, B + w * kept, 0.0)
    return bucket, pools


def kept_parameters(mt: ModelTerms, a: PlanArrays, ds: DeepSpeedSettings, live):
    """Elements of the ZeRO-3 parameters still gathered at the turn from forward to backward: DeepSpeed does not
    release a parameter used again within ``stage3_max_reuse_distance`` elements of the trace, and at the turn the
    last layers of the forward are the first of the backward: min(P_r - live, reuse distance), ``live`` the elements
    already counted on the GPU as the window (with parameter offload, the window and the persistent parameters: all
    of P_r at most), 0 where nothing is gathered (:func:`gathers`). Measured (built-in llama-1b, 954M parameters,
    ZeRO-3 dp=2, reuse distance 1e9, mb 1: allocated at the end of the forward 4.93 GiB above the static, 1.78 GiB of
    it = 2 x 954M, the rest the activations; benchmarks/results/2026-11-30-s3-h200x2/trace)."""
    pr = rank_params(mt, a.tp, a.ep, a.dp)[0]
    return np.where(gathers(a), np.minimum(ds.max_reuse_distance, np.maximum(pr - live, 0.0)), 0.0)


def gathers(a: PlanArrays) -> np.ndarray:
    """Whether ZeRO-3 brings parameters to the GPU as it runs: with several data-parallel ranks (all-gathers of the
    partitions), or with the parameters offloaded even on one rank (the fetch copies each partition, there the whole
    parameter, from the host, and the release frees that copy; the window and the kept parameters are the same).
    Measured (llama-2-7b of 20 layers, ZeRO-3 with both offloads on one H200, reuse distance 1e9, mb 8 x 1,
    checkpointing: torch's allocated peak 12.28 GiB, 10.46 predicted without the kept parameters and 12.32 with them,
    2 x 1e9 bytes; benchmarks/results/2026-12-01-s10-h200x1/call1)."""
    return (a.zero == 3) & ((a.dp > 1) | np.asarray(a.offloads_params, bool))


def memory_terms(mt: ModelTerms, job: JobConfig, a: PlanArrays, c: SimulatorConstants,
                 ds: DeepSpeedSettings | None = None) -> dict[str, np.ndarray]:
    """Per-rank bytes of every category for all plans in ``a`` (see the module docstring).

    ``ds``: the plans' DeepSpeed settings (default: read from the job's DeepSpeed config builder)."""
    ds = ds if ds is not None else deepspeed_settings(job, a)
    w, K = precision_bytes(job)
    mixed = w == 2.0
    pr, ps, pn, pe = rank_params(mt, a.tp, a.ep, a.dp)
    st = a.zero
    off_o, off_p = a.offloads_optimizer, a.offloads_params
    # ZeRO-3 gathered window; with one data-parallel rank the partition is the whole parameter (no window), unless
    # the parameters are offloaded: then every one is fetched from the host as it would be gathered (gathers())
    live = np.minimum(ds.max_live_parameters, mt.largest_module / a.tp + ds.prefetch_bucket_size)
    live = np.where(gathers(a), live, 0.0)
    offloaded_window = np.maximum(live, mt.largest_module / a.tp) + mt.replicated   # offload_params: window only
    weights = np.select([st < 3, ~off_p], [w * pr, w * (ps + live)], w * offloaded_window)
    grads = np.select([st <= 1, off_o], [w * pr, 0.0], w * ps)
    opt = np.where(off_o, 0.0, K * np.where(st == 0, pr, ps))
    # ZeRO-3's parameters kept gathered into the backward: in the all-gather stream's pool with overlap_comm,
    # with the activations (the compute stream) without it
    kept = kept_parameters(mt, a, ds, np.where(off_p, offloaded_window, live))
    bucket, stream_pools = overlap_comm_terms(a, ds, w, kept)
    fp32_grads = 4.0 if mixed else 0.0
    stage0_tmp = np.maximum(2.0 * fp32_grads * pr, w * np.minimum(pr, c.stage0_allreduce_bucket))
    # stage 0 on a tensor-parallel rank > 0 (DeepSpeed's fused 16-bit optimizer, fused_optimizer.py step): a parameter
    # group holding a matrix replicated over the tp ranks (gpt2/opt's positional embedding, an MoE router) gets its
    # gradient norm masked (runtime/utils.py get_flattened_grad_norm): torch.zeros(P_g + 1) in fp32, its cumsum and a
    # bool mask, 9 P_g bytes at once, beside the flat fp32 gradients (4 P) once the 16-bit ones are freed. The decay
    # group is all but the 1-D tensors and the experts (strategies/zero.py param_groups keeps experts in groups of their
    # own, whose norm DeepSpeed takes unmasked), so P_g ~ P_n, the rank's non-expert parameters. Traced: opt-6.7b tp=2
    # mb 4 x 2, rank 1 allocated 83.88 GiB against rank 0's 74.57 (+3 P_r), with two new 4 P_r segments
    # (2026-11-30-s6-h200x2/hist/tp2_opt67_mb4); a Mixtral of 4 layers tp=2 mb 2 x 4, both ranks 66.67 GiB at the
    # step's flatten, its 0.2 G non-expert parameters' mask far below it (2026-11-30-s9-h200x2/call6)
    masked = (st == 0) & (a.tp > 1) & mixed & (mt.replicated_matrices > 0)
    stage0_tmp = np.where(masked, np.maximum(stage0_tmp, (4.0 - w) * pr + 9.0 * pn), stage0_tmp)
    # stage 3 steps its partition one sub-group at a time (stage3.py _prepare_fp32_grad_for_sub_group:
    # ``flatten(averaged_gradients).to(fp32)``, both alive, then steps and releases): (w + 4) x sub_group_size
    # elements at most, not P_s (measured: built-in llama-1b ZeRO-3 dp=2, reserved rises 6.23 GiB at the first
    # step = the moments 8 P_s + 6 P_s; 2026-11-30-s3-h200x2/trace/tr1b)
    # stages 1-2 (stage_1_and_2.py step): ``flatten(averaged_gradients)`` copies the gradient partition into one
    # 16-bit buffer, ``.to(fp32)`` makes its fp32 copy while it is alive: (w + 4) P_s at once (measured: built-in
    # llama-2-7b dp=2 ZeRO-2, max_allocated rises by 18.8 GiB = 6 P_s in the step; 2026-11-30-s2 trace_std)
    step_tmp = np.select([st == 0, off_o, st == 3], [stage0_tmp, 0.0, (w + fp32_grads) * np.minimum(ps, ds.sub_group_size)],
                         (w + fp32_grads) * ps if mixed else w * ps)
    hf = job.model.implementation == Implementation.HF
    acts, working = activation_terms(mt, job.train.seq_len, a, c, hf=hf)
    acts = acts + np.where(ds.overlap_comm, 0.0, w * kept)
    # zeroth order: weights only (MeZO: all on the GPU; ZO2: embeddings/head + a window of blocks)
    zo_weights = np.where(a.zo2, w * (mt.resident_zo2 + c.zo2_window_blocks * mt.layer_max), w * mt.total)
    is_zo = a.zeroth_order
    weights = np.where(is_zo, zo_weights, weights)
    grads = np.where(is_zo, 0.0, grads)
    opt = np.where(is_zo, 0.0, opt)
    bucket = np.where(is_zo, 0.0, bucket)
    stream_pools = np.where(is_zo, 0.0, stream_pools)
    step_tmp = np.where(is_zo, 0.0, step_tmp)
    # optimizer offload at stages 1-2: DeepSpeedZeroOptimizer.__init__ allocates temp_grad_buffer_for_gpu_offload
    # (w x the largest parameter, on the GPU, for the life of the engine), through which
    # async_accumulate_grad_in_cpu_via_gpu adds each accumulated gradient to the new one
    off12 = off_o & (st >= 1) & (st <= 2) & ~is_zo
    n_max = largest_tensor(job.model, a.tp)
    grads = grads + np.where(off12, w * n_max, 0.0)
    # stage 1 (stage_1_and_2.py step): ``free_grad_in_param_list(params_not_in_partition)`` drops the gradients of
    # the parameters outside the rank's partition before the flatten, so the step's temporaries replace w (P_r - P_s)
    freed_at_step = np.where((st == 1) & ~off_o & ~is_zo, w * (pr - ps), 0.0)
    temporary = np.maximum(working, step_tmp - freed_at_step - acts)
    # stages 0-1 without accumulation: autograd's per-tensor gradients appear as the backward frees the activations
    # (a block's gradients as its saved tensors go), so the activation phase and the full gradients peak apart:
    # max(activations + working set, gradients + the first block's backward, the step), not their sum (traced:
    # built-in llama-2-7b 8 layers ZeRO-1 + optimizer offload mb 8 x 1, checkpointing: allocated falls 0.125 GiB of
    # layer input and rises 0.38 GiB of gradients per block through the backward, and peaks in block 0's backward at
    # the gradients + its recomputed tensors + working set; 2026-11-30-s4-h200x2/trace/trz1off).
    # With accumulation the gradients of earlier micro-batches are alive through the next one's forward.
    # per-tensor gradients (stages 0-1: autograd's tensors of the parameters' shapes; with optimizer offload too, its
    # gradients go to the host from these tensors at the step; the engine's staging buffer beside them, w x the
    # largest parameter, is static)
    pertensor_grads = np.where((st <= 1) & ~is_zo, w * pr, 0.0)
    activation_phase = acts + working
    ga1 = (a.grad_accum == 1) & (pertensor_grads > 0)
    one_layer, layer_work = layer_backward_bytes(mt, job.train.seq_len, a, c)   # one block's backward: tensors, working
    lw = one_layer + layer_work
    apart = np.maximum.reduce([activation_phase, pertensor_grads + lw, pertensor_grads - freed_at_step + step_tmp])
    saving = np.where(ga1, np.maximum(pertensor_grads + acts + temporary - apart, 0.0), 0.0)
    act_cut = np.minimum(saving, acts)                   # the activations the backward freed by the peak
    acts, temporary = acts - act_cut, temporary - (saving - act_cut)
    # stage 2 without accumulation: the step frees the gradient partition (its views end with the flat copies) and the
    # backward's epilogue the reduction buckets, and the next backward allocates them again at its first reduction
    # (stage_1_and_2.py _release_ipg_buffers, copy_grads_in_partition): the forward and the loss run without them. The
    # phase peaks apart: the loss's forward (every saved tensor and the loss's 14 bytes a logit), the backward once the
    # partition and a bucket exist (the saved tensors less the loss's, one block's backward), the step (the partition
    # and its flat copies). Traced (2026-11-30-s8-h200x2/hist4): built-in opt-6.7b ZeRO-2 mb 8 x 1 peaked at 108.72
    # GiB allocated in the loss's forward with no gradient partition or bucket alive (120.6 predicted with both), and
    # llama-3-8b ZeRO-2 mb 8 x 1 with checkpointing at 91.91 likewise (99.5). Their blocks come from the step's cached
    # flat copies and the engine build's freed blocks, so they add nothing to the reserve either (reserved 128.0 and
    # 114.6 GiB, 141.4 and 123.8 predicted with them).
    z2ga1 = (st == 2) & (a.grad_accum == 1) & ~off_o & ~is_zo
    if z2ga1.any():
        transient = np.where(z2ga1, grads + bucket, 0.0)
        tokens = a.micro_batch * float(job.train.seq_len)
        loss_saved = tokens * (c.hf_logits_saved_bytes if hf else c.logits_saved_bytes) * mt.vocab / a.tp
        backward = (transient + np.maximum(acts - loss_saved, 0.0) + layer_work
                    + np.where(a.checkpoints_activations, one_layer, 0.0))
        phases = np.maximum.reduce([acts + temporary, backward, grads + step_tmp])
        temporary = np.where(z2ga1, phases - acts, temporary)
        grads, bucket = np.where(z2ga1, 0.0, grads), np.where(z2ga1, 0.0, bucket)
    allocated = weights + grads + opt + bucket + acts + temporary
    # communicators a rank joins: the world's, tp, ep (ep and expert-data-parallel), pertp, and the engine's
    # own beyond the world's (DeepSpeed: 2 at ZeRO 0-2, 1 at ZeRO-3, read off the measured NVML - reserved:
    # 2.65 and 2.37 GiB against 2.10 for a 2-rank zeroth-order run, estimate.py)
    engine_groups = np.where(is_zo, 0.0, np.where(st == 3, c.zero3_engine_groups, c.deepspeed_engine_groups))
    groups = (a.world > 1).astype(float) * (1.0 + (a.tp > 1) + (a.ep > 1) * 2 + (a.zo_pertp > 1) + engine_groups)
    on_gpu = job.cluster.accelerator == Accelerator.GPU        # CPU workers (gloo) have no CUDA context or NCCL buffers
    nccl = np.where((a.world > 1) & on_gpu,
                    c.nccl_base_gib * 2**30 + np.maximum(groups - 1, 0) * c.nccl_per_group_gib * 2**30, 0.0)
    # the hole of a loaded model: transformers' model class (model.implementation: hf) only; the built-in
    # model is created layer by layer where it runs (measured reserve above allocated on 2 x H200: 1.0-2.1
    # GiB at 7B tp=2, 4.9 GiB at 7B and 13B ZeRO-3, where the loaded-model term would add 11.8 and 22.8 GiB;
    # benchmarks/results/2026-11-29-s2-h200x2). Nor at ZeRO-3: the model is built under deepspeed.zero.Init, which
    # partitions each parameter as it is created (a checkpoint is copied in one tensor at a time), so the whole model
    # never sits on the GPU as per-parameter tensors (strategies/hf_adapter.py); the constant was fitted on ZeRO 0-2
    # rows only (the calibration half of the 2026-11-27 set holds no ZeRO-3 row)
    load_hole = np.where(is_zo | (not on_gpu) | (not hf) | (st == 3), 0.0, c.model_load_fragmentation * w * pr)
    cal = job.cluster.calibration
    # calibration.device_fixed_gib: fitted by `meshpilot calibrate`, the per-rank fixed cost as measured
    fixed = cal.device_fixed_gib if cal.device_fixed_gib is not None else (
        c.cuda_context_gib if on_gpu else c.cpu_worker_runtime_gib)
    # the engine's construction, before the first step (engine_build_terms): a peak of its own at stages 1-2
    build_alloc, build_reserved = engine_build_terms(a, pr, ps, n_max, w, on_gpu)
    # with optimizer offload the steps find the build's free blocks: the loss's logit-sized tensors, larger than every
    # construction block, go into the clone's block or segments of their own (sim/loss_blocks.py); with checkpointing
    # nothing else that large is alive then
    loss_new = loss_segments(off12 & on_gpu & (not hf) & a.checkpoints_activations, np.where(ps > n_max, w * ps, 0.0),
                             a.micro_batch * float(job.train.seq_len), mt.vocab / a.tp, 4.0 * n_max)
    build_reserved = build_reserved + loss_new
    # (blocks cached by the build belong to the compute stream's pool: the side streams' pools come on top)
    # the caching allocator keeps every block it was given; a block serves a later request only where that fits
    # inside it, so the big flat buffers of the step (the fp32 gradient partition and its 16-bit flat copy, a
    # stage-3 sub-group) cannot reuse the per-tensor blocks the forward and backward freed, nor those the loaded
    # model left: those phases' blocks stay reserved beside each other (module docstring)
    # the per-tensor gradients fit the blocks the loaded model's parameters left, block for block: they belong to the
    # per-tensor phase, not beside the hole
    static = weights + grads + opt + bucket - pertensor_grads
    # (without accumulation the gradients take the activations' place in allocated memory, but their blocks, of the
    # parameters' shapes, stay reserved beside the activation phase's: measured reserved 33.92 GiB against 31.38
    # apart and 37.5 beside, built-in llama-2-7b ZeRO-1 + optimizer offload mb 8, 2026-11-30-s4-h200x2/regimes1)
    small = np.maximum(activation_phase + pertensor_grads, load_hole)
    reserved_run = np.maximum(allocated + load_hole, static + step_tmp + small) * (1.0 + c.fragmentation)
    build_excess = np.maximum(build_reserved - reserved_run, 0.0)
    reserved = reserved_run + build_excess + stream_pools
    framework = fixed * 2**30 + (reserved_run - allocated) + build_excess
    # host memory per node: every rank of the node holds its offloaded share (pinned buffers rounded up to
    # powers of two, per-parameter accumulation buffers, ZO2 block stores: host_memory_terms); ZO2 ranks of
    # one node upload in slices, each keeping 1/n of every block's store
    host = host_memory_terms(mt.total, job, a, ds, ps, pr, n_max, w, K)
    # the ZeRO-3 defragmentation copy is freed before the process allocates the rest of its steady host memory
    # (c.cpu_after_build_gib): the process's peak is the larger of the two moments, both on its process baseline
    # (page-locked buffers cost the node more than their pages: c.pinned_node_overhead)
    offloaded = host["offload"] + c.pinned_node_overhead * host["pinned"]
    per_rank_cpu = np.maximum(offloaded, host["defrag"] - c.cpu_after_build_gib * 2**30)
    # zeroth-order ranks build the whole model on the host (in the train precision, block by block from
    # fp32 draws) before MeZO moves it to the GPU or ZO2 copies its blocks into the stores
    zo_build = host["build"]
    ranks_per_node = np.minimum(a.world, job.cluster.gpus_per_node)
    process = cal.host_process_gib if cal.host_process_gib is not None else c.cpu_process_gib
    peak = allocated + nccl + framework + stream_pools
    # at the card: PyTorch's caching allocator, when a cudaMalloc fails, returns every cached segment with no live
    # block in it to the driver and retries (CUDACachingAllocator malloc: release_cached_blocks), before it raises an
    # out-of-memory error. The reserve this model counts beside the live tensors (the phases' blocks side by side)
    # therefore never takes the card: where it would, the peak is the card and the plan runs there if the blocks the
    # retry needs are free of live tensors by then, or runs out of memory (measured: two ZeRO-0 plans modelled at
    # 146.2 and 146.9 GiB, live tensors 118.9 and 120.0, ran at 134.7 and 138.2 GiB on a 140.4 GiB H200, regime runs
    # 2026-11-30-s6 regimes8:tp2_7b_mb8 and 2026-12-01-s10 call1:z0_opt27b_one_mb16; ZeRO-3 plans with overlap_comm
    # whose side-stream reserve grew past the model ran at 140.3, 2026-11-30-s9). Tested on seven new plans at the
    # card, live tensors 112.5-139.3 GiB: six ran at 130.2-138.7, the seventh failed at its second step on the step's
    # 16 GiB flat copy (2026-12-01-s11-h200x1/call1). Where the live tensors alone pass the card nothing can be
    # released: the model's peak stands
    live_floor = np.maximum(allocated, build_alloc) + nccl + fixed * 2**30 + stream_pools
    card = job.cluster.gpu.memory_gib * 2**30 if on_gpu else np.inf
    at_card = (peak > card) & (live_floor <= card)
    cut = np.where(at_card, peak - card, 0.0)
    modelled_peak = peak
    peak, framework, reserved = peak - cut, framework - cut, reserved - cut
    # CPU workers (gloo) hold their "device" memory in the host's: the node holds each worker's modelled peak
    # (its runtime included) and what it moved off that "device" (offload buffers, ZO2 stores), not a GPU process's
    # baseline beside them; a zeroth-order model built on the host is the device copy itself
    cpu_node = (ranks_per_node * (per_rank_cpu + zo_build + process * 2**30) if on_gpu
                else ranks_per_node * (peak + host["offload"]))
    largest = largest_request(mt, job, a, ds, pn, pe, ps, pr)
    return dict(weights=weights, gradients=grads, optimizer_states=opt, activations=acts, temporary=temporary,
                communication_buffers=bucket + nccl + stream_pools, framework_overhead=framework,
                largest_request=largest,
                # the live tensors alone (no reserve above them): the least the card must hold
                live_floor=live_floor,
                # over the card as modelled, its live tensors within it: the peak is the card (at_card above)
                at_card=at_card.astype(float), modelled_peak=modelled_peak,
                cpu_offload=ranks_per_node * host["offload"], cpu_node=cpu_node,
                peak=peak,
                # torch's max_memory_allocated and max_memory_reserved as modelled (run summaries compare them)
                allocated=np.maximum(allocated, build_alloc), reserved=reserved)


def largest_request(mt: ModelTerms, job: JobConfig, a: PlanArrays, ds: DeepSpeedSettings, pn, pe, ps, pr):
    """Bytes of the largest single allocation a step makes that may find no block of its own, per rank: the loss's
    fp32 tensors over the micro-batch's logits (4 b s V/t), or the optimizer step's fp32 flat gradient copy of its
    largest parameter group (ZeRO 1-2: the dense partition P_n/dp or the expert one P_e/(dp/ep), DeepSpeed keeping
    them in separate groups; ZeRO 0: the concatenation of all, 4 P_r; ZeRO-3: one sub-group, 4 min(P_s,
    sub_group_size); none on the GPU with optimizer offload). From the second step on such a request is served by a
    cached block of its size or by new memory: where the step before left the cache in pieces, it needs room beside
    the predicted peak (three plans predicted within 10 GiB of the card ran a first step and failed at the second on
    21.0 and 8.3 GiB requests, 2026-11-30-s4/s5 regime runs; a fourth, marked by this rule, on the 21.0 GiB request,
    2026-11-30-s6), so the simulator shows a plan as risky where this request is larger than the card's room above
    its peak.

    At ZeRO 0-2 the flat copy counts only where the model has experts. With one large parameter group (a dense
    model's: the no-decay group's norms and biases are a small fraction), the copy comes back each step to a block of
    its exact size cached by the end of the first step: in five of six traced plans the one DeepSpeed's
    optimizer-state initialisation left in the build (``stage_1_and_2.py:3118 <- :937``, ``fused_optimizer.py:286 <-
    :127``), in the sixth its own from the first step (allocator histories of three ZeRO 1-2 and three ZeRO-0 plans,
    2026-11-30-s6-h200x2/allocator_history.txt; the four dense plans this rule had marked for that copy ran). With
    experts DeepSpeed keeps a group of their
    own, and one group's requests can take the blocks left for another's: the three plans that failed on the copy
    were ep=2 Mixtrals."""
    st, off_o, is_zo = a.zero, a.offloads_optimizer, a.zeroth_order
    tokens = a.micro_batch * float(job.train.seq_len)
    logits = np.where(is_zo, 0.0, 4.0 * tokens * mt.vocab / a.tp)
    groups = np.maximum(pn / a.dp, pe / np.maximum(a.dp / a.ep, 1))
    flat = np.select([st == 0, st < 3], [4.0 * pr, 4.0 * groups], 4.0 * np.minimum(ps, ds.sub_group_size))
    flat = np.where(off_o | is_zo | ((st < 3) & (mt.experts_total == 0)), 0.0, flat)
    return np.maximum(logits, flat)


def largest_tensor(m: ModelConfig, tp) -> np.ndarray:
    """Elements of the largest parameter tensor on a rank (tensor-parallel shards divided by ``tp``)."""
    n, _, s, _ = parameter_tensors(m)
    return np.maximum(np.max(n[s]) / np.asarray(tp, dtype=float), np.max(n[~s], initial=0.0))


def engine_build_terms(a: PlanArrays, pr, ps, n_max, w: float, on_gpu: bool):
    """(allocated, reserved) bytes per rank while DeepSpeed builds a ZeRO 1-2 engine on a GPU; 0 elsewhere.
    ``n_max``: elements of the largest parameter tensor on a rank (:func:`largest_tensor`).

    DeepSpeedZeroOptimizer.__init__ (runtime/zero/stage_1_and_2.py, DeepSpeed 0.19.8), per parameter
    group: ``flatten_dense_tensors_aligned`` copies the group's parameters into one new flat buffer while
    the parameters still hold their own tensors, then ``_update_model_bit16_weights`` points them into
    the flat buffer and frees the originals: allocated 2 w P_r at the largest group. Then
    ``parallel_partitioned_bit16_groups[i][partition_id].detach().clone()`` copies the rank's partition on
    the GPU (w P_s) before ``.to(device, fp32)`` makes the fp32 master: on the host with optimizer
    offload (the clone is freed), on the GPU otherwise (4 P_s more, kept; with w = 4 ``.to`` returns the
    clone itself). A request larger than every block freed before it (the parameters' blocks;
    ``empty_cache`` ran before the flatten) gets a segment of its own, which the caching allocator keeps:
    reserved 2 w P_r + w P_s (+ 4 P_s without offload), the clone's w P_s only where P_s exceeds the
    largest parameter (else it fits in that parameter's freed block). The
    built-in model, drawn in fp32 and cast per parameter by the engine (4 P_r at most for bf16, the same
    as 2 w P_r), packs its 16-bit tensors into the freed fp32 blocks, which ``empty_cache`` returns.
    Measured (built-in llama-2-7b, ZeRO-2 + optimizer offload, 2 x H200 dp=2 and 4 x H200 dp=4):
    allocated peak 25.10 GiB both (2 w P_r = 25.10), reserved 31.97 and 28.83 GiB against 31.38 and
    28.24 from this (0.59 GiB of the cast's packing left unmodelled)."""
    mixed = w == 2.0
    st = a.zero
    build = (st >= 1) & (st <= 2) & ~a.zeroth_order & on_gpu
    master = np.where(a.offloads_optimizer | (not mixed), 0.0, 4.0 * ps)
    alloc = np.where(build, np.maximum(2.0 * w * pr, w * pr + w * ps + master), 0.0)
    clone = np.where(ps > n_max, w * ps, 0.0)
    reserved = np.where(build, 2.0 * w * pr + clone + master, 0.0)
    return alloc, reserved
