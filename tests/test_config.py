"""Job configuration: loading, overrides, presets, strictness and error messages."""
from __future__ import annotations

import json

import pytest

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.loader import dump_job, job_from_dict, load_job

BASE = {
    "model": {"arch": "llama", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "ffn": 11008,
              "vocab": 32000, "tie_embeddings": False},
    "cluster": "h100-sxm-4",
    "train": {"seq_len": 2048, "global_batch": 16, "precision": "bf16", "optimizer": "adamw", "lr": 1.0e-5,
              "steps": 100},
    "plan": {"dp": 4, "tp": 1, "ep": 1, "zero_stage": 2, "offload_optimizer": "none", "offload_params": "none",
             "micro_batch": 4, "activation_checkpointing": "none", "zo": {"mode": "none", "pertp": 1, "dp": 1}},
}


def test_issue_example_loads_with_every_documented_key(tmp_path):
    import yaml
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(BASE))
    job = load_job(f)
    assert job.model.hidden == 4096 and job.model.kv_heads == 32 and job.model.tie_embeddings is False
    assert job.cluster.name == "h100-sxm-4" and job.cluster.gpus_per_node == 4
    assert job.train.lr == pytest.approx(1e-5) and job.plan.zero_stage == 2 and job.plan.zo.mode == "none"


def test_round_trip_through_yaml(tmp_path):
    job = job_from_dict(BASE, ["plan.zero_stage=3", "train.lr=3e-4"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_job(job))
    again = load_job(f)
    assert again == job
    assert again.plan.zero_stage == 3 and again.train.lr == pytest.approx(3e-4)


def test_overrides_apply_left_to_right_after_presets():
    job = job_from_dict(BASE, ["cluster=dgx-h100", "cluster.nodes=128", "plan.dp=8"])
    assert job.cluster.name == "dgx-h100" and job.cluster.nodes == 128 and job.cluster.gpus_per_node == 8
    # the other order: the preset replaces the earlier field override
    job = job_from_dict(BASE, ["cluster.nodes=128", "cluster=dgx-h100"])
    assert job.cluster.nodes == 4


def test_model_preset_and_inline_cluster():
    job = job_from_dict({"model": "llama-2-7b", "cluster": {
        "nodes": 2, "gpus_per_node": 8, "gpu": {"memory_gib": 80, "bf16_tflops": 989, "fp16_tflops": 989,
                                                 "fp32_tflops": 67, "memory_bandwidth_gbs": 3350},
        "intra_node_bandwidth_gbs": 400, "inter_node_bandwidth_gbs": 45, "pcie_bandwidth_gbs": 50,
        "cpu_memory_gib": 1024, "cpu_cores": 96}})
    assert job.model.layers == 32 and job.model.name == "llama-2-7b"
    assert job.cluster.nodes * job.cluster.gpus_per_node == 16


def test_plan_auto_and_constraints():
    job = job_from_dict({**BASE, "plan": "auto"}, ["plan.zero_stage=3"])
    assert job.plan.auto is True and job.plan.zero_stage == 3 and job.plan.dp is None


def test_hf_config_json(tmp_path):
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
           "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 1000, "max_position_embeddings": 512,
           "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    job = job_from_dict({"model": str(p), "cluster": "h100-sxm-4"})
    m = job.model
    assert (m.arch, m.layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab) == ("llama", 4, 256, 8, 2, 688, 1000)
    assert m.norm_eps == pytest.approx(1e-6)


def test_derived_model_defaults():
    job = job_from_dict({"model": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 100},
                         "cluster": "h100-sxm-4", "train": {"seq_len": 128}})
    assert job.model.ffn == 256 and job.model.kv_heads == 4 and job.model.tie_embeddings is True
    job = job_from_dict({"model": {"arch": "llama", "layers": 2, "hidden": 4096, "heads": 32, "vocab": 100},
                         "cluster": "h100-sxm-4"})
    assert job.model.ffn == 11008          # LLaMA's 2/3*4h rounded to 256 reproduces llama-2-7b's width


@pytest.mark.parametrize("overrides, key, words", [
    (["plan.foo=1"], "plan.foo", ["unknown key", "zero_stage"]),
    (["model.hiden=10"], "model.hiden", ["unknown key", "did you mean 'hidden'"]),
    (["cluster.gpu.memry_gib=10"], "cluster.gpu.memry_gib", ["unknown key", "memory_gib"]),
    (["trian.lr=1"], "trian.lr", ["unknown section", "train"]),
    (["model.layers=abc"], "model.layers", ["Integer"]),
    (["train.precision=fp8"], "train.precision", ["fp8", "bf16, fp16, fp32"]),
    (["train.optimizer=adam"], "train.optimizer", ["adamw, sgd, zo-sgd"]),
    (["plan.zero_stage=4"], "plan.zero_stage", ["0, 1, 2, 3"]),
    (["plan.offload_optimizer=nvme"], "plan.offload_optimizer", ["none, cpu"]),
    (["plan.activation_checkpointing=some"], "plan.activation_checkpointing", ["none, full"]),
    (["plan.zo.mode=spsa"], "plan.zo.mode", ["none, mezo, zo2"]),
    (["plan.zo.pertp=3"], "plan.zo.pertp", ["1, 2"]),
    (["model.hidden=100"], "model.hidden", ["divisible by model.heads=32"]),
    (["model.kv_heads=5"], "model.kv_heads", ["must divide model.heads=32"]),
    (["train.global_batch=0"], "train.global_batch", ["positive"]),
    (["train.lr=-1"], "train.lr", ["positive"]),
    (["model=llama-9b"], "model", ["unknown model preset", "llama-2-7b"]),
    (["cluster=h200-99"], "cluster", ["unknown cluster preset", "dgx-h100"]),
    (["plan=manual"], "plan", ["'auto'"]),
    (["plan.dp"], "plan.dp", ["key=value"]),
    (["model.num_experts=4", "model.top_k=5"], "model.top_k", ["between 1 and model.num_experts=4"]),
])
def test_rejected_inputs_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        job_from_dict(BASE, overrides)
    msg = str(e.value)
    assert e.value.key == key, msg
    assert msg.startswith(key), msg
    for w in words:
        assert w in msg, msg


def test_missing_required_dimension():
    with pytest.raises(ConfigError) as e:
        job_from_dict({"model": {"arch": "llama", "layers": 2, "heads": 4, "vocab": 10}, "cluster": "h100-sxm-4"})
    assert e.value.key == "model.hidden" and "required" in str(e.value)


def test_seq_len_beyond_learned_positions():
    with pytest.raises(ConfigError) as e:
        job_from_dict({"model": "gpt2", "cluster": "h100-sxm-4", "train": {"seq_len": 2048}})
    assert e.value.key == "train.seq_len" and "1024" in str(e.value)


def test_mixtral_needs_experts():
    with pytest.raises(ConfigError) as e:
        job_from_dict({"model": {"arch": "mixtral", "layers": 2, "hidden": 64, "heads": 4, "vocab": 10},
                       "cluster": "h100-sxm-4"})
    assert e.value.key == "model.num_experts"


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_job(f)
    assert "cannot parse" in str(e.value)
    with pytest.raises(ConfigError):
        load_job(tmp_path / "missing.yaml")
    f.write_text("- a list\n")
    with pytest.raises(ConfigError) as e:
        load_job(f)
    assert "mapping" in str(e.value)


def test_choices_are_enums_that_read_and_print_as_their_values(tmp_path):
    """A choice field holds a member of its enum, equal to (and printing, hashing, JSON-encoding as) the
    lowercase value a job file gives; the resolved YAML writes the values, and loading it gives the same job."""
    import dataclasses

    from meshpilot.orchestrator.config.loader import job_to_dict
    from meshpilot.orchestrator.config.schema import Offload, Optimizer, Precision, ZOMode
    job = job_from_dict(BASE, ["plan.offload_optimizer=cpu", "train.optimizer=adamw"])
    t, p = job.train, job.plan
    assert t.precision is Precision.BF16 and t.precision == "bf16" and f"{t.precision}" == "bf16"
    assert str(p.offload_optimizer) == "cpu" and {"cpu": 1}[p.offload_optimizer] == 1
    assert p.offload_optimizer is Offload.CPU and p.zo.mode is ZOMode.NONE and t.optimizer is Optimizer.ADAMW
    assert json.loads(json.dumps(dataclasses.asdict(job)))["plan"]["offload_optimizer"] == "cpu"
    plain = job_to_dict(job)
    assert type(plain["train"]["precision"]) is str and plain["model"]["arch"] == "llama"
    text = dump_job(job)
    assert "precision: bf16" in text and "offload_optimizer: cpu" in text and "mode: none" in text
    f = tmp_path / "job.yaml"
    f.write_text(text)
    assert load_job(f) == job


def test_choice_member_names_are_not_values():
    with pytest.raises(ConfigError) as e:
        job_from_dict(BASE, ["plan.offload_optimizer=CPU"])
    assert e.value.key == "plan.offload_optimizer" and e.value.allowed == ["none", "cpu"]


def test_a_recorded_job_whose_weights_folder_is_gone_keeps_its_shape(tmp_path):
    """A run's job.yaml names the folder its weights came from; reading the run back elsewhere
    (status, calibrate, export) must not need that folder: the recorded shape stands. A job file
    given to `run` still refuses a missing folder."""
    from meshpilot.orchestrator.config.loader import dump_job, load_job
    job = load_job(None, ["model=tiny-llama", "cluster=local"])
    job.model.path = str(tmp_path / "gone")
    (tmp_path / "job.yaml").write_text(dump_job(job))
    back = load_job(tmp_path / "job.yaml", recorded=True)
    assert back.model.path is None and (back.model.layers, back.model.hidden) == (job.model.layers, job.model.hidden)
    with pytest.raises(ConfigError, match="model.path"):
        load_job(tmp_path / "job.yaml")
