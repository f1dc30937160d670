"""Hugging Face checkpoints in the built-in model: tiny random models of every supported
architecture are created here with ``transformers`` (no download), saved with
``save_pretrained(safe_serialization=True)`` and loaded through ``model: DIR``.

Every parameter of the Hugging Face models is redrawn (norm weights around 1, biases and
embeddings O(1)) so that a norm or bias left at ones/zeros, a wrong transpose, a q/k/v split
in the wrong order or a rotary convention mismatch changes the logits by O(1), not by 1e-3.
The built-in logits must equal the Hugging Face model's within ``ATOL`` (fp32, CPU): at tp=1,
at tp=2 over two gloo processes (each rank reading only its half), and at ep=2 for mixtral.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402
from meshpilot.orchestrator.cli.main import main  # noqa: E402
from meshpilot.orchestrator.config.hf_layout import hf_layout  # noqa: E402
from meshpilot.orchestrator.config.loader import job_from_dict  # noqa: E402
from meshpilot.orchestrator.config.models import param_counts  # noqa: E402
from meshpilot.orchestrator.plan.plan import Plan  # noqa: E402
from meshpilot.strategies.hf_checkpoint import (CheckpointWeights, from_hf_state_dict, hf_config_dict,  # noqa: E402
                                                read_hf_state_dict, to_builtin_names, to_hf_state_dict)
from meshpilot.strategies.model import build_model  # noqa: E402

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "mistral", "qwen2", "mixtral", "gpt2", "opt")
V, H, FFN, LAYERS, HEADS, KV, POS = 97, 32, 48, 2, 4, 2, 64     # odd vocabulary: padded rows under tp=2
B, S = 2, 16
ATOL = 2e-5


def hf_model(arch: str, seed: int = 0):
    """A tiny Hugging Face model of ``arch`` with every parameter redrawn (see the module docstring)."""
    T = transformers
    llama_like = dict(vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=POS,
                      rms_norm_eps=1e-6)
    if arch == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**llama_like, rope_theta=500.0))
    elif arch == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**llama_like, sliding_window=32))
    elif arch == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**llama_like, tie_word_embeddings=True))
    elif arch == "mixtral":
        m = T.MixtralForCausalLM(T.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2))
    elif arch == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=POS,
                                           bos_token_id=0, eos_token_id=0))
    else:
        m = T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=FFN, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, max_position_embeddings=POS,
                                         word_embed_proj_dim=H))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.2 * r if ("norm" in name or ".ln_" in name) else 0.3 * r)
            elif "embed" in name or ".wte" in name or ".wpe" in name:
                p.copy_(r)
            else:
                fan_in = p.shape[0] if arch == "gpt2" else p.shape[-1]     # gpt2's Conv1D stores [in, out]
                p.copy_(r * 1.5 / fan_in ** 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved directory per architecture (single model.safetensors)."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        out[arch] = root / arch
        hf_model(arch).save_pretrained(out[arch], safe_serialization=True)
    # the same mixtral in transformers 5's fused in-memory layout (gate_up_proj [E, 2f, h], down_proj [E, h, f])
    out["mixtral_fused"] = root / "mixtral_fused"
    out["mixtral_fused"].mkdir()
    sd = {k: v.contiguous() for k, v in hf_model("mixtral").state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(out["mixtral_fused"] / "model.safetensors"), metadata={"format": "pt"})
    (out["mixtral_fused"] / "config.json").write_text((out["mixtral"] / "config.json").read_text())
    return out


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return m(ids).logits


def job_for(directory: Path, plan: dict | None = None, **train):
    return job_from_dict({"model": str(directory), "cluster": "local", "train": {"seq_len": S, **train},
                          "plan": plan or {}}, ["cluster.gpus_per_node=4"])


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert want.abs().max() > 1.0, f"{what}: reference logits are O(1e-2); the comparison would be weak"
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"{what}: max |built-in - Hugging Face| = {err:.3g}"


# --- tp = 1 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_hugging_face(checkpoints, arch):
    job = job_for(checkpoints[arch])
    assert job.model.path == str(checkpoints[arch].resolve())
    model = build_model(job.model, Plan(), None, seed=0)
    ids = tokens()
    with torch.no_grad():
        close(model(ids), hf_logits(checkpoints[arch], ids), arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_equals_hugging_face(checkpoints, arch):
    """param_counts (the simulator's) counts what the Hugging Face model holds; qwen2's q/k/v biases included."""
    m = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    job = job_for(checkpoints[arch])
    assert param_counts(job.model).total == sum(p.numel() for p in m.parameters())
    assert job.model.qkv_bias is (arch == "qwen2")


def test_translator_reads_transformers5_config(checkpoints):
    """transformers 5 writes the rotary base inside rope_parameters; mixtral's is 1e6."""
    assert job_for(checkpoints["llama"]).model.rope_theta == 500.0
    mix = job_for(checkpoints["mixtral"]).model
    assert mix.rope_theta == 1e6 and mix.num_experts == 4 and mix.top_k == 2
    assert mix.capacity_factor == 2.0                     # E / k: no token is dropped, as in the HF model
    assert job_for(checkpoints["qwen2"]).model.tie_embeddings is True


def test_sharded_checkpoint_and_mapping_form(checkpoints, tmp_path):
    d = tmp_path / "sharded"
    hf_model("llama", seed=3).save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").is_file(), shards
    job = job_from_dict({"model": {"path": str(d)}, "cluster": "local", "train": {"seq_len": S}})
    ids = tokens(1)
    with torch.no_grad():
        close(build_model(job.model, Plan(), None, seed=0)(ids), hf_logits(d, ids), "sharded llama")


def test_fused_mixtral_layout(checkpoints):
    """transformers 5 holds experts fused in memory; a directory saved in that layout loads as the
    per-expert one does (same weights, same logits)."""
    ids = tokens(2)
    with torch.no_grad():
        got = build_model(job_for(checkpoints["mixtral_fused"]).model, Plan(), None, seed=0)(ids)
    close(got, hf_logits(checkpoints["mixtral"], ids), "fused mixtral")


# --- conversion both ways (the export contract) -----------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_and_export_loads_in_transformers(checkpoints, arch, tmp_path):
    from safetensors.torch import load_file, save_file
    src = checkpoints[arch]
    job = job_for(src)
    model = build_model(job.model, Plan(), None, seed=0)
    full = model.full_state_dict()
    on_disk = load_file(str(src / "model.safetensors"))
    # the directory read as built-in tensors is exactly what the model was built with
    read = read_hf_state_dict(src, job.model)
    assert read.keys() == full.keys() and all(torch.equal(read[k], full[k]) for k in full)
    # built-in -> Hugging Face gives the saved tensors bit for bit (gpt2's causal-mask buffers are not parameters)
    hf = to_hf_state_dict(full, job.model)
    expect = {k: v for k, v in on_disk.items() if not k.endswith(".attn.bias") or ".c_" in k}
    if job.model.tie_embeddings:
        expect.pop("lm_head.weight", None)
    assert hf.keys() == expect.keys()
    assert all(torch.equal(hf[k], expect[k]) for k in expect), [k for k in expect if not torch.equal(hf[k], expect[k])]
    back = from_hf_state_dict(hf, job.model)
    assert all(torch.equal(back[k], full[k]) for k in full)
    # an exported directory (config.json from hf_config_dict + the tensors) loads in transformers, same logits
    out = tmp_path / "export"
    out.mkdir()
    base = json.loads((src / "config.json").read_text())
    for b in (base, None):
        (out / "config.json").write_text(json.dumps(hf_config_dict(job.model, base=b)))
        save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        ids = tokens(4)
        with torch.no_grad():
            close(hf_logits(out, ids), model(ids), f"{arch} exported (base config: {b is not None})")


def test_name_table_both_directions():
    cfg = job_from_dict({"model": "tiny-gpt2", "cluster": "local", "train": {"seq_len": 64}}).model
    assert to_builtin_names("transformer.h.1.attn.c_attn.weight", cfg) == tuple(
        f"blocks.1.attn.{p}_proj.weight" for p in "qkv")
    assert to_builtin_names("h.1.attn.c_attn.weight", cfg, "gpt2") == tuple(      # hub names lack the prefix
        f"blocks.1.attn.{p}_proj.weight" for p in "qkv")
    lay = hf_layout(cfg)
    assert lay.sources["blocks.0.mlp.up_proj.weight"].transpose and "lm_head.weight" not in lay.sources


# --- tp = 2, ep = 2 (two gloo processes) -----------------------------------------------------------

DIST_CASES = [("llama", dict(dp=1, tp=2)), ("qwen2", dict(dp=1, tp=2, sequence_parallel=True)),
              ("gpt2", dict(dp=1, tp=2)), ("opt", dict(dp=1, tp=2)), ("mixtral", dict(dp=1, tp=2)),
              ("mixtral", dict(dp=2, ep=2)), ("mixtral_fused", dict(dp=1, tp=2)),
              ("mixtral_fused", dict(dp=2, ep=2))]


def _dist_worker(rank: int, world: int, dirs: dict, cases: list) -> list:
    from meshpilot.comm.groups import build_process_groups
    out = []
    for arch, plan_kw in cases:
        job = job_for(Path(dirs[arch]))
        plan = Plan(**plan_kw)
        groups = build_process_groups(plan.layout(gpus_per_node=world))
        source = CheckpointWeights(job.model.path, job.model)
        model = build_model(job.model, plan, groups, seed=0, weights=source)
        with torch.no_grad():
            logits = model(tokens())
        full = sum(v.numel() * 4 for v in model.full_state_dict().values())
        out.append((logits, source.bytes_read, full))
    return out


@pytest.mark.slow
def test_tp2_and_ep2_logits_equal_hugging_face(checkpoints):
    ids = tokens()
    refs = {arch: hf_logits(checkpoints[arch], ids) for arch in {a for a, _ in DIST_CASES} - {"mixtral_fused"}}
    refs["mixtral_fused"] = refs["mixtral"]
    res = run_distributed(_dist_worker, 2, {k: str(v) for k, v in checkpoints.items()}, DIST_CASES, timeout=300)
    for rank in range(2):
        for (arch, plan), (logits, read, full) in zip(DIST_CASES, res[rank]):
            close(logits, refs[arch], f"{arch} {plan} rank {rank}")
            # each rank read its shards only: the replicated tensors (norms, biases, router, positions; with
            # ep, attention and embeddings) plus half of the rest, well under the full model
            assert read < 0.75 * full, f"{arch} {plan} rank {rank}: read {read} of {full} bytes"


# --- errors, exit 2 before anything is built ------------------------------------------------------

def _validate(capsys, *args) -> tuple[int, str]:
    rc = main(["validate", *args])
    return rc, capsys.readouterr().err


def _job_file(tmp_path: Path, model: str, seq_len: int = S) -> str:
    f = tmp_path / "job.yaml"
    f.write_text(f"model: {model}\ncluster: local\ntrain: {{seq_len: {seq_len}, global_batch: 2}}\n"
                 "plan: {dp: 1}\n")
    return str(f)


def _copy(src: Path, dst: Path, drop: str | None = None, config: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    if drop:
        sd.pop(drop)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    c.update(config or {})
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_errors_exit_2_naming_the_problem(checkpoints, tmp_path, capsys):
    llama = checkpoints["llama"]
    missing = _copy(llama, tmp_path / "missing", drop="model.layers.1.mlp.up_proj.weight")
    rc, err = _validate(capsys, _job_file(tmp_path, str(missing)))
    assert rc == 2 and "lacks model.layers.1.mlp.up_proj.weight" in err, err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    rc, err = _validate(capsys, _job_file(tmp_path, str(pickled)))
    assert rc == 2 and "pytorch_model.bin" in err and "safetensors" in err, err

    phi = _copy(llama, tmp_path / "phi", config={"model_type": "phi"})
    rc, err = _validate(capsys, _job_file(tmp_path, str(phi)))
    assert rc == 2 and "unsupported model_type 'phi'" in err, err

    rc, err = _validate(capsys, _job_file(tmp_path, str(llama)), "model.vocab=128")
    assert rc == 2 and "model.vocab=128" in err and "97 rows" in err, err

    rc, err = _validate(capsys, _job_file(tmp_path, str(llama)), "model.layers=3")
    assert rc == 2 and "lacks model.layers.2." in err, err

    rc, err = _validate(capsys, _job_file(tmp_path, str(checkpoints["mistral"]), seq_len=48))
    assert rc == 2 and "train.seq_len=48" in err and "sliding attention window (32)" in err, err

    scaled = _copy(llama, tmp_path / "scaled", config={"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                                          "factor": 8.0}})
    rc, err = _validate(capsys, _job_file(tmp_path, str(scaled)))
    assert rc == 2 and "llama3" in err, err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((llama / "config.json").read_text())
    rc, err = _validate(capsys, _job_file(tmp_path, str(empty)))
    assert rc == 2 and "holds no weights" in err and "config.json" in err, err

    truncated = _copy(llama, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, err = _validate(capsys, _job_file(tmp_path, str(truncated)))
    assert rc == 2 and "truncated" in err, err

    rc, err = _validate(capsys, _job_file(tmp_path, str(llama)), "model.qkv_bias=true")
    assert rc == 2 and "model.qkv_bias=True" in err and "no q/k/v biases" in err, err


def test_driver_reads_the_directory_without_torch(checkpoints, tmp_path):
    from no_torch import run_without
    job = _job_file(tmp_path, str(checkpoints["mixtral"]))
    r = run_without(["validate", job], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"path: {checkpoints['mixtral'].resolve()}" in r.stdout


def test_fingerprint_ignores_the_weights_path(checkpoints):
    """Resume compatibility: fingerprints of models without the new fields are those written before them."""
    from meshpilot.orchestrator.train.checkpoint import model_fingerprint
    tiny = job_from_dict({"model": "tiny-llama", "cluster": "local"})
    assert model_fingerprint(tiny) == "f1df41ccb65d"
    job = job_for(checkpoints["llama"])
    moved = dataclasses.replace(job, model=dataclasses.replace(job.model, path="/elsewhere"))
    assert model_fingerprint(job) == model_fingerprint(moved)
    qwen = job_for(checkpoints["qwen2"])
    assert model_fingerprint(qwen) != model_fingerprint(
        dataclasses.replace(qwen, model=dataclasses.replace(qwen.model, qkv_bias=False)))


# --- training from the checkpoint ---------------------------------------------------------------------

def _hf_batch_loss(directory: Path, job, dp: int) -> float:
    """The Hugging Face model's mean cross-entropy over the dp ranks' first micro-batches (the worker's logged loss)."""
    from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_source
    t = job.train
    m = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    src = resolve_source(t.data, vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed)
    losses = []
    for r in range(dp):
        x, y = ShardedBatches(src, BatchLayout(global_batch=t.global_batch, micro_batch=t.global_batch // dp,
                                               grad_accum=1, dp=dp, dp_rank=r), seed=t.seed).micro_batch(0, 0)
        with torch.no_grad():
            logits = m(torch.from_numpy(x)).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten(), ignore_index=-100).item())
    return sum(losses) / dp


TRAIN = {"seq_len": S, "global_batch": 4, "steps": 2, "precision": "fp32", "lr": 1e-3, "data": "synthetic", "seed": 5,
         "checkpoint_final": False}


def _zero3_worker(rank: int, world: int, directory: str, tmp: str) -> dict:
    from train_utils import run
    out = {}
    for name, plan in [("zero3", {"dp": 2, "zero_stage": 3}),
                       ("zero3_offload", {"dp": 2, "zero_stage": 3, "offload_params": "cpu",
                                          "offload_optimizer": "cpu"})]:
        job = job_from_dict({"model": directory, "cluster": "local", "train": TRAIN, "plan": plan},
                            ["cluster.gpus_per_node=4"])
        out[name] = run(job, rank, world, f"{tmp}/{name}", resume=False)["losses"]
    return out


@pytest.mark.slow
def test_zero3_training_starts_from_the_checkpoint(checkpoints, tmp_path):
    """ZeRO-3 (each layer read and partitioned as it is built) through the worker: the first step's
    loss is the Hugging Face model's on the same batch; then it trains."""
    d = checkpoints["llama"]
    res = run_distributed(_zero3_worker, 2, str(d), str(tmp_path), timeout=600)
    want = _hf_batch_loss(d, job_from_dict({"model": str(d), "cluster": "local", "train": TRAIN}), dp=2)
    for name in ("zero3", "zero3_offload"):
        losses = res[0][name]
        assert losses == res[1][name] and len(losses) == 2
        assert losses[0] == pytest.approx(want, rel=1e-5, abs=1e-5), (name, losses, want)
        assert losses[1] != losses[0]


def test_zeroth_order_models_start_from_the_checkpoint(checkpoints):
    """MeZO and ZO2 (blocks in host memory) evaluate the Hugging Face model's loss on a batch."""
    from meshpilot.strategies.zo import build_zo_trainer
    d = checkpoints["opt"]
    job = job_for(d, {"zo": {"mode": "zo2"}}, **{**TRAIN, "optimizer": "zo-sgd"})
    want = _hf_batch_loss(d, job, dp=1)
    from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_source
    t = job.train
    src = resolve_source(t.data, vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed)
    x, y = ShardedBatches(src, BatchLayout(global_batch=t.global_batch, micro_batch=t.global_batch, grad_accum=1,
                                           dp=1, dp_rank=0), seed=t.seed).micro_batch(0, 0)
    for mode in ("mezo", "zo2"):
        plan = Plan(zo_mode=mode)
        model = build_model(job.model, plan, None, seed=0)
        trainer = build_zo_trainer(model, plan, None, lr=1e-3, device="cpu")
        got = trainer.evaluate(torch.from_numpy(x), torch.from_numpy(y))
        assert got == pytest.approx(want, rel=1e-5), (mode, got, want)


def test_relative_directory_and_preset_names(checkpoints, monkeypatch):
    """``model: gpt2`` stays the preset even beside a folder of that name; ``./gpt2`` is the folder."""
    monkeypatch.chdir(checkpoints["gpt2"].parent)
    preset = job_from_dict({"model": "gpt2", "cluster": "local", "train": {"seq_len": S}}).model
    assert preset.layers == 12 and preset.path is None
    local = job_from_dict({"model": "./gpt2", "cluster": "local", "train": {"seq_len": S}}).model
    assert local.layers == LAYERS and local.path == str(checkpoints["gpt2"].resolve())
    assert job_from_dict({"model": "llama", "cluster": "local"}).model.path == str(checkpoints["llama"].resolve())


@pytest.mark.parametrize("arch, prefix", [("gpt2", "transformer."), ("opt", "model.")])
def test_hub_names_without_the_base_prefix(checkpoints, arch, prefix, tmp_path):
    """Hub checkpoints saved from the base model name gpt2's tensors h.0... and opt's decoder...; they load."""
    from safetensors.torch import load_file, save_file
    src = checkpoints[arch]
    sd = {k.removeprefix(prefix): v for k, v in load_file(str(src / "model.safetensors")).items()}
    assert not any(k.startswith(prefix) for k in sd)
    d = tmp_path / "hub"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((src / "config.json").read_text())
    ids = tokens(5)
    with torch.no_grad():
        close(build_model(job_for(d).model, Plan(), None, seed=0)(ids), hf_logits(src, ids), f"{arch} hub names")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_logits_equal_hugging_face_on_the_gpu(checkpoints, arch):
    """The same check on a GPU, where the weights are read straight to the device: fp32 both sides
    (TF32 off), the built-in model built under ``torch.device("cuda")`` on the GPU, as the worker builds it."""
    torch.backends.cuda.matmul.allow_tf32 = False
    job = job_for(checkpoints[arch])
    with torch.device("cuda"):
        model = build_model(job.model, Plan(), None, seed=0, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    ids = tokens().cuda()
    m = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch]).cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), m(ids).logits, rtol=1e-4, atol=1e-4)
