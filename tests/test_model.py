"""The built-in model: tensor-parallel (tp = 2, 4; with and without sequence parallelism;
llama with grouped-query attention and gpt2) against the single-process model built from
the same seed: initial weights, logits, loss and every parameter's gradient within 1e-5."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from meshpilot.comm.groups import build_process_groups
from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.config.models import model_preset, param_counts
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.strategies.model import apply_activation_checkpointing, build_model, decays, resolved_model_config

SEED = 11
B, S = 2, 16


def _cfg(name: str, **changes) -> ModelConfig:
    return resolved_model_config(dataclasses.replace(ModelConfig(**model_preset(name)), **changes))


MODELS = {
    "llama": _cfg("tiny-llama"),                                 # 4 heads, 2 kv heads (GQA), tp <= 2
    "llama8": _cfg("tiny-llama", heads=8, kv_heads=4),            # GQA that splits over tp = 4
    "gpt2": _cfg("tiny-gpt2"),                                    # tied embeddings, learned positions
    # MoE layer: capacity factor E/k = 2 guarantees that no token is dropped
    "mixtral": _cfg("tiny-mixtral", capacity_factor=2.0),
}
# (model, plan) per world size; every case is compared against the single-process model
CASES = {
    2: [("llama", Plan(dp=1, tp=2)), ("llama", Plan(dp=1, tp=2, sequence_parallel=True)),
        ("gpt2", Plan(dp=1, tp=2)), ("gpt2", Plan(dp=1, tp=2, sequence_parallel=True))],
    4: [("llama8", Plan(dp=1, tp=4)), ("llama8", Plan(dp=1, tp=4, sequence_parallel=True)),
        ("gpt2", Plan(dp=1, tp=4, sequence_parallel=True)),
        ("llama", Plan(dp=2, tp=2, sequence_parallel=True, activation_checkpointing="full")),
        ("mixtral", Plan(dp=2, tp=2, ep=2, sequence_parallel=True))],
}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[0, 4] = -100                                            # an ignored token inside the sequence
    return ids, labels


def _run(model, ids, labels) -> dict:
    logits = model(ids).detach()
    loss = model(ids, labels)
    loss.backward()
    return dict(logits=logits, loss=loss.detach(), params=model.full_state_dict(),
                grads=model.full_state_dict(grads=True),
                experts={n for n, p in model.named_parameters() if getattr(p, "meshpilot_expert", False)})


def _worker(rank: int, world: int, cases: list) -> list:
    out = []
    for name, plan in cases:
        cfg = MODELS[name]
        groups = build_process_groups(plan.layout(gpus_per_node=world))
        model = build_model(cfg, plan, groups, seed=SEED)
        out.append(_run(model, *_batch(cfg.vocab)))
    return out


def _reference(name: str) -> dict:
    cfg = MODELS[name]
    return _run(build_model(cfg, Plan(), None, seed=SEED), *_batch(cfg.vocab))


def _close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 1e-5, f"{what}: max abs difference {err:.3g}"


def _compare(got: dict, ref: dict, what: str, expert_grad_scale: float = 1.0):
    """``expert_grad_scale``: every rank of an expert-parallel group runs the same batch
    here, so each expert receives the tokens of ep identical replicas: ep x the gradient."""
    _close(got["logits"], ref["logits"], f"{what} logits")
    _close(got["loss"], ref["loss"], f"{what} loss")
    assert set(got["params"]) == set(ref["params"]) == set(ref["grads"]) == set(got["grads"])
    for k in ref["params"]:
        _close(got["params"][k], ref["params"][k], f"{what} initial {k}")
        scale = expert_grad_scale if k in ref["experts"] else 1.0
        _close(got["grads"][k], scale * ref["grads"][k], f"{what} grad {k}")
        assert ref["grads"][k].abs().sum() > 0, f"reference gradient of {k} is zero: the test would be vacuous"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_model_matches_single_process(world):
    cases = CASES[world]
    results = run_distributed(_worker, world, cases, timeout=150)
    refs = {name: _reference(name) for name in {n for n, _ in cases}}
    for rank, per_case in enumerate(results):
        for (name, plan), got in zip(cases, per_case):
            _compare(got, refs[name], f"{name} dp={plan.dp} tp={plan.tp} ep={plan.ep} sp={plan.sequence_parallel} "
                                      f"rank {rank}", expert_grad_scale=plan.ep)


# --- single process ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-llama-tied", "opt-tiny"])
def test_parameter_count_matches_formula(preset):
    if preset == "tiny-llama-tied":
        cfg = _cfg("tiny-llama", tie_embeddings=True)
    elif preset == "opt-tiny":
        cfg = dataclasses.replace(_cfg("tiny-gpt2"), arch="opt", name="opt-tiny")
    else:
        cfg = _cfg(preset)
    model = build_model(cfg, Plan(), None, seed=SEED)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total


def test_loss_is_torch_cross_entropy_and_names_are_stable():
    cfg = MODELS["gpt2"]
    model = build_model(cfg, Plan(), None, seed=SEED)
    ids, labels = _batch(cfg.vocab)
    logits = model(ids)
    expect = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    _close(model(ids, labels), expect, "loss")
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and model.lm_head is None        # tied: head uses tok_embed.weight
    assert names[:3] == ["tok_embed.weight", "pos_embed.weight", "blocks.0.attn_norm.weight"]
    assert "blocks.1.mlp.down_proj.bias" in names and names[-2:] == ["final_norm.weight", "final_norm.bias"]
    assert [n for n in names if not decays(n)] == [n for n in names if n.endswith(".bias") or "norm" in n]
    llama = build_model(MODELS["llama"], Plan(), None, seed=SEED)
    lnames = [n for n, _ in llama.named_parameters()]
    assert lnames[-1] == "lm_head.weight" and "blocks.0.mlp.gate_proj.weight" in lnames
    assert not any(n.endswith(".bias") for n in lnames)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_forward_only_loss_in_chunks_equals_the_autograd_path(preset):
    """Without autograd the loss is computed a few tokens at a time (uneven chunks here, with
    ignored labels): bit-identical to the one-pass loss of the autograd path on the CPU."""
    model = build_model(ModelConfig(**model_preset(preset)), Plan(), None, seed=0)
    model.FORWARD_ONLY_ROWS = 7
    ids = torch.randint(0, model.cfg.vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[1, :4] = -100
    with torch.no_grad():
        lean = model(ids, labels)
    full = model(ids, labels)
    assert full.requires_grad and torch.equal(lean, full.detach())


def test_same_seed_same_weights_other_seed_differs():
    a = build_model(MODELS["llama"], Plan(), None, seed=SEED).full_state_dict()
    b = build_model(MODELS["llama"], Plan(), None, seed=SEED).full_state_dict()
    c = build_model(MODELS["llama"], Plan(), None, seed=SEED + 1).full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.q_proj.weight"], c["blocks.0.attn.q_proj.weight"])


def test_activation_checkpointing_same_gradients():
    cfg = MODELS["llama"]
    ids, labels = _batch(cfg.vocab)
    ref = _run(build_model(cfg, Plan(), None, seed=SEED), ids, labels)
    model = apply_activation_checkpointing(build_model(cfg, Plan(), None, seed=SEED))
    assert all(b.activation_checkpointing for b in model.blocks)
    got = _run(model, ids, labels)
    for k in ref["grads"]:
        _close(got["grads"][k], ref["grads"][k], k)
    via_plan = build_model(cfg, Plan(activation_checkpointing="full"), None, seed=SEED)
    assert all(b.activation_checkpointing for b in via_plan.blocks)


def test_bf16_build_keeps_shard_metadata():
    model = build_model(MODELS["llama"], Plan(), None, seed=SEED, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.blocks[0].attn.o_proj.weight.meshpilot_tp_dim == 1
    ids, labels = _batch(256)
    loss = model(ids, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_moe_model_builds_when_moe_layer_exists():
    pytest.importorskip("meshpilot.strategies.moe")
    cfg = _cfg("tiny-mixtral")
    model = build_model(cfg, Plan(), None, seed=SEED)
    assert all(b.is_moe for b in model.blocks)
    assert any(getattr(p, "meshpilot_expert", False) for p in model.parameters())
    ids, labels = _batch(cfg.vocab)
    loss = model(ids, labels)
    loss.backward()
    assert torch.isfinite(loss)
