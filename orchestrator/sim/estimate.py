"""What the simulator returns (:class:`Estimate`) and every constant it uses (:class:`SimulatorConstants`).

All efficiency factors and overhead terms of the memory and time models live in
:class:`SimulatorConstants`, so that measurements (``meshpilot probe`` and the accuracy
runs) can fit them and pass a fitted copy to ``simulate(..., constants=...)``. Defaults
are first-principles estimates for an H100 node or fitted values; each field says where its
default comes from. What DeepSpeed is configured to do (bucket sizes, the stage-3 persistence
threshold, whether communication overlaps compute) is not a constant: the simulator reads it
from the config the worker runs (:mod:`.deepspeed_settings`).

Calibrated defaults (Hopper): the constants marked "fitted" below were fitted by
benchmarks/accuracy_report.py (``--constants first_principles_constants.yaml --fit-metrics
time,cuda_context_gib,nccl_base_gib,fragmentation,model_load_fragmentation --sweeps 4``, calibration
half of the alternate split, a config measured twice kept whole in one half) on the 40
measurements of benchmarks/results/2026-11-27-h200x4/ (4x H200: DeepSpeed shards 1-2 + MeZO) and
benchmarks/results/2026-11-27-h200x2/ (2x H200: dp=2 configs incl. 2 OOMs, optimizer and
parameter offload); DeepSpeed 0.19.8, torch 2.11, HF Llama bf16 + AdamW. See
benchmarks/results/2026-11-27-h200x2/accuracy_report.txt and fitted_constants.yaml, and
first_principles_constants.yaml there for the values before the fit. Of the memory constants
only the fixed costs and the two allocator terms, which the measurements observe directly
(NVML - reserved, reserved - allocated), are fitted; the activation ones stay at their
first-principles values. Other GPUs use the same values (the efficiencies are relative to each
GPU's datasheet) until measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GIB = float(2**30)

MEMORY_KEYS = ("weights", "gradients", "optimizer_states", "activations", "temporary",
               "communication_buffers", "framework_overhead")
TIME_KEYS = ("forward", "backward", "recompute", "tp_communication", "dp_reduction_exposed", "zero3_gathers",
             "expert_alltoall", "offload_transfers", "cpu_optimizer", "optimizer_step")


@dataclass(frozen=True)
class SimulatorConstants:
    """Tunable constants of the memory and time models (fit these, do not scatter them)."""
    # --- fixed memory costs -------------------------------------------------------------
    cuda_context_gib: float = 1.82
    """CUDA context, cuBLAS workspace and loaded kernels outside the caching allocator (NVML sees it;
    torch does not). Measured, not fitted: NVML peak - torch reserved peak of every single-rank run
    on H200 (MeZO, 0.37B-6.7B: 1.82 GiB each; benchmarks/results/2026-11-27-h200x4/zo_measurements.json).
    It was 0.67 when fitted together with the allocator terms, which then absorbed the rest."""
    nccl_base_gib: float = 0.28
    """NCCL buffers of the first communicator. Measured: NVML - reserved of 2-rank zeroth-order runs
    (2.10 GiB) minus a single rank's (1.82)."""
    nccl_per_group_gib: float = 0.28
    """Each further communicator (tp, ep, edp, the engine's own) a rank joins: the same buffers as the first."""
    deepspeed_engine_groups: float = 2.0
    """Communicators a DeepSpeed engine at ZeRO 0-2 creates beyond the world's: NVML - reserved of
    the DeepSpeed dp runs at ZeRO 0-2 was 2.56-2.66 GiB, median 2.65 = 1.82 + 0.28 + 2 x 0.28 (H200,
    0.37B-6.7B; benchmarks/fixed_costs.py prints them all)."""
    zero3_engine_groups: float = 1.0
    """The same at ZeRO-3: 2.35-2.45 GiB on Hugging Face Llama = 1.82 + 0.28 + 1 x 0.28; 2.56 on the
    built-in model's runs through `meshpilot run` (1B-13B), 0.18 GiB more than this predicts."""
    fragmentation: float = 0.0155
    """Caching-allocator reserve beyond the phase model of sim/memory.py (the activation and step phases'
    blocks reserved side by side), as a fraction of it. Fitted 0.0155 with model_load_fragmentation on the
    calibration half of the 2026-11-27 sets (benchmarks/accuracy_report.py --fit-metrics
    fragmentation,model_load_fragmentation, from 0.0546 and 1.2036, the values of the model without
    phases; benchmarks/results/2026-11-30-s2-h200x2/accuracy_report_phases.txt)."""
    model_load_fragmentation: float = 1.1017
    """Allocator blocks left reserved after DeepSpeed copies a loaded transformers model (w·P_r bytes
    per rank) into its flat buffers, as a fraction of w·P_r (``model.implementation: hf`` only; see
    sim/memory.py). Not used for zeroth-order plans. First principles 0.5; fitted with fragmentation
    (above; reserved - allocated 12-19 GiB at 6.7B, bf16 model 12.6 GiB)."""
    # --- DeepSpeed internals (not configurable) --------------------------------------------
    stage0_allreduce_bucket: float = 5e8
    """Elements per flattened all-reduce buffer of the engine's plain data-parallel path (stage 0):
    DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (runtime/engine.py), not a config key."""
    # --- activations ----------------------------------------------------------------------
    logits_saved_bytes: float = 6.0
    """The built-in model's loss (strategies/tensor_parallel.py, _VocabParallelCE), bytes per token per
    vocabulary entry counted with the saved activations: it saves the fp32 softmax (4) and, with
    ``logits_backward_bytes``, its activation phase holds 14 = the forward's peak at the exp (bf16 logits 2, their
    fp32 copy 4, z - max 4, exp 4)."""
    hf_logits_saved_bytes: float = 4.0
    """The same for ``model.implementation: hf`` (transformers' causal-LM loss and strategies/hf_adapter.py, both
    ``cross_entropy(logits.float())`` with only the loss kept): the fp32 log-softmax output (4) is all that stays
    saved, and the backward adds the gradient of that output and the input gradient (fp32, 4 + 4): a peak of 12
    (tests/test_hf_implementation.py counts the saved tensors)."""
    logits_backward_bytes: float = 8.0
    """Extra bytes per token per vocabulary entry during the loss backward: the fp32 softmax gradient and
    its input-gradient copy."""
    logits_forward_only_bytes: float = 14.0
    """Forward-only loss (zeroth-order), per token and vocabulary entry of one chunk: bf16 logits,
    their fp32 copy, ``z - max`` and its exp (2 + 4 + 4 + 4)."""
    forward_only_rows: float = 1024.0
    """Tokens per chunk of the built-in model's forward-only loss (``Transformer.FORWARD_ONLY_ROWS``):
    the logits of at most this many tokens exist at once."""
    working_set_factor: float = 2.0
    """Transient buffers of one layer (autograd gradients of activations, fp32 norm upcasts) in units of
    that layer's (h + f) 16-bit values per token."""
    # --- compute --------------------------------------------------------------------------
    matmul_efficiency: float = 0.4614
    """Achieved / datasheet bf16 matrix rate for transformer layers at hidden 4096 (used without calibration).
    First principles 0.62; fitted 0.4614 (HF Llama eager layers with SDPA reach ~450 of 989 TFLOP/s)."""
    shape_half_hidden: float = 512.0
    """Hidden size (per tensor-parallel shard) at which the matrix rate halves: rate ~ x/(x + this)."""
    shape_half_tokens: float = 256.0
    """Tokens per micro-batch at which the matrix rate halves."""
    layer_overhead_s: float = 0.001198
    """Host (CPU) time per transformer layer per forward pass: Python module calls and ~40 eager kernel launches
    of a Hugging Face layer (2 norms, 4 attention projections, RoPE, SDPA, 3 MLP projections, SiLU, residuals) at
    ~12 us each with autograd recording. Kernels are launched asynchronously, so a micro-batch takes
    max(GPU time, host time): small models are host bound. First principles 5e-4; fitted 1.198e-3."""
    backward_host_factor: float = 2.0
    """Host time of one layer's backward (autograd engine, about twice the forward's kernels) in units of
    ``layer_overhead_s``."""
    grad_hook_s: float = 0.0001373
    """Host time of DeepSpeed's per-parameter-tensor gradient hook in backward (every stage: the bf16 optimizer's
    fp32 accumulation at stage 0, the ipg-bucket copy of stages 1-2, the reduce-scatter bookkeeping of stage 3).
    First principles 5e-5; fitted 0.0001373."""
    step_overhead_s: float = 0.01497
    """Per optimizer step, host: DeepSpeed engine bookkeeping, the all-reduce of the gradient norm and the host
    synchronisations of the step (not per tensor). First principles 0.015; fitted 0.01497."""
    step_tensor_s: float = 0.0001122
    """Host time per parameter tensor in the optimizer step: DeepSpeed's per-tensor Python loops (gradient norm,
    clipping, fp32 -> 16-bit copy-back, zeroing gradients), ~5 eager ops at ~12 us. First principles 6e-5;
    fitted 0.0001122."""
    grad_clip_bytes_per_param: float = 12.0
    """HBM bytes per owned parameter of the gradient-norm and clipping pass over the fp32 gradients (read 4 for
    the norm, read + write 8 to scale), memory bound."""
    loss_bytes_per_logit: float = 24.0
    """HBM bytes per token per vocabulary entry of the fp32 loss (upcast of the bf16 logits 2+4, log-softmax 4+4,
    its backward 4+4 and the bf16 logit gradient 2), memory bound; half counted in forward, half in backward."""
    zero3_fetch_s: float = 1.2e-3
    """ZeRO-3 host time per fetched (partitioned) parameter tensor per pass (forward, backward and recompute):
    fetch_sub_module's all_gather_coalesced launch, in-flight registry, the wait on the prefetched gather's event
    and the release (re-partition), deepspeed/runtime/zero/partitioned_param_coordinator.py; in backward also the
    gradient's ipg-bucket/reduce-scatter bookkeeping. With the pass's all-gathers it sets the floor under which a
    pass cannot run however little it computes (step_time.zero3_pass_excess). Fitted with zero3_pass_overlap on
    the built-in model at 1.1-2.1B parameters (58-226 fetched tensors; micro-batch 1 x 8 and 8 x 1, 2 x H200),
    validated on 6.7B and 13B: benchmarks/zero3_time_fit.py, benchmarks/results/2026-11-30-s3-h200x2. The a-priori
    value (a CPU/gloo probe of DeepSpeed 0.19.8 with a tiny HF Llama) was 3e-4."""
    zero3_module_hook_s: float = 1.0e-4
    """ZeRO-3 host time per nn.Module per pass: the pre/post forward hooks of parameter_offload.py (trace
    bookkeeping, wrapping outputs in the backward-hook autograd functions) and their backward counterparts."""
    zero3_pass_overlap: float = 1.0
    """Fraction of the shorter of a ZeRO-3 pass's compute and its fetch floor (host time + all-gathers) that the
    longer hides (step_time.zero3_pass_excess): 1 is a pass taking max(compute, floor). Fitted with zero3_fetch_s
    (grid 0-1; the fit set's best is the bound, 1.0)."""
    zero3_step_tensor_s: float = 3.5e-4
    """ZeRO-3 host time per fetched tensor in the optimizer step (stage3.py step: _partition_all_parameters,
    unflattening the updated 16-bit partition back into every parameter, zero_grad, secondary-tensor
    invalidation), after the step's stream synchronisation, so not hidden behind GPU work. A priori from the
    same CPU probe (~0.29 x a layer forward per fetched tensor)."""
    hbm_efficiency: float = 0.5576
    """Achieved / datasheet memory bandwidth for element-wise kernels (optimizer step, perturbations, loss).
    First principles 0.7; fitted 0.5576."""
    optimizer_bytes_per_param: float = 36.0
    """HBM bytes touched per parameter by the fused Adam step (fp32 master, m, v read+write, grad, 16-bit copy)."""
    cpu_adam_gparams_per_core: float = 0.14
    """DeepSpeed CPUAdam throughput of one rank per OpenMP thread while compute-bound, billions of
    parameters per second. 4 x H200 host, 8 threads per rank, 2 ranks: 1.1 G params/s per rank
    (benchmarks/results/2026-11-27-s5-h200x4, llama-1b ZeRO-2 + optimizer offload, step minus the
    same plan's step without offload)."""
    cpu_adam_node_gparams_per_s: float = 3.2
    """The node's memory-bound CPUAdam ceiling over all its ranks (without a probe calibration), billions
    of parameters per second: ~30 host bytes per parameter, so 3.2 G params/s is ~96 GB/s of host memory
    traffic. Same source: 4 ranks of 8 threads ran 0.8 G params/s each on the 64-core host. A property of
    the node's memory, not of its core count: it was 0.05 per core, which gave the 32-core 2 x H200 host
    1.6 G params/s and its two ranks 0.8 each, where ZeRO-1 and ZeRO-2 offload ranks measured 1.2-1.4
    (the thread bound, 8 x 0.14; benchmarks/results/2026-11-30-s4-h200x2, regime_runs and offfix: rows
    that are therefore no longer independent checks of this rate)."""
    cpu_adam_bytes_per_param: float = 28.0
    """Host memory bytes CPUAdam moves per parameter: fp32 parameter, gradient, exp_avg and exp_avg_sq read (16),
    parameter and both moments written (12). Converts a probed Adam rate into the rank's host bandwidth where the
    probe did not time the step's other host passes (older profiles; step_time.host_step_passes)."""
    host_grad_scale_bytes_per_param: float = 8.0
    """Bytes of the offloaded step's in-place scaling of the fp32 gradients (read 4, write 4)."""
    host_cast_bytes_per_param: float = 6.0
    """Bytes of the offloaded step's cast of the fp32 parameters into a 16-bit host tensor (read 4, write 2)."""
    host_cast_copy_gparams_per_s: float = 1.72
    """Parameters per second, per rank, of a blocking copy from a pinned fp32 host tensor into a 16-bit GPU tensor
    (how ZeRO-3 with optimizer offload puts the updated parameters back): PyTorch casts on the host into pageable
    memory and copies that. Measured, 2 x H200 host, 8 threads per rank, 1 G elements: 1.86 G/s with one rank
    copying, 1.72 with both at once, against 27 G/s (55 GB/s) for a pinned 16-bit copy
    (benchmarks/offload_copy_probe.py, results/2026-11-30-s5-h200x2/copyprobe)."""
    host_cast_copy_d2h_gparams_per_s: float = 0.33
    """Parameters per second, per rank, of a blocking copy from an fp32 GPU tensor into a pinned 16-bit host tensor
    (how ZeRO-3 with parameter offload and the optimizer on the GPU puts the updated parameters back): PyTorch copies
    down into a pageable fp32 host tensor and converts that on the host. Measured, 1 x H200 host, 8 threads, 1 G
    elements: 0.33 G/s, against 1.59 for the opposite copy on the same machine (benchmarks/offload_copy_probe.py,
    results/2026-12-01-s13-h200x1/call2copy; `meshpilot probe` measures both on a rank's threads)."""
    pcie_efficiency: float = 0.9963
    """Achieved / profile host-device bandwidth for DeepSpeed's bucketed copies (without calibration).
    First principles 0.9; fitted 0.9963."""
    # --- overlap ------------------------------------------------------------------------
    overlap_comm_fraction: float = 0.7
    """Fraction of the backward's GPU time that hides the gradient reductions when DeepSpeed's
    overlap_comm puts them on a side stream (stage-3 all-gathers are counted exposed in both settings:
    step_time.py). Whether it is on comes from the config. The H200 fit kept 0.7; those runs
    (benchmarks/measure_deepspeed.py) used DeepSpeed's defaults, overlap on at stage 3."""
    zo2_overlap: float = 0.8
    """Fraction of ZO2's block uploads hidden behind compute (it prefetches the next block)."""
    # --- zeroth order ---------------------------------------------------------------------
    zo2_window_blocks: int = 3
    """Transformer blocks resident on the GPU in ZO2 (computing, uploading next, offloading previous)."""
    zo_perturb_passes: float = 4.0
    """Passes over the parameters per MeZO step (+eps, -2eps, +eps restore, update), each regenerating z."""
    # --- CPU side -------------------------------------------------------------------------
    cpu_worker_runtime_gib: float = 0.38
    """Resident memory of a CPU (gloo) worker before its model and data: the torch and DeepSpeed
    runtime. Stands in for the CUDA context when cluster.accelerator is cpu; the quickstart's
    tiny-llama workers peaked at 0.40 GiB RSS (examples/quickstart.yaml, 2 CPU workers)."""
    cpu_process_gib: float = 1.40
    """Host memory of one training process while it trains, beyond its offload buffers (torch, CUDA, NCCL, DeepSpeed,
    data loader), as the node counts it (MemTotal - MemAvailable: anonymous and shared pages; RSS adds some 0.5 GiB of
    file-backed pages, mostly shared libraries, which the kernel can drop and Ray's memory monitor does not count).
    Measured: 2.79 GiB on the node for the two ranks of built-in llama-3-8b ZeRO-1 on 2 x H200
    (benchmarks/results/2026-11-30-s6-h200x2/choice8b/z1_mb1x8, a run that built no DeepSpeed op; the first run on a
    fresh node also compiles fused_adam, whose compiler held about 1 GiB more on the node). It was 1.3, measured as
    RSS less the ZeRO-3 defragmentation copy, which counts the file-backed pages and the wrong moment (below)."""
    cpu_after_build_gib: float = 0.75
    """Host memory a training process allocates after ZeRO-3's engine build has freed its defragmentation copy
    (``w P_s``, sim/host_memory.py host_memory_terms): the copy's moment holds the process baseline less this. Measured:
    built-in llama-2-7b ZeRO-3 on 2 x H200 (benchmarks/results/2026-11-30-s3-h200x2/z3time/7b_mb1, no op build)
    peaked at 13.85 GiB on the node, 6.92 per rank: the 6.28 GiB copy + 0.65, against the 1.40 of cpu_process_gib.
    What the 0.75 GiB is made of (NCCL's host state, the engine's and the data loader's) is not itemised."""
    pinned_node_overhead: float = 0.032
    """The node's used memory per byte of page-locked host memory beyond the byte itself: the page tables and the
    kernel's and the CUDA driver's records of the locked pages, which no process's RSS shows but Ray's memory
    monitor counts (MemTotal - MemAvailable). Measured on the 2 x H200 host (benchmarks/host_copy_probe.py, two
    calls, 2026-11-30-s8-h200x2/copyprobe and copyprobe2): pinned blocks of 8, 8, 2 and 16 GiB raised the node's
    used memory 3.9%, 2.5%, 3.9% and 3.1% more than their pages (PageTables 0.4% of them), 3.2% over the 34 GiB
    together; pageable blocks 0.6% and 0.8% (PageTables 0.14%), left to the band."""
    ray_node_gib: float = 1.65
    """Memory on a node beside the training processes once they start: Ray's own processes (GCS, raylet, dashboard
    and its agents) and meshpilot's driver. Ray's memory monitor counts it against the threshold, so a plan's
    workers may use that much less. Median over the runs committed under benchmarks/results/ that recorded the
    node's used memory before `meshpilot run` and when the workers started (24 runs, 1.09-1.88 GiB;
    ``python benchmarks/error_bands.py`` prints them)."""
    node_base_gib: float = 0.96
    """A node's used memory before meshpilot starts anything (kernel, system daemons), counted by Ray's memory
    monitor too. Measured on the lent H200 hosts: 0.88-2.09 GiB before a run on a settled node, median 0.96 over the
    runs `python benchmarks/error_bands.py` lists."""
    cpu_pinned_buffer_gib: float = 1.0
    """Not read: the host model counts the pinned buffers themselves (host_memory.host_memory_terms). Kept so
    that the constant files committed under benchmarks/results/2026-11-27-* still load."""

    def replace(self, **kw: Any) -> "SimulatorConstants":
        return dataclasses.replace(self, **kw)


@dataclass
class Estimate:
    """The simulator's prediction for one plan (per GPU on the most loaded rank)."""
    plan: str
    plan_config: dict[str, Any]
    world_size: int
    fits: bool
    peak_memory_gib: float
    gpu_memory_gib: float
    cpu_memory_gib_per_node: float
    cpu_memory_available_gib: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    memory_breakdown_gib: dict[str, float]
    time_breakdown_s: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    regime: str = ""                  # the plan's regime of the measured error bands (sim/error_bands.py)
    memory_band: float = 0.0          # that regime's relative band: measured peaks have reached peak x (1 + band)
    memory_margin_gib: float = 0.0    # GiB the margin adds to this peak: min(band x peak, the regime's band in GiB)
    fits_with_margin: bool = True     # fits even with the band added (GPU and host) and room for the largest request
    largest_request_gib: float = 0.0  # the step's largest single allocation (sim/memory.py largest_request)
    largest_request_has_room: bool = True   # it fits in the card's room above the predicted peak
    at_card: str = ""                 # over the card as modelled, its live tensors within it: peak = the card; the note

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
