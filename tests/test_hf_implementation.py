"""``model.implementation: hf``: transformers' model class run by the worker, and modelled by the simulator.

- The worker builds ``AutoModelForCausalLM`` with the checkpoint's weights under ZeRO-2 and
  ZeRO-3 (2 gloo ranks, the parameters partitioned as they are created), the latter also with activation
  checkpointing: the first step's loss is the Hugging Face model's on the same batch, and every plan trains to
  the same losses as the built-in model started from the same checkpoint (same weights, same data, same optimizer).
- Plans it cannot run (tensor or expert parallel, zeroth order) and ``train.export: hf`` exit 2
  naming the key; the planner then never proposes them.
- The simulator adds the loaded model's allocator hole (``model_load_fragmentation`` x w x P_r) for
  ``hf`` only: the difference of the two predictions is that term, by hand.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402

from meshpilot.orchestrator.config.loader import job_from_dict, load_job  # noqa: E402
from meshpilot.orchestrator.errors import ConfigError  # noqa: E402
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan  # noqa: E402

TRAIN = {"seq_len": 16, "global_batch": 4, "steps": 3, "precision": "fp32", "lr": 1e-3, "data": "synthetic",
         "seed": 5, "checkpoint_final": False, "warmup_steps": 0}
PLANS = {"zero2": {"dp": 2, "zero_stage": 2}, "zero3": {"dp": 2, "zero_stage": 3},
         # the decoder layers recomputed in the backward (transformers' checkpointing) under ZeRO-3's gathered parameters
         "zero3_ac": {"dp": 2, "zero_stage": 3, "activation_checkpointing": "full"}}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(11)
    d = tmp_path_factory.mktemp("hf") / "llama"
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(d), safe_serialization=True)
    return d


def _job(directory, plan, implementation):
    return job_from_dict({"model": {"path": str(directory), "implementation": implementation}, "cluster": "local",
                          "train": TRAIN, "plan": plan}, ["cluster.gpus_per_node=4"])


def _worker(rank: int, world: int, directory: str, tmp: str) -> dict:
    from train_utils import run
    out = {}
    for impl in ("hf", "builtin"):
        for name, plan in PLANS.items():
            out[f"{impl}_{name}"] = run(_job(directory, plan, impl), rank, world, f"{tmp}/{impl}_{name}",
                                        resume=False)["losses"]
    return out


@pytest.mark.slow
def test_transformers_model_trains_like_the_builtin_one_from_the_same_checkpoint(llama_dir, tmp_path):
    from test_hf_checkpoint import _hf_batch_loss
    res = run_distributed(_worker, 2, str(llama_dir), str(tmp_path), timeout=900)
    want = _hf_batch_loss(llama_dir, _job(llama_dir, PLANS["zero2"], "hf"), dp=2)
    for name in PLANS:
        hf, builtin = res[0][f"hf_{name}"], res[0][f"builtin_{name}"]
        assert hf == res[1][f"hf_{name}"] and len(hf) == 3
        assert hf[0] == pytest.approx(want, rel=1e-5, abs=1e-5), (name, hf, want)
        assert hf == pytest.approx(builtin, rel=1e-4, abs=1e-4), (name, hf, builtin)
        assert hf[2] != hf[0]


def test_plans_it_cannot_run_and_export_exit_2(llama_dir):
    job = _job(llama_dir, PLANS["zero2"], "hf")
    for plan, key in ((Plan(dp=2, tp=2), "model.implementation"), (Plan(dp=2, ep=2), "model.implementation")):
        with pytest.raises(ConfigError, match=key):
            plan.check(job.model, job.train, job.cluster)
    zo = job_from_dict({"model": {"path": str(llama_dir), "implementation": "hf"}, "cluster": "local",
                        "train": {**TRAIN, "optimizer": "zo-sgd"}, "plan": {"zo": {"mode": "mezo"}}},
                       ["cluster.gpus_per_node=4"])
    with pytest.raises(ConfigError, match="model.implementation"):
        resolve_plan(zo).check(zo.model, zo.train, zo.cluster)
    from meshpilot.orchestrator.sim.planner import search
    auto = job_from_dict({"model": {"path": str(llama_dir), "implementation": "hf"}, "cluster": "local",
                          "train": TRAIN, "plan": "auto"}, ["cluster.gpus_per_node=4"])
    res = search(auto)
    plans = [res.arrays.plan(i) for i in range(res.arrays.n)]
    assert plans and all(p.tp == 1 and p.ep == 1 and not p.zeroth_order for p in plans)
    with pytest.raises(ConfigError, match="train.export"):
        job_from_dict({"model": {"path": str(llama_dir), "implementation": "hf"}, "cluster": "local",
                       "train": {**TRAIN, "export": "hf"}, "plan": PLANS["zero2"]}, ["cluster.gpus_per_node=4"])


def test_simulator_adds_the_loaded_model_hole_for_hf_only():
    """The loaded model's per-parameter blocks (hole = model_load_fragmentation x w P_r) serve the activation
    phase, not the step's flat buffers: where the hole exceeds the activation phase (acts + working) and the
    step phase is at least the activation phase, hf reserves (hole - activation phase) x (1 + fragmentation)
    more than the built-in model."""
    from meshpilot.orchestrator.config.models import param_counts
    from meshpilot.orchestrator.plan.codec import PlanArrays
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.memory import activation_terms, model_terms
    from meshpilot.orchestrator.sim.simulator import simulate
    C = SimulatorConstants()
    # two micro-batches a step, so that the gradient partition is static (without accumulation ZeRO-2 allocates it in
    # each backward: sim/memory.py)
    job = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=16", "plan.dp=4",
                          "plan.zero_stage=2", "plan.micro_batch=2", "plan.activation_checkpointing=full"])
    builtin = simulate(job)
    arr = PlanArrays.from_plans([resolve_plan(job)], 4)
    acts, working = (float(x[0]) for x in activation_terms(model_terms(job.model), job.train.seq_len, arr, C))
    job.model.implementation = "hf"
    hf = simulate(job)
    P = param_counts(job.model).total
    hole = C.model_load_fragmentation * 2.0 * P                  # bf16, tp = 1: P_r = every parameter
    step = 6.0 * P / 4                                            # flat 16-bit partition + its fp32 copy
    assert hole > acts + working and step >= acts + working
    want = (hole - acts - working) * (1 + C.fragmentation) / 2**30
    assert hf.peak_memory_gib - builtin.peak_memory_gib == pytest.approx(want, rel=1e-9)
    # the hf loss keeps 2 bytes per logit fewer in the activation phase (hf_logits_saved_bytes); the peak
    # (hole-bound here) and the allocated peak (the step's) do not move
    less = (C.logits_saved_bytes - C.hf_logits_saved_bytes) * 2 * 2048 * job.model.vocab / 2**30
    assert builtin.memory_breakdown_gib["activations"] - hf.memory_breakdown_gib["activations"] \
        == pytest.approx(less, rel=1e-9)
    assert hf.memory_breakdown_gib["framework_overhead"] - builtin.memory_breakdown_gib["framework_overhead"] \
        == pytest.approx(want, rel=1e-9)


def test_the_hf_loss_saves_only_the_fp32_log_softmax():
    """strategies/hf_adapter.py's loss (``cross_entropy(logits.float())``, as transformers' own): of the tensors
    autograd keeps for the backward, those of the logits' size are the fp32 log-softmax output alone, 4 bytes per
    token and vocabulary entry (hf_logits_saved_bytes); the built-in loss keeps its fp32 softmax, also 4, and
    forms 14 bytes per logit at its forward's peak (logits_saved_bytes + logits_backward_bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.strategies.hf_adapter import CausalLMLoss
    C = SimulatorConstants()
    T, V = 256, 4096
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=T, use_cache=False)
    torch.manual_seed(0)
    model = CausalLMLoss(LlamaForCausalLM(cfg).to(torch.bfloat16)).train()
    ids = torch.randint(0, V, (1, T))
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids)
    big = [(n, dt) for n, dt in saved.values() if n >= T * V]        # logit-sized storages
    assert big == [(4 * T * V, torch.float32)]
    assert sum(n for n, _ in big) / (T * V) == C.hf_logits_saved_bytes
    loss.backward()
    assert C.hf_logits_saved_bytes + C.logits_backward_bytes == 12.0
    assert C.logits_saved_bytes + C.logits_backward_bytes == 14.0


def test_no_loaded_model_hole_under_zero3():
    """Under ZeRO-3 the worker builds transformers' model inside ``deepspeed.zero.Init``, which partitions each
    parameter as it is created: the whole model never sits on the GPU as per-parameter tensors, so hf leaves no
    hole there: its prediction is the same with ``model_load_fragmentation`` at 0, where at ZeRO-2 it is not."""
    import dataclasses

    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.simulator import simulate
    no_hole = dataclasses.replace(SimulatorConstants(), model_load_fragmentation=0.0)
    out = {}
    for stage in (2, 3):
        job = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=16", "plan.dp=4",
                              f"plan.zero_stage={stage}", "plan.micro_batch=2", "plan.activation_checkpointing=full",
                              "model.implementation=hf"])
        out[stage] = simulate(job).peak_memory_gib - simulate(job, constants=no_hole).peak_memory_gib
    assert out[3] == 0.0 and out[2] > 1.0
