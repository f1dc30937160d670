"""Cluster presets (cluster_configs/*.yaml, installed as package data) and local detection."""
from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from meshpilot.orchestrator.config.node_limits import node_cpu_cores, node_memory
from meshpilot.orchestrator.errors import ConfigError

# Datasheet numbers for GPUs that `local` detection recognises by NVML name.
_KNOWN_GPUS = {
    "H100": dict(name="H100-SXM5-80GB", bf16_tflops=989.4, fp16_tflops=989.4, fp32_tflops=66.9,
                 memory_bandwidth_gbs=3350),
    "H200": dict(name="H200-SXM-141GB", bf16_tflops=989.4, fp16_tflops=989.4, fp32_tflops=66.9,
                 memory_bandwidth_gbs=4800),
    "A100": dict(name="A100", bf16_tflops=312, fp16_tflops=312, fp32_tflops=19.5,
                 memory_bandwidth_gbs=1555),
}


def _preset_dir():
    return resources.files("meshpilot.cluster_configs")


def cluster_preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_preset_name(name: str) -> bool:
    """A plain preset name: letters, digits, ``-_.``, no path separator and no ``..``."""
    return bool(PRESET_NAME.fullmatch(name)) and ".." not in name


def _is_yaml_file(name: str) -> bool:
    if not name.endswith((".yaml", ".yml")):
        return False
    try:
        return Path(name).is_file()
    except OSError:          # a name too long for the OS, or a path through a file
        return False


def read_cluster_yaml(path: Any, name: str) -> Any:
    """A cluster YAML file's data; ConfigError (key ``cluster``) if it is not UTF-8 or not YAML."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("cluster", name, reason=f"is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError("cluster", name, reason=f"cannot be read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:300]
        raise ConfigError("cluster", name, reason=f"is not valid YAML: {first}") from None


def cluster_preset(name: str) -> dict[str, Any]:
    """The preset as a plain mapping of ClusterConfig fields (``local`` is detected).

    ``name`` is a preset only when it is a plain name (:func:`is_preset_name`), and a file only
    when it names an existing ``.yaml``/``.yml`` file; anything else is a ConfigError (so
    ``cluster: ../../x`` cannot load a YAML file outside the preset folder as a preset)."""
    if _is_yaml_file(name):
        data = read_cluster_yaml(Path(name), name)
    elif is_preset_name(name) and (_preset_dir() / f"{name}.yaml").is_file():
        data = read_cluster_yaml(_preset_dir() / f"{name}.yaml", name)
    else:
        raise ConfigError("cluster", name, reason="unknown cluster preset" if is_preset_name(name) else
                          "is neither a plain preset name nor an existing .yaml/.yml file",
                          fix="use one of " + ", ".join(cluster_preset_names())
                          + ", a path to a cluster YAML, or an inline mapping with at least nodes and gpus_per_node")
    if not isinstance(data, dict):
        raise ConfigError("cluster", name, reason="a cluster file must hold a mapping")
    if data.get("name") == "local":
        data = detect_local(data)
    return data


MAX_THREADS_PER_GPU_RANK = 8


def cpu_threads_per_gpu_rank(cpu_cores: int, gpus_per_node: int) -> int:
    """CPU cores (OpenMP threads for CPU math) that `meshpilot run` gives each GPU rank: the
    node's cores shared by its GPUs, at most 8. The Ray gang's bundles use it and so does the
    simulator's CPU Adam time."""
    return max(1, min(MAX_THREADS_PER_GPU_RANK, int(cpu_cores) // max(1, int(gpus_per_node))))


def threads_per_rank(cpu_cores: int, gpus_per_node: int, explicit: int | None = None) -> int:
    """OpenMP threads of a rank that does CPU math: ``cluster.cpu_threads_per_rank`` when set,
    else :func:`cpu_threads_per_gpu_rank`. The one rule for the gang, the launch scripts and the
    simulator."""
    return int(explicit) if explicit else cpu_threads_per_gpu_rank(cpu_cores, gpus_per_node)


def detect_local(base: dict[str, Any]) -> dict[str, Any]:
    """Fill the local preset from this machine: NVML GPUs if any, else CPU workers."""
    out = dict(base, gpu=dict(base.get("gpu", {})))
    mem_gib = _host_memory_gib()
    cores = node_cpu_cores()
    out["cpu_cores"], out["cpu_memory_gib"] = cores, round(mem_gib, 1)
    gpus = nvml_gpus()
    if gpus:
        name, total_bytes = gpus[0]
        out.update(accelerator="gpu", gpus_per_node=len(gpus))
        known = next((v for k, v in _KNOWN_GPUS.items() if k in name), None)
        out["gpu"].update(known or dict(name=name))
        out["gpu"]["memory_gib"] = round(total_bytes / 2**30, 1)
        out.update(intra_node_bandwidth_gbs=300 if known else 20, pcie_bandwidth_gbs=25,
                   intra_node_latency_us=10)
    else:
        workers = max(1, min(4, cores))
        out.update(accelerator="cpu", gpus_per_node=workers)
        out["gpu"]["memory_gib"] = round(mem_gib / workers, 1)
    return out


def _host_memory_gib() -> float:
    """The node's memory a job may use (a memory cgroup's limit where it is below MemTotal), GiB."""
    m = node_memory()
    if m is not None:
        return m.total_bytes / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 16.0


def nvml_gpus() -> list[tuple[str, int]]:
    """(name, total memory bytes) per visible GPU via NVML; empty when NVML or GPUs are absent."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append((name.decode() if isinstance(name, bytes) else name,
                        int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            idx = [int(x) for x in visible.split(",") if x.strip().isdigit()]
            out = [out[i] for i in idx if i < len(out)]
        return out
    finally:
        pynvml.nvmlShutdown()
