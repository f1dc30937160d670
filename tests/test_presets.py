"""Presets: parameter counts computed from dimensions against published counts, cluster presets complete."""
from __future__ import annotations

import pytest

from meshpilot.orchestrator.config.clusters import cluster_preset, cluster_preset_names
from meshpilot.orchestrator.config.loader import job_from_dict
from meshpilot.orchestrator.config.models import model_preset_names, param_counts, published_params

PUBLISHED = [n for n in model_preset_names() if published_params(n)[0] is not None]


def _model(name):
    return job_from_dict({"model": name, "cluster": "h100-sxm-4", "train": {"seq_len": 8}}).model


def test_required_presets_exist():
    need = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "opt-125m", "opt-1.3b", "opt-2.7b", "opt-6.7b",
            "opt-13b", "opt-30b", "opt-66b", "opt-175b", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b",
            "mixtral-8x7b"}
    assert need <= set(model_preset_names())
    assert {"local", "h100-sxm-4", "dgx-h100", "a100-40gb-pcie"} <= set(cluster_preset_names())


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_published(name):
    total, active = published_params(name)
    pc = param_counts(_model(name))
    assert pc.total == pytest.approx(total, rel=0.01), f"{name}: {pc.total:,} vs {total:,.0f}"
    if active is not None:
        assert pc.active == pytest.approx(active, rel=0.01)


def test_gpt2_small_count_by_hand():
    # wte 50257*768 + wpe 1024*768 + 12 layers * (12 h^2 + 13 h) + final LayerNorm 2h (tied head)
    h = 768
    expected = 50257 * h + 1024 * h + 12 * (12 * h * h + 13 * h) + 2 * h
    assert param_counts(_model("gpt2")).total == expected == 124_439_808


def test_llama_gqa_count_by_hand():
    # llama-3-8b: attention q,o 4096^2 each, k,v 4096*1024 each; SwiGLU 3*4096*14336; 2 RMSNorms
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    expected = 32 * layer + 2 * 128256 * 4096 + 4096
    assert param_counts(_model("llama-3-8b")).total == expected


def test_mixtral_experts_and_active():
    pc = param_counts(_model("mixtral-8x7b"))
    assert pc.moe_layers == 32 and pc.dense_layers == 0
    assert pc.expert == 3 * 4096 * 14336
    assert pc.total - pc.active == 32 * 6 * pc.expert


def test_moe_every_other_layer():
    m = job_from_dict({"model": "tiny-mixtral", "cluster": "h100-sxm-4"}, ["model.layers=4", "model.moe_every=2"]).model
    pc = param_counts(m)
    assert (pc.moe_layers, pc.dense_layers) == (2, 2)


@pytest.mark.parametrize("name", ["h100-sxm-4", "dgx-h100", "a100-40gb-pcie", "slurm-dgx-h100", "k8s-h100", "local"])
def test_cluster_presets_validate(name):
    job = job_from_dict({"model": "tiny-llama", "cluster": name})
    c = job.cluster
    assert c.gpus_per_node >= 1 and c.gpu.memory_gib > 0 and c.gpu.bf16_tflops > 0
    assert c.intra_node_bandwidth_gbs > 0 and c.pcie_bandwidth_gbs > 0 and c.cpu_cores >= 1


def test_cluster_examples_carry_scheduler_settings():
    s = job_from_dict({"model": "tiny-llama", "cluster": "slurm-dgx-h100"}).cluster.slurm
    assert s.partition and s.account and s.time_limit
    k = job_from_dict({"model": "tiny-llama", "cluster": "k8s-h100"}).cluster.kubernetes
    assert k.namespace and k.image and k.tolerations[0]["key"] == "nvidia.com/gpu"


def test_local_detects_this_machine():
    import os
    d = cluster_preset("local")
    from meshpilot.orchestrator.config.node_limits import node_cpu_cores, node_memory
    assert d["cpu_cores"] == node_cpu_cores() <= (os.cpu_count() or 1)
    assert d["cpu_memory_gib"] == round(node_memory().total_bytes / 2**30, 1)
    if d["accelerator"] == "cpu":
        assert 1 <= d["gpus_per_node"] <= 4


def test_every_preset_number_has_a_source_comment():
    from importlib import resources
    for f in resources.files("meshpilot.cluster_configs").iterdir():
        if not f.name.endswith(".yaml") or f.name == "local.yaml":
            continue
        for line in f.read_text().splitlines():
            key = line.split(":")[0].strip()
            if key in ("memory_gib", "bf16_tflops", "fp16_tflops", "fp32_tflops", "memory_bandwidth_gbs",
                       "intra_node_bandwidth_gbs", "inter_node_bandwidth_gbs", "pcie_bandwidth_gbs",
                       "cpu_memory_gib", "cpu_cores"):
                assert "#" in line, f"{f.name}: {line!r} has no source comment"


def test_presets_never_truncate_names_in_a_pipe_or_a_narrow_terminal():
    """`meshpilot presets` piped with COLUMNS=40 (and on a 50-column terminal) prints every preset name
    whole, no ellipsis; a wide terminal still gets the rich table."""
    import io
    import os
    import shutil
    import subprocess
    import sys

    from rich.console import Console

    from meshpilot.orchestrator.cli.cmd_presets import MODEL_COLUMNS, model_rows, print_table

    cli = [shutil.which("meshpilot")] if shutil.which("meshpilot") else [sys.executable, "-m", "meshpilot.orchestrator.cli"]
    r = subprocess.run([*cli, "presets"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="40"))
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    first_cells = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert set(model_preset_names()) <= first_cells
    assert set(cluster_preset_names()) <= first_cells
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    assert rows["mixtral-8x7b"][7:9] == ["8x", "top2"]           # whole cells, not "8x…"

    narrow = Console(file=io.StringIO(), width=50, force_terminal=True, color_system=None)
    print_table(narrow, "models", MODEL_COLUMNS, model_rows())
    text = narrow.file.getvalue()
    assert "…" not in text and all(f"{n} " in text for n in model_preset_names())
    wide = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    print_table(wide, "models", MODEL_COLUMNS, model_rows())
    assert "┃ name" in wide.file.getvalue() and "…" not in wide.file.getvalue()


def test_qwen2_count_includes_qkv_biases(tmp_path):
    """Qwen2-0.5B's config.json (0.49B parameters in the Qwen2 report): the count by hand, with the q/k/v
    biases (896 + 2 * 128 per layer) that a llama-style count without them misses."""
    import json
    cfg = {"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
           "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
           "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = job_from_dict({"model": str(tmp_path / "config.json"), "cluster": "h100-sxm-4", "train": {"seq_len": 8}}).model
    assert m.qkv_bias and m.rope_theta == 1e6
    h, d, L = 896, 64, 24
    per_layer = 2 * h * h + 2 * h * 2 * d + (h + 2 * 2 * d) + 3 * h * 4864 + 2 * h
    assert param_counts(m).total == 151936 * h + L * per_layer + h == 494_032_768
