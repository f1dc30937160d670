"""meshpilot.launch: runs a job's ranks as one gang of Ray actors.

* :mod:`.gang`: the gang's arithmetic (bundles, rank order, local ranks, OpenMP threads,
  failure-injection spec), without Ray;
* :mod:`.actor`: the Ray actor that runs one rank's worker function;
* :mod:`.group`: :class:`~meshpilot.launch.group.RayWorkerGroup`, the controller's worker group on Ray;
* :mod:`.ray_cluster`: connecting the driver to a Ray cluster, or starting an embedded one.

Ray is the only backend. The controller side is :mod:`meshpilot.orchestrator.run`; this package
depends on its :mod:`~meshpilot.orchestrator.run.protocol`, never on its controller.
"""
