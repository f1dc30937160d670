"""The top-level keys of a DeepSpeed config, for checking ``train.deepspeed_extra``.

DeepSpeed ignores a top-level key it does not know (``zero_optimisation`` trains without ZeRO,
silently), so the loader refuses any key not listed here. The list is what DeepSpeed 0.19.8's
``DeepSpeedConfig`` reads from the top level of its dict (recorded by building configs with
fp16, bf16 and ZeRO-3, plus the sections read by the engine, the autotuner and the activation
checkpointing, AIO and flops-profiler configs); ``tests/test_hardening.py`` checks that every
key still occurs in the installed DeepSpeed's source. Kept here, not imported from DeepSpeed:
the configuration layer must not import it (seconds of start-up, and no DeepSpeed on a laptop
that only plans).
"""
from __future__ import annotations

DEEPSPEED_TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "legacy_fusion", "log_level",
    "lower_precision_safe_modules", "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer",
    "pipeline", "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients", "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
    "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size",
    "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})
