"""The per-rank training runtime: the worker entry point (:mod:`.worker`), the training loop and its
engines, checkpoints, data, metrics, preemption and the learning-rate schedule. The only part of the
orchestrator that imports torch and DeepSpeed."""
