"""meshpilot's orchestrator, in layers; a module imports only from its own layer or lower ones.

- :mod:`.errors`, :mod:`.atomic_io`: user-facing errors and crash-safe file writes (no dependencies).
- :mod:`.config`: the job schema, its loader and the model and cluster presets (pure).
- :mod:`.plan`: the :class:`~.plan.plan.Plan`, its columnar codec and text forms (pure).
- :mod:`.sim`: memory and step-time models, the simulator and the planner (pure numpy).
- :mod:`.run`: the driver: controller state machine, its protocol with worker groups, the run store
  (never imports torch).
- :mod:`.train`: the per-rank training runtime (the only part of the orchestrator that imports torch
  and DeepSpeed, with :mod:`meshpilot.strategies`).
- :mod:`.cli`: one module per ``meshpilot`` command (argparse and printing).

``python -m meshpilot.orchestrator.worker`` starts one training rank (:mod:`.train.worker`).
"""
