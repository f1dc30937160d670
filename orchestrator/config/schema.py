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


class Arch(Choice):
    LLAMA = "llama"
    GPT2 = "gpt2"
    OPT = "opt"
    MIXTRAL = "mixtral"


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


ZERO_STAGES = (0, 1, 2, 3)
ZO_PERTP = (1, 2)


@dataclass
class ModelConfig:
    """Decoder-only transformer dimensions. ``model: <preset>`` or a HF config.json path also work."""
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


@dataclass
class GPUSpec:
    """One accelerator. FLOP/s are dense peak (no sparsity); bandwidths in GB/s (1e9 B/s)."""
    name: str = "generic"
    memory_gib: float = MISSING
    bf16_tflops: float = MISSING
    fp16_tflops: float = MISSING
    fp32_tflops: float = MISSING
    memory_bandwidth_gbs: float = MISSING


@dataclass
class SlurmSettings:
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: Optional[str] = None        # Slurm syntax, e.g. "04:00:00"
    qos: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)


@dataclass
class KubernetesSettings:
    namespace: Optional[str] = None
    image: Optional[str] = None
    tolerations: List[Dict[str, str]] = field(default_factory=list)
    node_selector: Dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"


@dataclass
class CalibrationConfig:
    """Measured rates that replace datasheet numbers (written by ``meshpilot probe``; None = not measured)."""
    measured_on: Optional[str] = None          # card and date of the measurement
    matmul_tflops: Optional[float] = None      # achieved bf16 TFLOP/s on transformer-shaped products
    allreduce_busbw_gbs: Optional[float] = None
    allgather_busbw_gbs: Optional[float] = None
    reducescatter_busbw_gbs: Optional[float] = None
    alltoall_busbw_gbs: Optional[float] = None
    collective_latency_us: Optional[float] = None
    h2d_gbs: Optional[float] = None            # pinned host -> device
    d2h_gbs: Optional[float] = None            # device -> pinned host
    cpu_adam_gparams_per_s: Optional[float] = None  # DeepSpeed CPUAdam, billions of parameters per second per node


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
    cpu_memory_gib: float = MISSING         # per node
    cpu_cores: int = MISSING                # per node
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


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
    data: str = "synthetic"                 # synthetic | demo | path to a token file
    checkpoint_every: int = 0               # 0: only at the end
    checkpoint_final: bool = True           # checkpoint after the last step (false: e.g. benchmarks)
    keep_checkpoints: int = 2               # complete checkpoints kept in RUN_DIR/checkpoints (>= 1)
    output_dir: str = "runs"
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


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
