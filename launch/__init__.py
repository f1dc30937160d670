"""meshpilot.launch: runs a job's ranks as one gang of Ray actors, or submits the job to a cluster.

* :mod:`.gang`: the gang's arithmetic (bundles, rank order, local ranks, OpenMP threads,
  failure-injection spec), without Ray;
* :mod:`.actor`: the Ray actor that runs one rank's worker function;
* :mod:`.group`: :class:`~meshpilot.launch.group.RayWorkerGroup`, the controller's worker group on Ray;
* :mod:`.ray_cluster`: connecting the driver to a Ray cluster, or starting an embedded one.

``meshpilot submit`` hands the same job to the cluster's own scheduler instead; each backend
separates the pure generation of its artefacts from the calls that submit them:

* :mod:`.slurm`: an sbatch script (one torchrun per node, requeue on a signal) and sbatch/scancel;
* :mod:`.kubernetes`: Kubeflow Trainer v2 TrainJob, PyTorchJob, MPIJob and RayJob manifests,
  validated against the official CRD schemas, and the kubernetes client;
* :mod:`.mpi`: an Open MPI ``mpirun`` line (ranks find rank 0 through mpi4py);
* :mod:`.ray_job`: Ray's job submission API to an existing cluster.

The controller side is :mod:`meshpilot.orchestrator.run`; this package
depends on its :mod:`~meshpilot.orchestrator.run.protocol`, never on its controller.
"""
