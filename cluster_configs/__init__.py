"""Cluster presets: one YAML file per cluster, loaded by name (``cluster: dgx-h100``)."""
