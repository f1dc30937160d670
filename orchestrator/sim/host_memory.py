"""Host memory per rank: what the worker allocates on the host beyond its process, for offload and zeroth order.

:func:`host_memory_terms` lists, per plan, the buffers DeepSpeed 0.19 and meshpilot's ZO2 keep in host memory (the
offloaded optimizer states and gradients, the pinned staging and accumulation buffers, ZeRO-3's parameter-offload
partitions, ZO2's block stores) and the page-locked part of them; pinned blocks are rounded up to powers of two as
torch's host allocator does (:func:`pow2_ceil`), per parameter tensor where DeepSpeed pins per tensor
(:func:`pinned_tensor_bytes` over :func:`parameter_tensors`). :func:`meshpilot.orchestrator.sim.memory.memory_terms`
adds the process baselines and compares the node's total with what Ray's memory monitor allows.
"""
from __future__ import annotations

import numpy as np

from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.config.schema import Accelerator, Arch, JobConfig, ModelConfig
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.sim.deepspeed_settings import DeepSpeedSettings


def pow2_ceil(nbytes):
    """Bytes of a pinned host block for a request of ``nbytes``: torch's CachingHostAllocator
    (``Tensor.pin_memory()``, ``torch.empty(..., pin_memory=True)``) rounds every request up to the
    next power of two (ATen/core/CachingHostAllocator.h allocate(): ``PowerOf2Ceil(size)``, unless
    ``pinned_max_round_threshold`` is set), and cudaHostAlloc makes the whole block resident. 0 stays 0."""
    x = np.asarray(nbytes, dtype=float)
    return np.where(x > 0, np.exp2(np.ceil(np.log2(np.maximum(x, 1.0)))), 0.0)


def parameter_tensors(m: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(elements, count, tensor-parallel sharded, expert) of each kind of parameter tensor of the
    built-in model (strategies/layers.py, model.py): llama/mixtral q, k, v, o, gate, up, down and two
    norms per layer (an MoE layer: a router and 3 tensors per expert instead of the MLP); gpt2/opt q,
    k, v, o, fc1, fc2 with biases and two LayerNorms; embeddings, final norm and an untied head."""
    pc = param_counts(m)
    h, a, f = m.hidden, m.heads, m.ffn
    kv = m.kv_heads or a
    d = h // a
    dense, moe = pc.dense_layers, pc.moe_layers
    rows: list[tuple[float, float, bool, bool]] = []            # numel, count, sharded, expert
    if m.arch in (Arch.GPT2, Arch.OPT):
        L = m.layers
        rows += [(h * h, 4 * L, True, False), (h, 3 * L, True, False), (h, 5 * L, False, False),
                 (h * f, 2 * L, True, False), (f, L, True, False),
                 ((m.max_positions + (2 if m.arch == Arch.OPT else 0)) * h, 1, False, False), (h, 2, False, False)]
    else:
        L = m.layers
        rows += [(h * a * d, 2 * L, True, False), (h * kv * d, 2 * L, True, False), (h, 2 * L, False, False),
                 (h * f, 3 * dense, True, False), (h, 1, False, False)]
        if m.qkv_bias:
            rows += [(a * d, L, True, False), (kv * d, 2 * L, True, False)]
        if moe:
            rows += [(h * m.num_experts, moe, False, False), (h * f, 3 * moe * m.num_experts, True, True)]
    rows += [(m.vocab * h, 1 if m.tie_embeddings else 2, True, False)]
    n, c, s, e = (np.array(col) for col in zip(*rows))
    keep = c > 0
    return n[keep].astype(float), c[keep].astype(float), s[keep].astype(bool), e[keep].astype(bool)


def pinned_tensor_bytes(m: ModelConfig, w: float, tp, ep, split, *, pinned: bool = True) -> np.ndarray:
    """Sum over a rank's parameter tensors of the pinned block of each, ``w`` bytes per element, each
    tensor split ``split`` ways (1: whole tensors; dp: ZeRO-3 partitions); a rank holds 1/tp of the
    sharded tensors and 1/ep of the experts. Per plan (arrays ``tp``, ``ep``, ``split``); exact sums
    (no power-of-two rounding) when ``pinned`` is False. Computed once per distinct (tp, ep, split)."""
    n, c, s, e = parameter_tensors(m)
    tp, ep, split = (np.asarray(x, dtype=np.int64) for x in np.broadcast_arrays(tp, ep, split))
    key = (tp.ravel() << 42) | (ep.ravel() << 21) | split.ravel()          # each below 2^21
    combos, inverse = np.unique(key, return_inverse=True)
    out = np.empty(len(combos))
    for j, k in enumerate(combos):
        t, x, d = float(k >> 42), float((k >> 21) & (2**21 - 1)), float(k & (2**21 - 1))
        per_rank = np.ceil(n / np.where(s, t, 1.0) / d)
        count = c / np.where(e, x, 1.0)
        out[j] = float(np.sum(count * (pow2_ceil(w * per_rank) if pinned else w * per_rank)))
    return out[np.ravel(inverse)].reshape(tp.shape)


def host_memory_terms(total: float, job: JobConfig, a: PlanArrays, ds: DeepSpeedSettings, ps, pr, n_max,
                      w: float, K: float) -> dict[str, np.ndarray]:
    """Host bytes per rank that the worker allocates beyond its process (``offload``: what stays for
    the run; ``build``: the zeroth-order model built on the host; ``pinned``: the page-locked part of
    ``offload``). Pinned blocks are rounded up to a power of two (:func:`pow2_ceil`; host_copy_probe.py
    measured 1.12 and 1.86 GiB blocks at 2.0 GiB, 2.05 at 4.0) on GPU clusters; a CPU cluster pins
    nothing. ``total``: the model's parameters (a zeroth-order rank builds all of them on the host); ``n_max``:
    elements of the largest parameter tensor on a rank (:func:`.memory.largest_tensor`).

    Optimizer offload, ZeRO 1/2 (DeepSpeed 0.19 stage_1_and_2.py, pin_memory on, mixed precision):
    the fp32 master partition ``pin(4 P_s)``, its 16-bit copy-back buffer ``pin(w P_s)``
    (param_buffer_of_bit16_for_cpu_offload_groups), the fp32 gradient partition ``pin(4 P_s)``, the
    Adam moments (K - 4) P_s (DeepSpeedCPUAdam's zeros_like, pageable), the staging buffer of the
    largest parameter ``pin(w n_max)`` (temp_grad_buffer_for_cpu_offload), and at ZeRO-2 with gradient
    accumulation (grad_accum > 1) one pinned 16-bit buffer per whole parameter of the partition
    (accumulated_grads_in_cpu: ``sum_t pin(w n_t) x P_s / P_r``). ZeRO-1 reduces once, at the accumulation
    boundary, with the gradients summed on the GPU by autograd, so ``copy_grads_in_partition`` meets a first
    micro-step there and never accumulates on the host (measured: 10 of llama-2-13b's layers, ZeRO-1 + optimizer
    offload 4 x 2 on one H200, 68.1 GiB of host memory, 80.6 predicted with the buffers and 69.3 without them;
    benchmarks/results/2026-12-01-s10-h200x1/call2).
    ZeRO-3 (stage3.py): the fp32 master partition 4 P_s and moments (K - 4) P_s (pageable), one
    pinned fp32 gradient per optimizer sub-group (``sum_g pin(4 n_g)``, n_g = sub_group_size and the
    rest), the 16-bit gradient partition ``pin(w P_s)`` (grad_partitions_flat_buffer) and, with the
    parameters on the GPU, the step's host temporary of one sub-group in the model's dtype, w min(P_s,
    sub_group_size): each sub-group ends with ``gpu_16bit.copy_(cpu_fp32)``, which torch converts on the host
    before the transfer (benchmarks/host_copy_probe.py: +0.931 GiB of RssAnon for 5e8 elements to bf16, none to
    fp32). DeepSpeedCPUAdam creates its moments in the first step, sub-group by sub-group, so that step holds
    the last sub-group's temporary and every later step the largest one's: llama-2-7b on 2 ranks rose 1.20 GiB
    per rank from the first step to the second at sub-groups of 1e9 and 0.32 at 5e8, as predicted before the
    runs (2026-11-30-s8-h200x2/host4). The 4 min(P_s, sub_group_size) fp32 buffer DeepSpeed allocates while
    the engine is built is freed before any moment exists and is not part of the peak. Parameter offload: the
    16-bit partition ``pin(w P_s)`` (the flat CPU buffer), plus the per-parameter partitions zero.Init pinned when
    the model was built (``sum_t pin(w n_t / dp)``), which torch's host allocator keeps cached after DeepSpeed copies
    them into the flat buffer. With optimizer offload the step's copy converts into that buffer on the host without
    a temporary; with the optimizer on the GPU the sub-group's updated fp32 partition comes down by a blocking
    ``cpu_16bit.copy_(gpu_fp32)``, which torch copies into a pageable fp32 host tensor and converts from there:
    4 min(P_s, sub_group_size) more while it runs.
    ZO2 (strategies/zo/zo2.py): one pinned store per block (``pin(w n_block / slices)``) and a pinned
    stash of every resident parameter (``sum_t pin(w n_t)``: embeddings, head, final norm); every
    zeroth-order rank first builds the whole model on the host (w P), still alive while ZO2 fills its
    stores (``build``). ZeRO-3 without parameter offload moves the 16-bit partitions into one flat GPU buffer
    through a pageable host copy of them while the engine is built (zero/utils.py ``defragment``: ``w P_s``,
    ``defrag``), freed before the optimizer allocates: the rank's host peak is the larger of the two. The copy is
    freed before the process holds all of its steady host memory, so the caller counts ``defrag`` less
    ``SimulatorConstants.cpu_after_build_gib`` on the process baseline (the constants say where both were measured).
    The run's closing parameter checksum sums one tensor (ZO2: one block slot) at a time and adds nothing here; it used to clone the model (ZO2Trainer.full_state: every block's
    flat copy and a clone of every parameter), which set the measured host peak of opt-13b ZO2 on one
    H200 (RssAnon + RssShmem 89.0 GiB against 40.5 of stores and stash, 2026-11-30).
    fp32 training (w = 4) keeps the same buffers with K - 0 states.
    """
    m = job.model
    pinned = job.cluster.accelerator == Accelerator.GPU
    pin = pow2_ceil if pinned else (lambda x: np.asarray(x, dtype=float))
    mixed = w == 2.0
    states = K - (4.0 if mixed else 0.0)                     # moments (and momentum) beyond the fp32 master
    st, off_o, off_p, is_zo = a.zero, a.offloads_optimizer & ~a.zeroth_order, a.offloads_params & ~a.zeroth_order, \
        a.zeroth_order
    need = off_o & (st == 2) & (a.grad_accum > 1)                                # only where it is used
    accum = np.zeros(a.n)
    if need.any():
        accum[need] = pinned_tensor_bytes(m, w, a.tp[need], a.ep[need], 1, pinned=pinned) * (ps / pr)[need]
    # each offload's page-locked buffers and its pageable ones (the moments, ZeRO-3's fp32 master and step copy)
    stage12_locked = pin(4.0 * ps) + pin(w * ps) + pin(4.0 * ps) + pin(w * n_max) + accum
    stage12_pageable = states * ps
    sg = np.maximum(np.asarray(ds.sub_group_size, dtype=float), 1.0)
    full = np.floor(ps / sg)
    sub_grads = full * pin(4.0 * sg) + pin(4.0 * (ps - full * sg))
    step_copy = np.where(off_p, 0.0, w * np.minimum(ps, sg))       # the fp32 -> 16-bit conversion on the host
    stage3_locked = sub_grads + pin(w * ps)
    stage3_pageable = (4.0 + states) * ps + step_copy
    init_parts = np.zeros(a.n)                                # zero.Init's pinned per-parameter partitions
    if off_p.any():
        init_parts[off_p] = pinned_tensor_bytes(m, w, a.tp[off_p], a.ep[off_p], a.dp[off_p], pinned=pinned)
    param_off = pin(w * ps) + init_parts + np.where(off_o, 0.0, 4.0 * np.minimum(ps, sg))
    pc = param_counts(m)
    slices = np.maximum(a.zo2_slices, 1)
    stores = (pc.dense_layers * pin(w * np.ceil(pc.layer_dense / slices))
              + pc.moe_layers * pin(w * np.ceil(pc.layer_moe / slices)))
    resident = [pc.embedding - (m.max_positions + (2 if m.arch == Arch.OPT else 0)) * m.hidden
                if m.arch in (Arch.GPT2, Arch.OPT) else pc.embedding, pc.head, pc.final_norm]
    if m.arch in (Arch.GPT2, Arch.OPT):
        resident.append((m.max_positions + (2 if m.arch == Arch.OPT else 0)) * m.hidden)
    stash = float(sum(np.sum(pin(w * x)) for x in resident if x > 0))
    locked = (np.where(off_o, np.where(st == 3, stage3_locked, stage12_locked), 0.0) + np.where(off_p, param_off, 0.0)
              + np.where(a.zo2, stores + stash, 0.0))
    offload = locked + np.where(off_o, np.where(st == 3, stage3_pageable, stage12_pageable), 0.0)
    build = np.where(is_zo, w * total, 0.0)
    # ZeRO-3 keeping its partitions on the GPU defragments them through the host while the engine is built
    # (zero/utils.py defragment: a pageable w P_s copy, freed before the optimizer's buffers exist)
    defrag = np.where((st == 3) & ~off_p & ~is_zo, w * ps, 0.0)
    # the page-locked part of ``offload`` (the kernel and the driver keep bookkeeping of their own for it); a CPU
    # cluster pins nothing
    return dict(offload=offload, build=build, defrag=defrag, pinned=locked if pinned else np.zeros(a.n))
