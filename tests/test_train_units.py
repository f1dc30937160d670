"""Single-process pieces of issue 5: DeepSpeed config mapping, data order and sharding, token
files, schedule, metrics arithmetic, checkpoint discovery errors, rank environment."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from meshpilot.orchestrator.train.checkpoint import (CheckpointManager, CheckpointMeta, find_checkpoint, model_fingerprint,
                                               plan_fingerprint, plan_summary)
from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.orchestrator.train.data import (BatchLayout, ShardedBatches, SyntheticSamples, WindowSamples, main as data_main,
                                         open_token_file, resolve_source, write_token_file)
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.flops import matmul_params, mfu, model_flops_per_token
from meshpilot.orchestrator.plan.plan import resolve_plan
from meshpilot.orchestrator.train.schedule import lr_at
from meshpilot.orchestrator.train.tokenizer import ByteTokenizer
from meshpilot.orchestrator.train.worker import env_rank_info, preflight
from meshpilot.strategies.deepspeed_config import deepspeed_config, merge_extra
from train_utils import tiny_job


# --- DeepSpeed config ----------------------------------------------------------------------------

def test_deepspeed_config_maps_the_plan():
    job = tiny_job({"dp": 2, "zero_stage": 2, "micro_batch": 1, "offload_optimizer": "cpu"}, precision="bf16",
                   grad_clip=0.5, global_batch=8)
    plan = resolve_plan(job)
    cfg = deepspeed_config(job, plan)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 1, 4)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in cfg["zero_optimization"]
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["type"] == "AdamW" and "torch_adam" not in cfg["optimizer"]["params"]  # CPUAdam
    z3 = deepspeed_config(tiny_job({"dp": 2, "zero_stage": 3, "offload_params": "cpu"}, precision="fp16"),
                          resolve_plan(tiny_job({"dp": 2, "zero_stage": 3, "offload_params": "cpu"})))
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu" and z3["fp16"]["enabled"]
    z0 = deepspeed_config(tiny_job({"dp": 2}, precision="fp32"), resolve_plan(tiny_job({"dp": 2})))
    assert z0["zero_optimization"] == {"stage": 0} and z0["optimizer"]["params"]["torch_adam"] is True


def test_tp_ranks_are_not_counted_in_the_deepspeed_batch():
    job = tiny_job({"dp": 2, "tp": 2, "micro_batch": 2})
    cfg = deepspeed_config(job, resolve_plan(job))
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 2


def test_deepspeed_extra_is_merged_and_checked(caplog):
    job = tiny_job({"dp": 2, "zero_stage": 1},
                   deepspeed_extra={"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True})
    with caplog.at_level("INFO"):
        cfg = deepspeed_config(job, resolve_plan(job))
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["zero_optimization"]["stage"] == 1
    assert cfg["wall_clock_breakdown"] is True
    assert "zero_optimization.reduce_bucket_size=1000" in caplog.text
    bad = tiny_job({"dp": 2, "zero_stage": 1}, deepspeed_extra={"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="plan.zero_stage"):
        deepspeed_config(bad, resolve_plan(bad))
    merged, changed = merge_extra({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "d": 3}})
    assert merged == {"a": {"b": 1, "c": 2, "d": 3}} and changed == {"a.d": 3}


# --- data ----------------------------------------------------------------------------------------

def _step_samples(src, gb, mb, dp, steps, seed=3):
    out = []
    for s in range(steps):
        rows = []
        for r in range(dp):
            b = ShardedBatches(src, BatchLayout(gb, mb, gb // (mb * dp), dp, r), seed=seed)
            for m in range(gb // (mb * dp)):
                x, y = b.micro_batch(s, m)
                assert np.array_equal(x[:, 1:], y[:, :-1])          # labels are the inputs shifted by one
                rows += [tuple(row) for row in x]
        out.append(sorted(rows))
    return out


def test_each_step_reads_the_same_samples_for_every_plan():
    tokens = np.arange(1000) % 251
    src = WindowSamples(tokens, 8)                                   # 124 samples: several epochs in 40 steps
    a = _step_samples(src, 12, 6, 1, 40)
    assert a == _step_samples(src, 12, 2, 2, 40) == _step_samples(src, 12, 1, 4, 40)
    assert a[0] != a[1]


def test_dp_ranks_get_disjoint_samples_and_epochs_are_permutations():
    src = WindowSamples(np.arange(401), 4)                           # 100 samples, distinct first tokens
    firsts = []
    for step in range(10):                                           # 10 steps x 10 samples = one epoch
        for r in range(2):
            b = ShardedBatches(src, BatchLayout(10, 5, 1, 2, r), seed=1)
            firsts += list(b.micro_batch(step, 0)[0][:, 0])
    assert sorted(firsts) == list(range(0, 400, 4))                  # every sample exactly once
    b = ShardedBatches(src, BatchLayout(10, 10, 1, 1, 0), seed=1)
    e0 = [b.sample_of(g) for g in range(100)]
    e1 = [b.sample_of(g) for g in range(100, 200)]
    assert sorted(e1) == list(range(100)) and e0 != e1 and e0 != list(range(100))


def test_resume_position_is_exact():
    src = SyntheticSamples(vocab=256, seq_len=16, seed=5)
    lay = BatchLayout(8, 2, 2, 2, 1)
    first = ShardedBatches(src, lay, seed=5)
    later = ShardedBatches(src, lay, seed=5)                         # a fresh object, as after a restart
    for step in (0, 7, 13):
        for m in range(2):
            assert np.array_equal(first.micro_batch(step, m)[0], later.micro_batch(step, m)[0])
    assert not np.array_equal(first.micro_batch(7, 0)[0], first.micro_batch(8, 0)[0])


def test_token_file_roundtrip_and_prepare(tmp_path):
    tok = ByteTokenizer()
    text = "héllo wörld\n"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    path = write_token_file(tok.encode(text, eos=True), tmp_path / "t.bin")
    arr, meta = open_token_file(path)
    assert meta["dtype"] == "uint16" and meta["max_token"] == 257 and len(arr) == len(text.encode()) + 1
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc " * 100)
    assert data_main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "c.bin")]) == 0
    src = resolve_source(str(tmp_path / "c.bin"), vocab=256, seq_len=10, seed=0)
    assert src.num_samples == 39 and ByteTokenizer().decode(src.sample(0)) == "abc abc abc"
    demo = resolve_source("demo", vocab=256, seq_len=128, seed=0)
    assert demo.num_samples > 2000


def test_missing_or_bad_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.data=.*no such token file.*prepare"):
        resolve_source(str(tmp_path / "nope.bin"), vocab=256, seq_len=8, seed=0)
    p = write_token_file(np.arange(300), tmp_path / "big.bin")
    with pytest.raises(ConfigError, match=r"token id 299 >= model.vocab=256"):
        resolve_source(str(p), vocab=256, seq_len=8, seed=0)
    with open(p, "ab") as f:
        f.write(b"xx")
    with pytest.raises(ConfigError, match="truncated or replaced"):
        open_token_file(p)
    job = tiny_job({"dp": 2}, data=str(tmp_path / "missing.bin"))
    with pytest.raises(ConfigError, match="no such token file"):
        preflight(job, resolve_plan(job), world_size=2, run_dir=tmp_path / "run")


# --- schedule and metrics ---------------------------------------------------------------------------

def test_warmup_cosine():
    kw = dict(lr=1.0, warmup=4, total=14, min_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)


def test_mfu_arithmetic():
    from meshpilot.orchestrator.train import loop
    job = tiny_job({"dp": 2}, precision="bf16", seq_len=64)
    m = job.model
    f = 3 * (2 * matmul_params(m) + 4 * m.layers * 64 * m.hidden)
    assert model_flops_per_token(m, 64, zeroth_order=False) == f
    assert mfu(job, 1000.0, 2, zeroth_order=False) == pytest.approx(f * 1000 / (2 * job.cluster.gpu.bf16_tflops * 1e12))
    assert loop.mfu is mfu                      # the step records use the simulator's rule


# --- checkpoint discovery and compatibility ---------------------------------------------------------

def _fake_ckpt(root, job, plan, step=10, world=2):
    d = root / f"step_{step:08d}"
    (d / "rng").mkdir(parents=True)
    meta = CheckpointMeta(tag=d.name, step=step, consumed_samples=step * 8, plan=plan_summary(plan),
                          plan_fingerprint=plan_fingerprint(plan), model_fingerprint=model_fingerprint(job),
                          world_size=world, seed=job.train.seed, data=job.train.data, wall_time=0.0)
    (d / "meshpilot.json").write_text(json.dumps(meta.__dict__))
    write_atomic(root / "latest", d.name + "\n")
    return d


def test_checkpoint_errors_are_clear(tmp_path):
    job = tiny_job({"dp": 2, "zero_stage": 1})
    plan = resolve_plan(job)
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        find_checkpoint(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    assert find_checkpoint(tmp_path / "junk") is None                     # nothing there yet: fresh start
    root = tmp_path / "run" / "checkpoints"
    d = _fake_ckpt(root, job, plan)
    (root / "step_00000015.partial").mkdir()                               # a crash during the next save
    assert find_checkpoint(tmp_path / "run") == (root, d.name)
    assert preflight(job, plan, world_size=2, run_dir=tmp_path / "run") == (root, d.name)
    other = tiny_job({"dp": 2, "zero_stage": 3})
    with pytest.raises(ConfigError, match=r"written by plan \[.*zero_stage=1.*this job runs plan \[.*zero_stage=3"):
        preflight(other, resolve_plan(other), world_size=2, run_dir=tmp_path / "run")
    bigger = tiny_job({"dp": 2, "zero_stage": 1}, model="tiny-gpt2")
    with pytest.raises(ConfigError, match="different model"):
        CheckpointManager(root, bigger, plan, rank=0, world_size=2).check_compatible(
            __import__("meshpilot.orchestrator.train.checkpoint", fromlist=["x"]).read_meta(d), d)
    write_atomic(root / "latest", "step_00000099\n")
    with pytest.raises(ConfigError, match="missing or incomplete"):
        preflight(job, plan, world_size=2, run_dir=tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        find_checkpoint(tmp_path / "afile")


def test_rank_environment_variants():
    base = {"MASTER_ADDR": "h0", "MASTER_PORT": "123"}
    assert env_rank_info({**base, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})["rank"] == 3
    s = env_rank_info({**base, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (s["rank"], s["world_size"], s["local_rank"]) == (5, 8, 1)
    o = env_rank_info({**base, "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (o["rank"], o["world_size"], o["local_rank"], o["master_port"]) == (2, 4, 0, 123)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        env_rank_info({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(ConfigError, match="no rank variables"):
        env_rank_info({})


def test_causal_lm_adapter_for_user_models():
    import types

    import torch

    from meshpilot.strategies.hf_adapter import CausalLMLoss

    class HFLike(torch.nn.Module):                       # returns an output object with .logits, like HF
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.head(self.emb(input_ids)))

    torch.manual_seed(0)
    m = HFLike()
    x = torch.randint(0, 11, (2, 5))
    y = torch.randint(0, 11, (2, 5))
    y[0, -1] = -100
    logits = m(x).logits
    keep = y != -100
    expect = -torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert CausalLMLoss(m)(x, y).item() == pytest.approx(expect.item(), rel=1e-6)


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from meshpilot.orchestrator.train.metrics import MetricsLogger, StepRecord, memory_stats
    m = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    mem = memory_stats(0).__dict__
    assert mem["host_rss_peak"] > 10 * 2**20 and mem["torch_allocated_peak"] is None   # CPU: RSS only
    for s in (1, 2):
        m.write(StepRecord(step=s, loss=3.0 / s, lr=1e-3, step_time_s=0.5, tokens_per_s=100.0, mfu=0.01,
                           memory=[mem] if s == 2 else []))
    m.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["loss"] == 1.5 and recs[1]["memory"][0]["rank"] == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    MetricsLogger(tmp_path / "r1", rank=1).write(StepRecord(1, 1.0, 1e-3, 1.0, 1.0, 0.0))
    assert not (tmp_path / "r1").exists()                                               # only rank 0 writes


@pytest.mark.parametrize("stage,precision,dtype", [(3, "bf16", "bfloat16"), (3, "fp32", "float32"),
                                                   (2, "bf16", "float32"), (0, "bf16", "float32")])
def test_zero3_builds_the_model_in_the_training_dtype(stage, precision, dtype):
    """Under ZeRO-3 DeepSpeed takes its 16-bit partitions' dtype from the parameters as built: a fp32 build made a
    parameter-offload run's host copies fp32 and every pass fp32 (2026-11-30-s4-h200x2). Stages 0-2 build in fp32
    and the engine casts."""
    import torch
    from meshpilot.orchestrator.train.engine_deepspeed import _default_model_factory
    job = tiny_job({"dp": 1, "zero_stage": stage}, precision=precision)
    model = _default_model_factory(job, resolve_plan(job), None)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    # transformers' model class (model.implementation: hf) follows the same rule
    from meshpilot.orchestrator.train.engine_deepspeed import build_dtype
    from meshpilot.strategies.hf_adapter import hf_model_factory
    plan = resolve_plan(job)
    hf = hf_model_factory(job, plan, None, dtype=build_dtype(job, plan))
    assert {p.dtype for p in hf.parameters()} == {getattr(torch, dtype)}


def test_hf_model_honours_activation_checkpointing():
    """``plan.activation_checkpointing: full`` on transformers' model class (model.implementation: hf) recomputes every
    decoder layer in the backward, as the built-in blocks do: each layer's MLP runs twice a step (once more in the
    backward), where without it once, and the loss and gradients are the same. (The 2026-11-30-s9 runs of such plans
    had allocated their activations in full: the factory had never switched it on.)"""
    import dataclasses
    import functools

    import torch

    from meshpilot.orchestrator.config.schema import Implementation
    from meshpilot.orchestrator.train.engine_deepspeed import build_dtype
    from meshpilot.strategies.hf_adapter import hf_model_factory
    out = {}
    for ac in ("none", "full"):
        job = tiny_job({"dp": 1, "zero_stage": 0, "activation_checkpointing": ac}, precision="fp32")
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, implementation=Implementation.HF))
        plan = resolve_plan(job)
        torch.manual_seed(3)
        model = hf_model_factory(job, plan, None, dtype=build_dtype(job, plan))
        model.train()
        calls = []
        for layer in model.model.model.layers:          # (module hooks do not run in the recomputation: count calls)
            layer.mlp.forward = functools.partial(lambda *a, _f, **k: calls.append(1) or _f(*a, **k),
                                                  _f=layer.mlp.forward)
        torch.manual_seed(4)
        x = torch.randint(0, job.model.vocab, (2, job.train.seq_len))
        loss = model(x, x)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[ac] = (loss.item(), grads, len(calls), len(model.model.model.layers))
    (l0, g0, c0, n), (l1, g1, c1, _) = out["none"], out["full"]
    assert c0 == n and c1 == 2 * n
    assert l1 == pytest.approx(l0, rel=1e-6) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
