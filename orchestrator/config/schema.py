"""The job configuration: four typed sections (model, cluster, train, plan).

These are OmegaConf structured dataclasses. A job file is YAML; any key can be overridden
from the command line with dotlist syntax (``plan.zero_stage=3 cluster=dgx-h100``).
Loading, preset resolution and validation live in :mod:`meshpilot.orchestrator.config.loader`;
this module only declares the schema and the allowed values.

Choices are :class:`Choice` enums whose values are what a job file says (``plan.offload_optimizer:
cpu``, ``train.precision: bf16``). A member is a ``str`` equal to its value, and prints, formats,
hashes and JSON-encodes as that value, so ``job.train.precision == "bf16"``, f-strings and dict
lookups keyed by the strings keep working. The loader accepts exactly the values (not the
member names) and rejects anything else naming the key and the allowed values. Numeric choices
stay integers (:data:`ZERO_STAGES`, :data:`ZO_PERTP`).

``None`` in the plan section means "not fixed": with ``plan: auto`` the planner chooses
it, with a fixed plan the default documented on the field applies.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """One allowed value of a config field; the member *is* its value as a string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The values a job file may give, in declaration order."""
        return tuple(m.value for m in cls)


def plain(value: Any) -> Any:
    """An enum member as its value (what YAML, JSON and fingerprints hold); anything else as is."""
    return value.value if isinstance(value, Enum) else value


class Arch(Choice):
    LLAMA = "llama"
    GPT2 = "gpt2"
    OPT = "opt"
    MIXTRAL = "mixtral"


class Implementation(Choice):
    BUILTIN = "builtin"                     # meshpilot's transformer (strategies/model.py): every plan
    HF = "hf"                               # transformers' AutoModelForCausalLM: data parallel and ZeRO only


class Accelerator(Choice):
    GPU = "gpu"
    CPU = "cpu"                             # CPU workers over gloo


class Precision(Choice):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Optimizer(Choice):
    ADAMW = "adamw"
    SGD = "sgd"
    ZO_SGD = "zo-sgd"                       # zeroth order: needs plan.zo.mode mezo or zo2


class Offload(Choice):
    NONE = "none"
    CPU = "cpu"


class Checkpointing(Choice):
    NONE = "none"
    FULL = "full"                           # every block recomputed in backward


class ZOMode(Choice):
    NONE = "none"
    MEZO = "mezo"                           # whole model on the GPU
    ZO2 = "zo2"                             # blocks in host memory, streamed through the GPU


class ExportFormat(Choice):
    NONE = "none"
    HF = "hf"                               # a Hugging Face model directory (config.json + safetensors)


class DataFormat(Choice):
    AUTO = "auto"                           # .txt: text; records: chat, prompt-completion or jsonl-text by columns
    TEXT = "text"                           # .txt files, one document per blank-line-separated paragraph
    JSONL_TEXT = "jsonl-text"               # records' train.dataset.text_field
    PROMPT_COMPLETION = "prompt-completion"  # records' prompt_field + completion_field (prompt masked)
    CHAT = "chat"                           # records' messages_field [{role, content}] (assistant turns trained)


ZERO_STAGES = (0, 1, 2, 3)
ZO_PERTP = (1, 2)


@dataclass
class ModelConfig:
    """Decoder-only transformer dimensions. ``model: <preset>``, a HF config.json path (shape only) or a
    HF model directory (shape and weights) also work."""
    name: str = "custom"
    arch: Arch = Arch.LLAMA
    layers: int = MISSING
    hidden: int = MISSING
    heads: int = MISSING
    kv_heads: Optional[int] = None          # default: heads (no grouped-query attention)
    ffn: Optional[int] = None               # default: 4*hidden (gpt2, opt); LLaMA's 8h/3 rule otherwise
    vocab: int = MISSING
    max_positions: int = 2048               # learned position table size (gpt2, opt)
    tie_embeddings: Optional[bool] = None   # default: true for gpt2/opt, false for llama/mixtral
    num_experts: int = 0                    # > 0 makes MoE layers
    top_k: int = 2
    capacity_factor: float = 1.25
    moe_every: int = 1                      # layer i is MoE when i % moe_every == moe_every - 1
    norm_eps: float = 1.0e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False                  # llama-style attention with q/k/v biases (qwen2)
    # a local Hugging Face model directory whose safetensors weights the workers load (set by
    # ``model: DIR``; None: random initialisation from train.seed)
    path: Optional[str] = None
    # which code runs the model: the built-in transformer, or transformers' own model class (as a
    # Python-API user of Hugging Face would run it: full-vocabulary logits, its own modules), which the
    # simulator models with the allocator hole of a loaded model (sim/memory.py)
    implementation: Implementation = Implementation.BUILTIN


@dataclass
class GPUSpec:
    """One accelerator. FLOP/s are dense peak (no sparsity); bandwidths in GB/s (1e9 B/s)."""
    name: str = "generic"
    memory_gib: float = MISSING
    bf16_tflops: float = MISSING
    fp16_tflops: float = MISSING
    fp32_tflops: float = MISSING
    memory_bandwidth_gbs: float = MISSING


class SlurmMode(Choice):
    TORCHRUN = "torchrun"                   # one torchrun per node (c10d rendezvous at the first host)
    RAY = "ray"                             # Ray on Slurm: head and workers through srun, meshpilot's controller drives


@dataclass
class SlurmSettings:
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: Optional[str] = None        # Slurm syntax, e.g. "04:00:00"
    qos: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)
    mode: SlurmMode = SlurmMode.TORCHRUN    # `meshpilot submit --to slurm` launch mode (--slurm-mode overrides)


@dataclass
class KubernetesSettings:
    namespace: Optional[str] = None
    image: Optional[str] = None
    tolerations: List[Dict[str, str]] = field(default_factory=list)
    node_selector: Dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"
    queue: Optional[str] = None             # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); --queue overrides
    checkpoint_pvc: Optional[str] = None    # PersistentVolumeClaim of the run directory; --pvc overrides


_SHAPE_CLASS = re.compile(r"h([0-9]+)_t([0-9]+)")


def _pow2_floor(x: float) -> int:
    """2^floor(log2 x) for x >= 1, exactly (frexp: x = m 2^e with 0.5 <= m < 1)."""
    return 2 ** (math.frexp(float(x))[1] - 1)


def shape_class(hidden_shard: float, tokens: float) -> str:
    """The matmul shape class of a plan, key of ``calibration.matmul_tflops_by_shape``: ``h{H}_t{T}`` with
    H = 2^floor(log2(hidden / tp)) (the per-shard hidden size) and T = 2^floor(log2(micro_batch x seq_len))
    (the tokens per micro-batch); the class holds hidden sizes in [H, 2H) and token counts in [T, 2T).
    Example: llama-2-7b (hidden 4096) at tp 2 with 2 x 2048 tokens is ``h2048_t4096``."""
    if hidden_shard < 1 or tokens < 1:
        raise ValueError(f"hidden per shard ({hidden_shard}) and tokens per micro-batch ({tokens}) must be >= 1")
    return f"h{_pow2_floor(hidden_shard)}_t{_pow2_floor(tokens)}"


def parse_shape_class(key: str) -> tuple[int, int]:
    """(H, T) of a shape class key ``h{H}_t{T}`` (:func:`shape_class`); ValueError unless both are powers of two."""
    m = _SHAPE_CLASS.fullmatch(str(key))
    if m is None:
        raise ValueError(f"{key!r} is not a shape class (h<hidden per shard>_t<tokens per micro-batch>, e.g. "
                         "h4096_t8192)")
    h, t = int(m.group(1)), int(m.group(2))
    for name, v in (("hidden", h), ("tokens", t)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{key!r}: the {name} bound {v} is not a power of two (classes are [2^k, 2^(k+1)))")
    return h, t


@dataclass
class CalibrationConfig:
    """Measured rates that replace datasheet numbers (written by ``meshpilot probe``; None = not measured)."""
    measured_on: Optional[str] = None          # card and date of the measurement
    matmul_tflops: Optional[float] = None      # achieved bf16 TFLOP/s on transformer-shaped products
    # achieved bf16/fp16 TFLOP/s per matmul shape class (keys from `shape_class`: per-shard hidden size and tokens
    # per micro-batch, each rounded down to a power of two), from `meshpilot calibrate` runs and probes. A plan in
    # a listed class computes at that rate; elsewhere matmul_tflops (else datasheet x efficiency) x shape factor
    matmul_tflops_by_shape: Dict[str, float] = field(default_factory=dict)
    allreduce_busbw_gbs: Optional[float] = None
    allgather_busbw_gbs: Optional[float] = None
    reducescatter_busbw_gbs: Optional[float] = None
    alltoall_busbw_gbs: Optional[float] = None
    collective_latency_us: Optional[float] = None
    h2d_gbs: Optional[float] = None            # pinned host -> device
    d2h_gbs: Optional[float] = None            # device -> pinned host
    host_cast_copy_gparams_per_s: Optional[float] = None  # blocking pinned fp32 host -> 16-bit device copy, G params/s
    host_cast_copy_d2h_gparams_per_s: Optional[float] = None  # blocking fp32 device -> pinned 16-bit host copy, G params/s
    #                                                       (ZeRO-3 optimizer offload's way back; `meshpilot probe`)
    cpu_adam_gparams_per_s: Optional[float] = None  # DeepSpeed CPUAdam, billions of parameters per second per node
    cpu_adam_gparams_per_thread: Optional[float] = None  # the same on one rank's OpenMP threads, per thread (replaces
    #                                                      the constants' cpu_adam_gparams_per_core)
    host_grad_scale_gparams_per_s: Optional[float] = None  # one rank's threads scaling fp32 gradients in place, G
    #                                                        params/s (the offloaded step's unscale/clip pass)
    host_cast_gparams_per_s: Optional[float] = None  # one rank's threads casting fp32 into pinned 16-bit host memory
    # fitted from recorded runs by `meshpilot calibrate` (orchestrator/sim/calibration.py):
    cpu_adam_rank_gparams_per_s: Optional[float] = None  # CPUAdam of one offloading rank in training (replaces the
    #                                                      per-thread and per-node model when set)
    zero3_fetch_ms: Optional[float] = None     # ZeRO-3 host time per fetched tensor per pass (ms): the host CPU's part of
    #                                            a pass's floor; replaces the constants' zero3_fetch_s when set
    device_fixed_gib: Optional[float] = None   # per rank, device memory outside the modelled tensors, allocator reserve
    #                                            and NCCL buffers (CUDA context and what the model misses); replaces the
    #                                            constants' cuda_context_gib (CPU workers: cpu_worker_runtime_gib)
    host_process_gib: Optional[float] = None   # per rank, host memory of a training process before offload buffers;
    #                                            replaces the constants' cpu_process_gib when set


@dataclass
class ClusterConfig:
    """A cluster of identical nodes. ``cluster: <preset>`` loads cluster_configs/<preset>.yaml.

    Bandwidths are achievable bus bandwidths per GPU in GB/s (nccl-tests convention);
    ``inter_node_bandwidth_gbs`` is the share of one GPU (node NIC bandwidth / gpus_per_node).
    """
    name: str = "custom"
    nodes: int = 1
    gpus_per_node: int = MISSING
    accelerator: Accelerator = Accelerator.GPU
    gpu: GPUSpec = field(default_factory=GPUSpec)
    intra_node_bandwidth_gbs: float = MISSING
    inter_node_bandwidth_gbs: float = MISSING
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 20.0
    pcie_bandwidth_gbs: float = MISSING     # host <-> device, per GPU, pinned memory
    # per node, what a job may use: inside a container, its cgroup's limits (`local` reads them:
    # config/node_limits.py)
    cpu_memory_gib: float = MISSING
    cpu_cores: int = MISSING
    # OpenMP threads of a rank doing CPU math (DeepSpeed's CPU Adam with optimizer offload, a
    # zeroth-order model built on the host); None: what `meshpilot run`'s gang gives a rank, the
    # node's cores shared by its GPUs, at most 8. Read by the gang, the exported launch scripts
    # (OMP_NUM_THREADS) and the simulator's CPU Adam time.
    cpu_threads_per_rank: Optional[int] = None
    # the fraction of a node's memory its processes may use before Ray's memory monitor kills a worker
    # (the raylet's memory_usage_threshold, RAY_memory_usage_threshold: 0.95 by default; it compares the
    # node's MemTotal - MemAvailable with this fraction of MemTotal, or a memory cgroup's usage without file
    # pages with this fraction of its limit where that is lower). A plan fits the host when its host
    # memory per node is at most memory_usage_threshold x cpu_memory_gib.
    memory_usage_threshold: float = 0.95
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class DatasetConfig:
    """How ``train.data`` is read when it names a local dataset (.txt, .jsonl/.json, .parquet or a
    folder of them); see :mod:`meshpilot.orchestrator.data`."""
    format: DataFormat = DataFormat.AUTO
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    tokenizer: Optional[str] = None         # folder with tokenizer.json, or "byte"; default model.path (else byte)
    mask_prompt: bool = True                # prompt / non-assistant tokens are left out of the loss
    add_eos: bool = True                    # EOS after every document
    cache_dir: Optional[str] = None         # default: <train.output_dir>/data_cache
    eval_fraction: float = 0.0              # the last fraction of records held out for evaluation
    eval_data: Optional[str] = None         # or a separate evaluation dataset


@dataclass
class TrainConfig:
    seq_len: int = 2048
    global_batch: int = 16                  # sequences per optimizer step
    precision: Precision = Precision.BF16
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = 1.0e-5
    steps: int = 100
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 1234
    zo_eps: float = 1.0e-3                  # perturbation scale of zeroth-order steps
    data: str = "synthetic"                 # synthetic | demo | a token file | a dataset file or folder
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    eval_every: int = 0                     # validation loss every this many steps and at the end (0: off)
    eval_batches: int = 0                   # global batches of the eval split per evaluation (0: all of it)
    checkpoint_every: int = 0               # 0: only at the end
    checkpoint_final: bool = True           # checkpoint after the last step (false: e.g. benchmarks)
    keep_checkpoints: int = 2               # complete checkpoints kept in RUN_DIR/checkpoints (>= 1)
    output_dir: str = "runs"
    export: ExportFormat = ExportFormat.NONE  # hf: write a Hugging Face model directory after the last step
    export_dir: Optional[str] = None        # default: RUN_DIR/export
    export_dtype: Precision = Precision.FP32  # fp32: DeepSpeed's fp32 master weights where it keeps them
    # PyTorch's caching allocator in expandable-segments mode (one growing virtual segment per stream,
    # PYTORCH_ALLOC_CONF expandable_segments:True) instead of its default (one cudaMalloc segment per
    # request that no cached block fits); set by the worker before its first CUDA allocation, unless the
    # environment names expandable_segments. The simulator's reserve model is that of the default mode:
    # measured with expandable segments the reserve was 0.2-18.6 GiB on 8 runs, not lower, and the
    # predictions miss by up to 21% there (benchmarks/results/2026-11-30-s2-h200x2).
    expandable_segments: bool = False
    # The caching allocator's max_split_size_mb (PYTORCH_ALLOC_CONF): cached blocks larger than this are never split
    # to serve smaller requests, so a segment freed whole (the optimizer step's flat fp32 copy) stays whole for the
    # next step or can be returned to the driver; unset: torch's default (any block may be split). Set by the
    # worker with expandable_segments, unless the environment names it. Measured with 512 on 2 x H200: three plans
    # that ran out of memory at their second step in the default mode ran (at the card, by releasing cached
    # segments), and four plans away from the edge reserved 3-25 GiB more; the simulator models the default mode
    # (benchmarks/results/2026-11-30-s5-h200x2).
    max_split_size_mb: Optional[int] = None
    # Record the CUDA caching allocator's history on every GPU rank (every allocation with the Python code that made
    # it, which requests made new segments) and write a JSON summary to RUN_DIR/memory/rank<R>.json when the run ends,
    # out of memory included (orchestrator/train/memory_history.py). For diagnosis: recording slows the step, and on
    # torch 2.11 every run of an expert model or of ZeRO-3 with activation checkpointing failed in its first backward
    # with it on (SystemError from autograd's engine, in the recomputed block's custom autograd Function; four of four,
    # the same plans run without it; dense ZeRO 0-2, tp=2 and ZeRO-3 runs without checkpointing recorded fine), so
    # `meshpilot run` refuses that combination (run/session.py check_recording).
    memory_history: bool = False
    # Raw DeepSpeed config keys merged over the generated config (logged); e.g. {"zero_optimization":
    # {"reduce_bucket_size": 1e8}}. Nested mappings merge key by key.
    deepspeed_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ZOPlanConfig:
    mode: Optional[ZOMode] = None           # default none (mezo when train.optimizer is zo-sgd)
    pertp: Optional[int] = None             # perturbation parallel degree, one of ZO_PERTP (default 1)
    dp: Optional[int] = None                # zeroth-order data parallel degree (default 1)


@dataclass
class PlanConfig:
    """The parallel layout as the user wrote it. ``plan: auto`` sets ``auto``."""
    auto: bool = False
    dp: Optional[int] = None                # default: every GPU not used by tp
    tp: Optional[int] = None                # default 1
    ep: Optional[int] = None                # default 1
    zero_stage: Optional[int] = None        # one of ZERO_STAGES (default 0)
    offload_optimizer: Optional[Offload] = None  # default none
    offload_params: Optional[Offload] = None     # default none; needs zero_stage 3
    micro_batch: Optional[int] = None       # default: global_batch / dp (no accumulation)
    activation_checkpointing: Optional[Checkpointing] = None  # default none
    sequence_parallel: Optional[bool] = None  # default false; only with tp > 1
    zo: ZOPlanConfig = field(default_factory=ZOPlanConfig)
    # DeepSpeed's overlap_comm (ZeRO >= 1): ``auto`` (None, the default) lets ``plan: auto`` choose per plan
    # (a fixed plan section keeps false, the lean setting); true/false fix it. The loader maps ``auto`` to None
    comm_overlap: Optional[bool] = None


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
