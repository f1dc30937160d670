"""meshpilot.launch: local, Ray, Slurm, Kubernetes and MPI backends."""
