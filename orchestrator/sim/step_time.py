"""Step time per plan: compute, communication on and off the critical path, offload and optimizer.

Per micro-batch of b sequences of s tokens on a rank with tensor-parallel degree t:
- forward FLOPs = b s (2 P_mm + 4 L s h) / t, where P_mm are the parameters used in matrix
  products per token (active experts only, LM head included, embedding lookup excluded) and
  4 L s h the attention score and value products; backward = 2 x forward; full recomputation
  adds one forward. GPU time = FLOPs / achieved rate, plus the memory-bound fp32 loss over the
  b s V/t logits (``loss_bytes_per_logit``, half in forward, half in backward), plus (negative for opt and
  gpt2) the memory-bound element-wise bytes by which the model's layers differ from the Llama layers the
  rate was fitted on (:mod:`meshpilot.orchestrator.sim.elementwise`). The achieved rate is
  ``calibration.matmul_tflops`` or datasheet x ``matmul_efficiency``, scaled by a shape factor
  x/(x + x_half) for the per-shard hidden size and the tokens per micro-batch (normalised at
  hidden 4096 and 4096 tokens, where the efficiency constants are defined; above them the factor
  exceeds 1, bounded by the datasheet rate). A plan whose shape class
  (:func:`meshpilot.orchestrator.config.schema.shape_class`: per-shard hidden size and tokens per
  micro-batch, each rounded down to a power of two) is in ``calibration.matmul_tflops_by_shape`` computes
  at that class's rate instead, without shape factor (fp32 plans excepted: datasheet x efficiency).
- host (CPU) time: eager PyTorch launches kernels asynchronously, so a micro-batch takes
  max(GPU time, host time), where host time = L x ``layer_overhead_s`` x (1 + recompute +
  ``backward_host_factor``) + parameter tensors x ``grad_hook_s`` (DeepSpeed's per-tensor gradient
  hook). Small models are host bound (0.4B Llama: ~0.1 s of host time against ~0.04 s of GPU work).
  The host-bound excess stretches forward/backward/recompute in the breakdown.
- ZeRO-3 (DeepSpeed's partitioned_param_coordinator / parameter_offload): per pass (forward,
  backward, recompute) every partitioned tensor (more elements than the config's persistence
  threshold, :func:`meshpilot.orchestrator.sim.memory.fetched_tensors`) is fetched
  and released (``zero3_fetch_s``) and every nn.Module runs its hooks (``zero3_module_hook_s``).
  That host time and the pass's all-gathers make a floor F; the host waits in each module's
  pre-forward hook for the gather it prefetched before it launches the module's kernels, so a pass
  with less compute C than F leaves the GPU idle between modules and one with more hides F under
  its compute: a pass takes max(C, F) + (1 - ``zero3_pass_overlap``) min(C, F)
  (:func:`zero3_pass_excess`, the excess over C reported under zero3_gathers); the stage-3 step adds
  ``zero3_step_tensor_s`` per partitioned tensor. Tensor and module counts come from the Hugging
  Face module structure (:func:`meshpilot.orchestrator.sim.memory.module_structure`). Measured
  (built-in llama, 2 x H200, benchmarks/results/2026-11-30-s3-h200x2): the forward of one
  micro-batch of 2,048 tokens takes 0.075 s with 58 fetched tensors (1.9B), 0.127 s with 114
  (1.1B), 0.27-0.34 s with 226 (2.1B and 6.7B): the floor follows the tensors more than the bytes,
  while 8 x 2,048 tokens run at their compute. ``zero3_fetch_s`` (1.2 ms) and the overlap (1.0) were
  fitted on the 1.1-2.1B runs; on 6.7B and 13B runs the step-time MAPE is 3.5% (13 runs; it was
  17-27% with the fetch time added to the compute: benchmarks/zero3_time_fit.py). The floor is the host
  CPU's: the same 7B plan's host-bound passes ran 1.46x faster on another H200 host, so
  ``calibration.zero3_fetch_ms`` (fitted by ``meshpilot calibrate`` from a cluster's ZeRO-3 runs) replaces
  the constant where set.
- tensor parallel (Megatron): 2 all-reduces of b s h values in forward and 2 in backward per
  layer (+2 with recomputation), inside the tp group, on the critical path (sequence parallelism
  replaces each by a reduce-scatter + all-gather of the same volume).
- data parallel: stages 0 and 1 all-reduce (reduce-scatter + all-gather) the w P_r gradient bytes
  once per step; stage 2 reduce-scatters them every micro-batch and all-gathers the updated
  16-bit parameters once per step; stage 3 all-gathers parameters in forward and backward (and
  again for recomputation) and reduce-scatters gradients every micro-batch. Expert parameters
  go over the expert-data-parallel group. Only the part not hidden is counted, by which stream
  each collective runs on in DeepSpeed 0.19 (the plan's ``comm_overlap``, read from the config):
  * reductions with overlap_comm off run on the compute stream (stage 3's
    ``reduce_and_partition_stream`` *is* the default stream then, and the reduce-scatter is a
    synchronous collective): in stream order with the backward, so they hide only in the time the
    GPU would sit idle waiting for the host in that backward (the host-bound stretch of the
    backward, and at stage 3 the backward's share of the fetch/release host time). Stage 1 (and
    stage 0, the engine's all-reduce) reduces after the last backward: exposed;
  * with overlap_comm on they run on a side stream beside the backward of every micro-batch
    (stage 1: of the last one): hidden by that idle time plus ``overlap_comm_fraction`` of the
    backward's GPU time;
  * stage-3 all-gathers are asynchronous NCCL collectives (``_dist_allgather_fn``, async_op=True)
    on the process group's own stream whatever overlap_comm says (it changes only the stream they
    are launched from), so the setting does not change them. They are part of each pass's fetch
    floor (the ZeRO-3 item above): the coordinator (``partitioned_param_coordinator.fetch_sub_module``)
    waits for each module's gather before the module runs and issues the prefetch of the following
    ones from the same host hook. Measured: llama-2-13b ZeRO-3 on 2 x H200, overlap_comm on and off
    0.7% apart (benchmarks/results/2026-11-30-h200x2/README.md).
  So on a host-bound ZeRO-3 step the reduce-scatters fill idle GPU time with overlap_comm off too,
  and overlap_comm buys little (llama-2-13b, 2 x H200, measured 0.7% faster).
  Stages 1-2 without optimizer offload also move the gradients through memory on their way to the
  reduction (stage_1_and_2.py, contiguous_gradients: into the reduce bucket, then the rank's share
  into the partition buffer), 2 w (P_r + P_s) bytes at the memory-bound rate, every micro-batch at
  stage 2 and once a step at stage 1, counted exposed whatever the stream. No constant is fitted. It
  was added after llama-3-8b's `plan: auto` (ZeRO-2, 1 x 8, overlap_comm; 1.997 s predicted) ran at
  2.137 s against 1.881 for ZeRO-1 at the same micro-batch (2.023 predicted;
  benchmarks/results/2026-11-30-s6-h200x2/choice8b), so those runs no longer test the choice.
- expert parallel: 2 all-to-alls forward and 2 backward (+2 recompute) per MoE layer of
  b s k c h values (k = top_k, c = capacity factor) in the ep group.
- offload: ZeRO-Offload moves the gradient partition to the host and the updated 16-bit parameters
  back over PCIe. At stages 1-2 (DeepSpeed 0.19 ``copy_grads_in_partition``) the partition goes down
  in fp32 at the boundary (4 P_s) and, with accumulation, in 16 bits every micro-batch, coming back
  to be added to the next (stage 2: down ga w P_s, up (ga - 1) w P_s; stage 1 accumulates on the GPU
  and makes that round trip once); stage 3 moves w P_s down per micro-batch, after the first bringing the host's
  sum up to be added on the GPU (up (ga - 1) w P_s), w P_s up and 4 P_s down at the boundary, and puts the
  parameters back through a blocking copy cast on the host (``host_cast_copy_gparams_per_s``; with parameter offload
  and the optimizer on the GPU the copy goes the other way, GPU fp32 to host 16-bit through a pageable fp32 host
  tensor, ``host_cast_copy_d2h_gparams_per_s``). Measured (llama-2-7b
  ZeRO-2 + optimizer offload, 2 x 4 micro-batches, 2 x H200): the backward took 2.5 s beyond its
  compute (benchmarks/results/2026-11-30-h200x2/host2). Parameter offload uploads w P_s per forward and
  backward pass; CPUAdam updates P_s parameters at min(threads x r_thread, R_node / ranks on the
  node): compute-bound on the rank's threads (``cluster.cpu_threads_per_rank``, by default what
  the Ray gang gives it: ``clusters.threads_per_rank``) until the node's ranks share its memory
  bandwidth (4 x H200 host, 8 threads per
  rank: 2 ranks ran 1.1 G params/s each, 4 ranks 0.8 each). Beside CPUAdam the offloaded step makes two
  memory-bound host passes over the partition on the same threads, the in-place scaling of the fp32 gradients
  (unscale/clip, 8 bytes a parameter) and the cast of the updated parameters into a 16-bit host tensor (6 bytes;
  stages 1-2, and stage 3 with parameter offload): :func:`host_step_passes`, at rates `meshpilot probe` times
  beside CPUAdam. The constants' CPUAdam rate, measured over whole offloaded steps, holds them.
  ``calibration.cpu_adam_rank_gparams_per_s`` (fitted by ``meshpilot calibrate`` from offload runs, the
  passes included) replaces this rate when set.
- optimizer step: memory bound, (``optimizer_bytes_per_param`` + ``grad_clip_bytes_per_param`` when
  clipping) x owned parameters / (HBM x efficiency), plus ``step_overhead_s`` and
  ``step_tensor_s`` per parameter tensor (DeepSpeed's per-tensor loops: norm, clip, copy-back).
- zeroth order (MeZO/ZO2): two forwards per micro-batch (one each with pertp = 2), no backward;
  ``zo_perturb_passes`` memory-bound passes over the parameters per step; ZO2 uploads the blocks
  once per micro-batch (both forwards share the upload) and writes them back once per step, mostly
  hidden behind compute; ranks exchange a few scalars (one latency-bound all-reduce).
"""
from __future__ import annotations

import numpy as np

from meshpilot.comm.cost_model import LinkRates, collective_time

from meshpilot.orchestrator.config.clusters import threads_per_rank
from meshpilot.orchestrator.config.schema import ClusterConfig, JobConfig, Precision, parse_shape_class
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.sim.deepspeed_settings import DeepSpeedSettings, deepspeed_settings
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.flops import forward_flops
from meshpilot.orchestrator.sim.memory import ModelTerms, fetched_tensors, precision_bytes, rank_params


def achieved_rate(job: JobConfig, hidden_shard, tokens, c: SimulatorConstants):
    """Achieved matrix FLOP/s per GPU for the given per-shard hidden size and tokens per micro-batch: the
    rate of their shape class in ``calibration.matmul_tflops_by_shape`` where listed, else
    (``matmul_tflops`` or datasheet x efficiency) x shape factor."""
    rate = _shape_factor_rate(job, hidden_shard, tokens, c)
    by_shape = job.cluster.calibration.matmul_tflops_by_shape
    if not by_shape or job.train.precision == Precision.FP32:
        return rate
    # the class bounds 2^floor(log2 x), exactly: x = m 2^e with 0.5 <= m < 1
    h_lo = np.ldexp(1.0, np.frexp(np.asarray(hidden_shard, dtype=float))[1] - 1)
    t_lo = np.ldexp(1.0, np.frexp(np.asarray(tokens, dtype=float))[1] - 1)
    for key, tflops in by_shape.items():
        h, t = parse_shape_class(key)
        rate = np.where((h_lo == h) & (t_lo == t), float(tflops) * 1e12, rate)
    return rate


def _shape_factor_rate(job: JobConfig, hidden_shard, tokens, c: SimulatorConstants):
    """(``matmul_tflops`` or datasheet x efficiency) x the shape factor (module docstring)."""
    cl = job.cluster
    cal = cl.calibration.matmul_tflops
    if job.train.precision == Precision.FP32:
        datasheet = cl.gpu.fp32_tflops
    else:
        datasheet = cl.gpu.bf16_tflops if job.train.precision == Precision.BF16 else cl.gpu.fp16_tflops
    if cal and job.train.precision != Precision.FP32:
        peak = cal * 1e12
    else:
        peak = datasheet * 1e12 * c.matmul_efficiency
    xh, xt = c.shape_half_hidden, c.shape_half_tokens
    shape = (hidden_shard / (hidden_shard + xh)) / (4096.0 / (4096.0 + xh))
    shape = shape * (tokens / (tokens + xt)) / (4096.0 / (4096.0 + xt))
    # each factor saturates (x / (x + x_half) -> 1), so above the normalisation shape the rate keeps rising
    # towards peak / (4096/(4096+x_half))^2; only the datasheet bounds it (a cap of the factor at 1 had kept
    # hidden 4096 at 4096 tokens' rate for every larger micro-batch while hidden 2048 got the token gain)
    return np.minimum(peak * shape, datasheet * 1e12)


def cpu_adam_rate(cl: ClusterConfig, c: SimulatorConstants, ranks_per_node):
    """DeepSpeed's CPU Adam on each offloading rank, parameters per second, before any fitted calibration:
    compute-bound on the rank's OpenMP threads (``threads_per_rank``: what `meshpilot run` gives it, or
    ``cluster.cpu_threads_per_rank``), unless the node's ranks together hit the host's memory bandwidth
    (~30 bytes per parameter: fp32 param, m, v read and written, fp32 grad, 16-bit copy; a probed
    ``calibration.cpu_adam_gparams_per_s`` replaces the constants' ceiling, a probed
    ``calibration.cpu_adam_gparams_per_thread`` their rate per thread)."""
    node = (cl.calibration.cpu_adam_gparams_per_s or c.cpu_adam_node_gparams_per_s) * 1e9
    return np.minimum(cpu_adam_thread_rate(cl, c), node / ranks_per_node)


def cpu_adam_thread_rate(cl: ClusterConfig, c: SimulatorConstants) -> float:
    """One rank's CPU Adam, parameters per second, bound by its threads alone (before the node's ceiling):
    ``threads_per_rank`` x the probed (else the constants') rate per thread."""
    per_thread = cl.calibration.cpu_adam_gparams_per_thread or c.cpu_adam_gparams_per_core
    return threads_per_rank(cl.cpu_cores, cl.gpus_per_node, cl.cpu_threads_per_rank) * per_thread * 1e9


def host_step_passes(job: JobConfig, c: SimulatorConstants, adam_rate, st, off_p):
    """Host seconds per owned parameter of the offloaded step's passes beside CPUAdam (DeepSpeed 0.19
    stage_1_and_2.py / stage3.py ``step``), on the rank's threads:

    - ``unscale_and_clip_grads`` multiplies the fp32 gradient partition in place (8 bytes a parameter); stages 1-2
      skip it when there is neither clipping nor a loss scale (bf16 without ``train.grad_clip``), stage 3 never;
    - the updated fp32 partition is cast into a 16-bit host tensor (6 bytes a parameter): stages 1-2 into the pinned
      buffer they then copy up, stage 3 with parameter offload into its host partition (without parameter offload
      stage 3 copies to the GPU with the cast on the way, ``host_cast_copy_gparams_per_s``: not here).

    Rates: probed on the rank's threads (``calibration.host_grad_scale_gparams_per_s``, ``host_cast_gparams_per_s``),
    else the bytes at the host bandwidth a probed CPUAdam rate implies (``cpu_adam_bytes_per_param``), sharing the
    node's memory like CPUAdam does (``adam_rate`` is already the node-shared rate). Without a probed CPUAdam rate the
    constants' rate is an effective one measured over whole offloaded steps, which holds these passes: 0.
    Measured (1 x H200, benchmarks/results/2026-12-01-s12-h200x1): a ZeRO-2 offload plan of 2.865 G parameters ran
    0.27 s faster without clipping, 0.26 predicted at the probed scaling rate; DeepSpeed's timer put that pass at
    0.29-0.30 s on another machine."""
    cal = job.cluster.calibration
    if not cal.cpu_adam_gparams_per_thread:
        return np.zeros_like(np.asarray(adam_rate, dtype=float))
    host_bw = adam_rate * c.cpu_adam_bytes_per_param                       # bytes/s of the rank's threads
    share = adam_rate / cpu_adam_thread_rate(job.cluster, c)                  # < 1 where the node's ranks share
    scale_s = (1.0 / (cal.host_grad_scale_gparams_per_s * 1e9 * share) if cal.host_grad_scale_gparams_per_s
               else c.host_grad_scale_bytes_per_param / host_bw)
    cast_s = (1.0 / (cal.host_cast_gparams_per_s * 1e9 * share) if cal.host_cast_gparams_per_s
              else c.host_cast_bytes_per_param / host_bw)
    scaled = (st == 3) | bool(job.train.grad_clip) | (job.train.precision == Precision.FP16)
    cast = (st < 3) | off_p
    return np.where(scaled, scale_s, 0.0) + np.where(cast, cast_s, 0.0)


def dp_communication(ds: DeepSpeedSettings, st, ga, gpu_b, stretch, z3_pass_host, grad_ar, grad_rs, param_ag,
                     fraction: float):
    """Exposed data-parallel reductions (+ the stage-2 parameter all-gather) per step.

    Per micro-batch: ``gpu_b`` the backward's GPU time, ``stretch`` its host-bound stretch, ``z3_pass_host`` the
    ZeRO-3 fetch/release host time of one pass; ``fraction`` is ``overlap_comm_fraction``. The stage-3
    all-gathers are not here: they belong to each pass's fetch floor (:func:`zero3_pass_excess`). See the
    module docstring."""
    idle_bwd = gpu_b * (stretch - 1.0) + z3_pass_host                 # GPU waits for the host
    side = ds.overlap_comm & (st >= 1)
    hidden = idle_bwd + np.where(side, fraction * gpu_b, 0.0)
    per_mb = ga * np.maximum(grad_rs - hidden, 0.0)                  # stages 2-3: every micro-batch
    stage1 = np.where(side, np.maximum(grad_ar - hidden, 0.0), grad_ar)   # the last micro-batch, or after it
    return np.select([st == 0, st == 1, st == 2], [grad_ar, stage1, per_mb + param_ag], per_mb)


def zero3_pass_excess(compute, floor, overlap: float):
    """Seconds a ZeRO-3 pass takes beyond its ``compute``: the pass takes max(compute, floor) + (1 - overlap) x
    min(compute, floor), ``floor`` being the coordinator's fetch/release host time and the pass's all-gathers.

    The host issues each module's gather and its kernels from the module's pre-forward hook, after waiting for the
    gather it prefetched: where the floor is longer the GPU idles between modules (a host-bound pass), where the
    compute is longer the gathers and hooks run under it; ``overlap`` (``zero3_pass_overlap``) is the fraction of
    the shorter of the two that the other hides."""
    return np.maximum(compute, floor) + (1.0 - overlap) * np.minimum(compute, floor) - compute


def time_terms(mt: ModelTerms, job: JobConfig, a: PlanArrays, c: SimulatorConstants,
               ds: DeepSpeedSettings | None = None) -> dict[str, np.ndarray]:
    """Seconds of every time category (one optimizer step) for all plans in ``a``.

    ``ds``: the plans' DeepSpeed settings (default: read from the job's DeepSpeed config builder)."""
    ds = ds if ds is not None else deepspeed_settings(job, a)
    cl = job.cluster
    s = float(job.train.seq_len)
    w, _ = precision_bytes(job)
    rates = LinkRates.from_cluster(cl)
    tokens = a.micro_batch * s
    ga = a.grad_accum
    tp = a.tp
    rate = achieved_rate(job, mt.hidden / tp, tokens, c)
    cl_hbm = cl.gpu.memory_bandwidth_gbs * 1e9 * c.hbm_efficiency
    ac = a.checkpoints_activations.astype(float)
    st = a.zero
    # GPU time of one micro-batch: matrix products (at a rate fitted on Llama layers, their element-wise kernels
    # included), the memory-bound element-wise bytes by which the model's layers differ from Llama layers of the same
    # dimensions (sim/elementwise.py; negative for opt and gpt2) and the memory-bound fp32 loss over the logits
    loss_half = 0.5 * tokens * (mt.vocab / tp) * c.loss_bytes_per_logit / cl_hbm
    ew_bytes = (w / 2.0) * (mt.elementwise_vs_llama_replicated / np.where(a.sp, tp, 1)
                            + mt.elementwise_vs_llama_sharded / tp)
    gpu_fwd = (tokens * forward_flops(mt.matmul_params, mt.layers, job.train.seq_len, mt.hidden) / tp / rate
               + tokens * ew_bytes / cl_hbm)
    gpu_f, gpu_b, gpu_r = gpu_fwd + loss_half, 2.0 * gpu_fwd + loss_half, ac * gpu_fwd
    gpu_mb = gpu_f + gpu_b + gpu_r
    # host time of one micro-batch (kernels launch asynchronously: a micro-batch takes max(GPU, host))
    tensors = mt.param_tensors + mt.expert_param_tensors / a.ep
    host_fwd = mt.layers * c.layer_overhead_s
    host_model = (1.0 + ac + c.backward_host_factor) * host_fwd + tensors * c.grad_hook_s
    # ZeRO-3: fetch/release of every partitioned tensor and the hooks of every module, per pass (fwd, bwd, recompute)
    fetch_dense, fetch_experts = fetched_tensors(job.model, ds.persistence_threshold)
    fetched = fetch_dense + fetch_experts / a.ep
    # the host CPU's cost per fetched tensor: fitted per cluster by `meshpilot calibrate` where ZeRO-3 runs were recorded
    fetch_s = cl.calibration.zero3_fetch_ms * 1e-3 if cl.calibration.zero3_fetch_ms else c.zero3_fetch_s
    z3_pass_host = np.where(st == 3, fetched * fetch_s
                            + (mt.modules + mt.expert_modules / a.ep) * c.zero3_module_hook_s, 0.0)
    # the model's host time overlaps the GPU (asynchronous launches) and stretches the compute where it is longer;
    # ZeRO-3's fetch/release time and its gathers set a floor per pass instead (zero3_pass_excess, below)
    excess = np.maximum(host_model - gpu_mb, 0.0)          # host-bound time beyond the GPU's work
    stretch = 1.0 + excess / gpu_mb                        # stretches the compute phases
    forward = ga * gpu_f * stretch
    backward = ga * gpu_b * stretch
    recompute = ga * gpu_r * stretch
    # one forward without autograd (zeroth order): max(GPU, host) of the forward alone
    fwd_one = np.maximum(gpu_fwd + loss_half, host_fwd)
    # tensor parallel
    ar = collective_time("all_reduce", tokens * mt.hidden * w, a.tp_span[0], a.tp_span[1], a.tp_span[2], rates)
    tp_comm = ga * mt.layers * (4.0 + 2.0 * ac) * ar
    # data parallel
    pr, ps, pn, pe = rank_params(mt, tp, a.ep, a.dp)
    dspan, espan = a.dp_span, a.edp_span

    def coll(op, nbytes_n, nbytes_e):
        return (collective_time(op, nbytes_n, dspan[0], dspan[1], dspan[2], rates)
                + np.where(nbytes_e > 0, collective_time(op, nbytes_e, espan[0], espan[1], espan[2], rates), 0.0))

    grad_ar = coll("all_reduce", w * pn, w * pe)
    grad_rs = coll("reduce_scatter", w * pn, w * pe)
    param_ag = coll("all_gather", w * pn, w * pe)
    dp_exposed = dp_communication(ds, st, ga, gpu_b, stretch, z3_pass_host, grad_ar, grad_rs, param_ag,
                                  c.overlap_comm_fraction)
    # ZeRO 1-2 without optimizer offload move the gradients through memory on their way to the reduction
    # (stage_1_and_2.py, contiguous_gradients): the hook copies each gradient into the reduce bucket (read and write
    # w P_r) and copy_grads_in_partition the rank's share into the partition buffer (w P_s both ways); memory-bound,
    # every micro-batch at stage 2, once a step at stage 1
    grad_copies = 2.0 * w * (pr + ps) / cl_hbm
    dp_exposed = dp_exposed + np.select([(st == 2) & ~a.offloads_optimizer, (st == 1) & ~a.offloads_optimizer],
                                        [ga * grad_copies, grad_copies], 0.0)
    # ZeRO-3 per pass: the coordinator's floor (fetch/release host time + the pass's all-gathers) against the pass's
    # compute (:func:`zero3_pass_excess`): forward, backward and recompute each
    floor = z3_pass_host + param_ag
    z3_excess = (zero3_pass_excess(gpu_f * stretch, floor, c.zero3_pass_overlap)
                 + zero3_pass_excess(gpu_b * stretch, floor, c.zero3_pass_overlap)
                 + ac * zero3_pass_excess(gpu_fwd * stretch, floor, c.zero3_pass_overlap))
    gathers = np.where(st == 3, ga * z3_excess, 0.0)
    # expert parallel
    a2a = collective_time("all_to_all", tokens * mt.top_k * mt.capacity_factor * mt.hidden * w / tp,
                          a.ep_span[0], a.ep_span[1], a.ep_span[2], rates)
    alltoall = np.where(a.ep > 1, ga * mt.moe_layers * (4.0 + 2.0 * ac) * a2a, 0.0)
    # offload
    cal = cl.calibration
    h2d = (cal.h2d_gbs or cl.pcie_bandwidth_gbs * c.pcie_efficiency) * 1e9
    d2h = (cal.d2h_gbs or cl.pcie_bandwidth_gbs * c.pcie_efficiency) * 1e9
    off_o, off_p = a.offloads_optimizer, a.offloads_params
    # optimizer offload at stages 1-2 (stage_1_and_2.py copy_grads_in_partition, DeepSpeed 0.19): with accumulation
    # each micro-batch's gradient partition goes to the host in 16 bits and, after the first, comes back to be added
    # to the next (async_accumulate_grad_in_cpu_via_gpu; at stage 1 once, at the boundary); at the boundary the
    # partition is cast to fp32 on the GPU and copied down (async_inplace_copy_grad_to_fp32_buffer_from_gpu); the
    # updated 16-bit parameters come back after the step, cast on the host into a pinned buffer.
    # Stage 3 (stage3.py partition_grads, _finalize_offload_gradient_accumulation): each micro-batch's 16-bit
    # partition goes down to a pinned host buffer and, after the first, comes up to be added on the GPU and goes down
    # again; at the boundary it comes up once more (norm and fp32 cast on the GPU) and goes down in fp32; the updated
    # fp32 partition comes back by a blocking copy into the 16-bit GPU partition
    # (_reassign_or_swap_out_partitioned_parameters), which PyTorch casts on the host into pageable memory before it
    # copies: ``host_cast_copy_gparams_per_s`` (with parameter offload the partition is on the host: no transfer).
    # Parameter offload without optimizer offload makes the same copy the other way: the fp32 partition and its step
    # are on the GPU, the 16-bit partition on the host, and ``cpu_16bit.copy_(gpu_fp32)`` (blocking) goes down into a
    # pageable fp32 host tensor that torch then converts: ``host_cast_copy_d2h_gparams_per_s``.
    acc = ga > 1
    down = np.select([st == 2, st == 1], [np.where(acc, ga * w * ps, 0.0) + 4.0 * ps,
                                          np.where(acc, w * ps, 0.0) + 4.0 * ps], ga * w * ps + 4.0 * ps)
    up = np.select([st == 2, st == 1], [ga * w * ps, np.where(acc, 2.0 * w * ps, w * ps)], ga * w * ps)
    cast_rate = (cal.host_cast_copy_gparams_per_s or c.host_cast_copy_gparams_per_s) * 1e9   # probed where set
    cast_copy = np.where((st == 3) & ~off_p, ps / cast_rate, 0.0)
    back_rate = (cal.host_cast_copy_d2h_gparams_per_s or c.host_cast_copy_d2h_gparams_per_s) * 1e9
    param_back = np.where((st == 3) & off_p & ~off_o, ps / back_rate, 0.0)
    offload = (np.where(off_o, down / d2h + up / h2d + cast_copy, 0.0)
               + np.where(off_p, ga * (2.0 + ac) * w * ps / h2d, 0.0) + param_back)
    adam_rate = cpu_adam_rate(cl, c, np.minimum(a.world, cl.gpus_per_node))
    passes = host_step_passes(job, c, adam_rate, st, off_p)
    if cal.cpu_adam_rank_gparams_per_s:        # fitted from training runs by `meshpilot calibrate`: replaces the model
        adam_rate = np.full_like(adam_rate, cal.cpu_adam_rank_gparams_per_s * 1e9, dtype=float)
        passes = np.zeros_like(adam_rate)      # ... and holds the step's other host passes
    cpu_opt = np.where(off_o, ps / adam_rate + ps * passes, 0.0)
    hbm = cl_hbm
    opt_params = np.where(st == 0, pr, ps)
    # memory-bound Adam over the owned fp32 states, the gradient-norm/clip pass over the owned fp32 gradients
    # (on the host with optimizer offload: part of CPUAdam), DeepSpeed's per-tensor loops and fixed step cost
    gpu_step_bytes = (c.optimizer_bytes_per_param + (c.grad_clip_bytes_per_param if job.train.grad_clip else 0.0))
    opt_step = (np.where(off_o, 0.0, gpu_step_bytes * opt_params / hbm) + c.step_overhead_s
                + tensors * c.step_tensor_s + np.where(st == 3, fetched * c.zero3_step_tensor_s, 0.0))
    # zeroth order
    is_zo = a.zeroth_order
    zo_fwd = ga * (2.0 / a.zo_pertp) * fwd_one
    zo_perturb = c.zo_perturb_passes * mt.total * (2.0 * w) / hbm + c.step_overhead_s
    wspan = a.world_span
    # ZO2 moves every block up ga times and down once per step, the two directions at once (separate
    # copy engines and streams over full-duplex PCIe: 1 x H200, opt-13b, 25.7 GB each way took 0.52 s a
    # step). On several ranks of one node (the worker's default) each rank moves 1/n of a block over its
    # own link and the slices are all-gathered over NVLink; across nodes every rank moves whole blocks.
    n_slices = a.zo2_slices
    gather = np.where(n_slices > 1, collective_time("all_gather", w * mt.blocks_total, wspan[0], wspan[1], wspan[2],
                                                    rates), 0.0)
    zo_upload = np.maximum(ga * w * mt.blocks_total / (n_slices * h2d),
                           w * mt.blocks_total / (n_slices * d2h)) + ga * gather
    zo_off = np.where(a.zo2, np.maximum(zo_upload - c.zo2_overlap * zo_fwd, 0.0), 0.0)
    zo_scalar = collective_time("all_reduce", 8.0 * 2, wspan[0], wspan[1], wspan[2], rates)
    z = np.zeros_like(forward)
    out = dict(
        forward=np.where(is_zo, zo_fwd, forward), backward=np.where(is_zo, z, backward),
        recompute=np.where(is_zo, z, recompute), tp_communication=np.where(is_zo, z, tp_comm),
        dp_reduction_exposed=np.where(is_zo, zo_scalar, dp_exposed), zero3_gathers=np.where(is_zo, z, gathers),
        expert_alltoall=np.where(is_zo, z, alltoall), offload_transfers=np.where(is_zo, zo_off, offload),
        cpu_optimizer=np.where(is_zo, z, cpu_opt), optimizer_step=np.where(is_zo, zo_perturb, opt_step))
    return out
