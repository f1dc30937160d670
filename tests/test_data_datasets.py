"""Local datasets (issue 18, "Data"): JSONL / prompt-completion / chat / Parquet / text files read
offline with ``datasets``, tokenized with a tokenizer trained here (``tokenizers``, no download),
packed with document boundaries and loss masks, cached under a fingerprint, sharded per
data-parallel rank with exact resume, an evaluation split held out of training, the torch-free
``meshpilot data prepare`` command, and validation loss through the real worker."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from meshpilot.orchestrator.config.inputs import check_inputs  # noqa: E402
from meshpilot.orchestrator.config.loader import job_from_dict  # noqa: E402
from meshpilot.orchestrator.data.prepare import DatasetOptions, Packer, prepare_dataset  # noqa: E402
from meshpilot.orchestrator.data.tokens import IGNORE_INDEX, read_token_file  # noqa: E402
from meshpilot.orchestrator.errors import ConfigError  # noqa: E402
from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_job_source  # noqa: E402

CORPUS = ["what is two four", "the cat sat on the mat", "hello world yes no", "user : hi assistant : hello",
          "one two three five six seven eight nine ten", "good bad great film movie it was"]
CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(folder: Path, *, chat_template: str | None = None) -> Path:
    """A WordLevel tokenizer trained on CORPUS (specials <unk> <s> </s> <pad> and two chat markers),
    whose post-processor puts <s> before a sequence; tokenizer_config.json names EOS and PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def ids(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_for(data: Path, tmp: Path, *, model: str | dict = "tiny-llama", plan: dict | None = None, **train) -> object:
    """A job on ``data``; tiny-llama's vocabulary widened to 320 (the byte tokenizer's EOS is 257)."""
    dataset = train.pop("dataset", {})
    t = {"seq_len": 8, "global_batch": 4, "steps": 4, "precision": "fp32", "data": str(data),
         "output_dir": str(tmp / "runs"), "dataset": {"cache_dir": str(tmp / "cache"), **dataset}, **train}
    return job_from_dict({"model": model, "cluster": "local", "train": t, "plan": plan or {"dp": 1}},
                         ["cluster.gpus_per_node=4"] + (["model.vocab=320"] if model == "tiny-llama" else []))


def all_rows(job, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Every stored sample of a prepared split as (input_ids, labels), in file order."""
    src = resolve_job_source(job, split=split)
    b = ShardedBatches(src, BatchLayout(src.num_samples, src.num_samples, 1, 1, 0), seed=0, shuffle=False)
    return b.micro_batch(0, 0)


def trained(x: np.ndarray, y: np.ndarray) -> list[list[int]]:
    """Per row: the labels that count in the loss."""
    return [[int(v) for v in row if v != IGNORE_INDEX] for row in y]


# --- formats ----------------------------------------------------------------------------------

def test_prompt_completion_labels_are_hand_checked(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is two", "completion": "four"}])
    job = job_for(data, tmp_path, dataset={"tokenizer": str(tok)})
    assert check_inputs(job) is not None                      # prepares the cache
    x, y = all_rows(job)
    s, e, pad = ids(tok, "<s>")[0], ids(tok, "</s>")[0], ids(tok, "<pad>")[0]
    what, is_, two, four = ids(tok, "what is two four")
    # one window of seq_len + 1 = 9 tokens: <s> what is two | four </s> | pad pad pad
    assert x.tolist() == [[s, what, is_, two, four, e, pad, pad]]
    # label of position p is token p+1; prompt tokens (what, is, two) and padding are -100
    assert y.tolist() == [[-100, -100, -100, four, e, -100, -100, -100]]
    from meshpilot.strategies.model import IGNORE_INDEX as MODEL_IGNORE_INDEX
    assert IGNORE_INDEX == MODEL_IGNORE_INDEX == -100                  # the label the model's loss skips
    job2 = job_for(data, tmp_path, dataset={"tokenizer": str(tok), "mask_prompt": False})
    check_inputs(job2)
    assert all_rows(job2)[1].tolist() == [[what, is_, two, four, e, -100, -100, -100]]   # only <s> has no label


def test_jsonl_text_field_and_parquet_and_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tok = make_tokenizer(tmp_path / "tok")
    s, e = ids(tok, "<s>")[0], ids(tok, "</s>")[0]
    docs = ["the cat sat", "hello world", "one two three five"]
    expect = [[s] + ids(tok, d) + [e] for d in docs]

    jl = write_jsonl(tmp_path / "body.jsonl", [{"body": d, "n": i} for i, d in enumerate(docs)])
    pq.write_table(pa.table({"body": docs}), tmp_path / "body.parquet")
    (tmp_path / "docs.txt").write_text("\n\n".join(docs) + "\n")
    for data, fmt in ((jl, "auto"), (tmp_path / "body.parquet", "jsonl-text"), (tmp_path / "docs.txt", "text")):
        job = job_for(data, tmp_path, dataset={"tokenizer": str(tok), "text_field": "body", "format": fmt})
        check_inputs(job)
        x, y = all_rows(job)
        # windows of 9: doc 1 (5 tokens) + doc 2 (4) fill the first exactly; doc 3 (6) the second, padded
        assert x[0].tolist() + [y[0, -1]] == expect[0] + expect[1], data
        assert x[1].tolist()[:6] == expect[2], data
        # a document's first token (<s>) is never a label: not predicted from the previous document
        assert y[0].tolist() == [t for t in expect[0][1:]] + [IGNORE_INDEX] + expect[1][1:], data


def test_chat_with_the_tokenizers_template_and_the_plain_one(tmp_path):
    conv = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "what"}, {"role": "assistant", "content": "yes"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", conv)
    with_template = make_tokenizer(tmp_path / "tok_chat", chat_template=CHAT_TEMPLATE)
    job = job_for(data, tmp_path, seq_len=24, dataset={"tokenizer": str(with_template)})
    check_inputs(job)
    x, y = all_rows(job)
    e = ids(with_template, "</s>")[0]
    # rendered: <s> <|user|> hi </s> <|assistant|> hello </s> <|user|> what </s> <|assistant|> yes </s>
    rendered = ids(with_template, "<s> <|user|> hi </s> <|assistant|> hello </s> <|user|> what </s> <|assistant|> "
                                  "yes </s>")
    assert x[0, :len(rendered)].tolist() == rendered and x[0, len(rendered)] == ids(with_template, "<pad>")[0]
    # only the assistant replies and their end-of-turn </s> are trained (no EOS added: the template wrote it)
    assert trained(x, y) == [ids(with_template, "hello") + [e] + ids(with_template, "yes") + [e]]
    plain = make_tokenizer(tmp_path / "tok_plain")
    job = job_for(data, tmp_path, seq_len=24, dataset={"tokenizer": str(plain), "format": "chat"})
    check_inputs(job)
    x, y = all_rows(job)
    # plain template: "user: hi\n" "assistant: " masked, "hello\n" trained; then EOS (trained)
    rendered = ids(plain, "<s> user : hi assistant : hello user : what assistant : yes </s>")
    assert x[0, :len(rendered)].tolist() == rendered
    assert trained(x, y) == [ids(plain, "hello yes </s>")]
    ds = prepare_dataset(DatasetOptions.from_job(job))
    assert ds.reused and ds.manifest["chat_rendering"] == "the plain template"


def test_packing_keeps_documents_whole_and_splits_long_ones(tmp_path):
    """Hand-packed: seq_len 4 (windows of 5), documents of 3, 3, 7 and 2 tokens."""
    p = Packer(tmp_path / "t.bin", seq_len=4, pad_id=99, dtype=np.dtype(np.uint16))
    docs = {"A": [10, 11, 12], "B": [20, 21, 22], "C": [30, 31, 32, 33, 34, 35, 36], "D": [40, 41]}
    for d in docs.values():
        m = np.ones(len(d), np.uint8)
        m[0] = 0
        p.add(np.array(d), m)
    st = p.finish({"tokenizer": "test", "source": "test"})
    f = read_token_file(tmp_path / "t.bin")
    assert f.tokens.reshape(-1, 5).tolist() == [[10, 11, 12, 99, 99],    # B does not fit: padding, B starts anew
                                                [20, 21, 22, 30, 31],    # C is longer than a window: it fills the rest
                                                [31, 32, 33, 34, 35],    # ... and continues after its last token
                                                [35, 36, 40, 41, 99]]
    assert f.mask.reshape(-1, 5).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 0, 1], [0, 1, 1, 1, 1], [0, 1, 0, 1, 0]]
    # every token after a document's first is a target exactly once
    assert st["target_tokens"] == sum(len(d) - 1 for d in docs.values()) == 11
    assert (st["samples"], st["padding_tokens"], st["split_documents"], st["documents"]) == (4, 3, 1, 4)


# --- cache, shards, resume, eval split ---------------------------------------------------------

def _records(n: int) -> list[dict]:
    return [{"text": f"record-{i:03d} " + "abcdefgh"[i % 8] * (5 + i % 13)} for i in range(n)]


def test_cache_is_reused_and_invalidated_when_the_data_change(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records(40))
    opts = DatasetOptions.from_job(job_for(data, tmp_path, seq_len=32))
    first = prepare_dataset(opts)
    mtime = first.train_file.stat().st_mtime_ns
    again = prepare_dataset(opts)
    assert not first.reused and again.reused and again.directory == first.directory
    assert again.train_file.stat().st_mtime_ns == mtime                   # not tokenized again
    assert first.manifest["tokenizer_kind"] == "byte"                     # no model directory, no tokenizer given
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    changed = prepare_dataset(opts)
    assert not changed.reused and changed.directory != first.directory
    assert changed.manifest["train"]["documents"] == 41
    other_len = prepare_dataset(DatasetOptions.from_job(job_for(data, tmp_path, seq_len=16)))
    assert not other_len.reused and other_len.directory not in (first.directory, changed.directory)


def test_dp2_shards_are_disjoint_and_resume_gives_the_same_batches(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records(60))
    job = job_for(data, tmp_path, seq_len=16, global_batch=8, steps=30)
    check_inputs(job)
    src = resolve_job_source(job)
    assert src.num_samples >= 30

    def rows(step, dp, mb):
        out = []
        for r in range(dp):
            b = ShardedBatches(src, BatchLayout(8, mb, 8 // (mb * dp), dp, r), seed=job.train.seed)
            per_rank = []
            for x, y in b.step_batches(step):
                per_rank += [tuple(a) + tuple(b_) for a, b_ in zip(x.tolist(), y.tolist())]
            out.append(per_rank)
        return out

    for step in (0, 3, 11):                                  # 11: a later epoch
        one = rows(step, 1, 8)[0]
        r0, r1 = rows(step, 2, 2)
        assert len(r0) == len(r1) == 4
        assert not set(r0) & set(r1)                         # the two ranks read different samples
        assert sorted(r0 + r1) == sorted(one)                # together: the dp=1 batch
    # resume: a fresh source and sampler (as after a restart) at step s equal the uninterrupted run's
    lay = BatchLayout(8, 2, 2, 2, 1)
    running = ShardedBatches(src, lay, seed=job.train.seed)
    seen = {s: [b[1].tolist() for b in running.step_batches(s)] for s in range(12)}
    restarted = ShardedBatches(resolve_job_source(job), lay, seed=job.train.seed)
    for s in (7, 8, 11):
        assert [b[1].tolist() for b in restarted.step_batches(s)] == seen[s]


def test_eval_split_is_held_out_of_training(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records(40))
    job = job_for(data, tmp_path, seq_len=32, eval_every=2, dataset={"eval_fraction": 0.25})
    check_inputs(job)
    from meshpilot.orchestrator.data.tokenizer import ByteTokenizer

    ds = prepare_dataset(DatasetOptions.from_job(job))

    def names(path):
        windows = np.asarray(read_token_file(path).tokens).reshape(-1, 33).astype(np.int64)
        text = " ".join(ByteTokenizer().decode(np.where(w >= 256, 32, w)) for w in windows)   # EOS, PAD: spaces
        return [w for w in text.split() if w.startswith("record-")]

    train, held = names(ds.train_file), names(ds.eval_file)
    assert len(set(train)) == len(train) and len(set(held)) == len(held)     # no record cut or repeated
    train, held = set(train), set(held)

    assert held == {f"record-{i:03d}" for i in range(30, 40)}            # the last ceil(0.25 x 40) records
    assert not train & held and train | held == {f"record-{i:03d}" for i in range(40)}
    assert ds.eval_samples > 0 and ds.manifest["eval_records"] == 10


def test_validate_checks_vocab_and_sample_counts(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records(20))
    job = job_for(data, tmp_path, seq_len=32, steps=50, global_batch=8)
    notes = check_inputs(job)
    ds = prepare_dataset(DatasetOptions.from_job(job))
    epochs = 50 * 8 / ds.train_samples
    assert any(f"{epochs:.2f} times ({math.ceil(epochs)} epochs" in n for n in notes), notes
    small = {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "vocab": 200}
    with pytest.raises(ConfigError) as e:                                 # byte ids reach 257 (EOS)
        check_inputs(job_for(data, tmp_path, model=small, seq_len=32))
    assert e.value.key == "train.data" and "model.vocab=200" in str(e.value) and "257" in str(e.value)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(ConfigError, match="no training sample") as e:
        check_inputs(job_for(empty, tmp_path))
    assert e.value.key == "train.data"
    with pytest.raises(ConfigError) as e:
        job_for(data, tmp_path, eval_every=5)                             # no evaluation split
    assert e.value.key == "train.eval_every"
    with pytest.raises(ConfigError) as e:
        job_for(data, tmp_path, dataset={"eval_fraction": 1.0})
    assert e.value.key == "train.dataset.eval_fraction"


def test_meshpilot_run_prepares_the_dataset_before_the_workers(tmp_path):
    """``meshpilot run`` plans with :func:`plan_job`, which prepares a missing cache on the driver
    (the workers' preflight only finds it)."""
    from meshpilot.orchestrator.data.prepare import find_prepared
    from meshpilot.orchestrator.run.session import plan_job
    data = write_jsonl(tmp_path / "d.jsonl", _records(30))
    job = job_for(data, tmp_path, seq_len=16)
    with pytest.raises(ConfigError, match="has not been prepared") as e:
        resolve_job_source(job)                                           # what a worker would do first
    assert e.value.key == "train.data"
    assert find_prepared(DatasetOptions.from_job(job)) is None
    plan_job(job)
    assert find_prepared(DatasetOptions.from_job(job)) is not None
    assert resolve_job_source(job).num_samples > 0


# --- the command line, without torch ------------------------------------------------------------

# torch and DeepSpeed can be found (``datasets`` probes ``importlib.util.find_spec("torch")`` when it is
# imported: tests/no_torch.py's finder raises there) but not imported: the driver must never import them
_NO_TORCH = """
import importlib.abc, importlib.machinery, sys

class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(spec.name + " is not importable in this test")

    def exec_module(self, module):
        pass

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "deepspeed"):
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None

sys.meta_path.insert(0, _Finder())
from meshpilot.orchestrator.cli import main
rc = main(sys.argv[1:])
assert "torch" not in sys.modules, "the driver imported torch"
sys.exit(rc)
"""


def run_without(args: list[str], home: Path):
    import subprocess
    env = dict(os.environ, MESHPILOT_HOME=str(home))
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=home)


def _job_file(tmp: Path, data: Path, name: str = "job", **train) -> Path:
    t = {"seq_len": 8, "global_batch": 4, "steps": 4, "data": str(data), **train}
    f = tmp / f"{name}.yaml"
    f.write_text(json.dumps({"model": "tiny-llama", "cluster": "local", "train": t, "plan": {"dp": 1}}))
    return f


def test_data_prepare_cli_end_to_end_and_errors(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is two", "completion": "four"}] * 10)
    job = _job_file(tmp_path, data, dataset={"tokenizer": str(tok), "eval_fraction": 0.2})
    r = run_without(["data", "prepare", str(job)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cache = next((tmp_path / "runs" / "data_cache").glob("pc-*"))
    assert f"prepared dataset {cache}" in r.stdout or f"prepared dataset runs/data_cache/{cache.name}" in r.stdout
    # 8 training documents of 6 tokens, one per window of 9 (two do not fit in one): 3 padding tokens each
    assert "train: 8 samples of 9 tokens from 8 documents" in r.stdout, r.stdout
    assert "24 padding tokens, 32 masked tokens" in r.stdout and "16 labels in the loss" in r.stdout, r.stdout
    assert "eval: 2 samples" in r.stdout, r.stdout
    r2 = run_without(["data", "prepare", str(job)], tmp_path)
    assert r2.returncode == 0 and "reused the cached dataset" in r2.stdout, r2.stdout + r2.stderr
    r3 = run_without(["validate", str(job), "train.steps=10"], tmp_path)   # 40 samples read from 8: 5 epochs
    assert r3.returncode == 0 and "warning" in r3.stdout and "(5 epochs" in r3.stdout, r3.stdout + r3.stderr

    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "the cat"}])
    for args, key in (([str(_job_file(tmp_path, body, "body"))], "train.dataset.text_field"),
                      ([str(_job_file(tmp_path, data, "plain")), "train.dataset.format=csv"], "train.dataset.format"),
                      ([str(_job_file(tmp_path, data, "plain")), "train.dataset.format=text"], "train.dataset.format"),
                      ([str(_job_file(tmp_path, data, "tok", dataset={"tokenizer": str(tok)})), "model.vocab=8"],
                       "train.data")):
        r = run_without(["data", "prepare", *args], tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert f"meshpilot: error: {key}" in r.stderr, (key, r.stderr)
    assert "model.vocab=8" in r.stderr                        # the vocabulary overflow names the model's size


# --- validation loss through the worker ----------------------------------------------------------

def _eval_runs(rank: int, world: int, tmp: str, data: str) -> dict:
    from train_utils import run
    out = {}
    for name, plan, extra in (("zero1_dp2", {"dp": 2, "zero_stage": 1, "micro_batch": 1}, {}),
                              ("zo2_pair", {"zo": {"mode": "zo2", "pertp": 2, "dp": 1}},
                               {"optimizer": "zo-sgd", "zo_eps": 1e-3}),
                              # ZeRO-3 last: zero.Init leaves its patches on the model classes
                              ("zero3_dp2", {"dp": 2, "zero_stage": 3, "micro_batch": 2}, {})):
        job = job_for(Path(data), Path(tmp), plan=plan, lr=1e-9, steps=3, eval_every=2, eval_batches=2,
                      seq_len=16, warmup_steps=0, weight_decay=0.0, dataset={"eval_fraction": 0.25}, **extra)
        res = run(job, rank, world, f"{tmp}/{name}", resume=False)
        out[name] = {k: res[k] for k in ("eval_loss", "eval_perplexity", "evals", "final_loss")}
        if rank == 0:
            out[name]["records"] = [json.loads(ln) for ln in open(f"{tmp}/{name}/metrics.jsonl")]
    return out


def _reference_eval_loss(job) -> float:
    """The untrained built-in model (lr 1e-9 leaves it as initialised) on eval samples [0, 2B) of the
    split, in one process: the sum of per-label cross-entropies over their count."""
    import torch

    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    src = resolve_job_source(job, split="eval")
    b = ShardedBatches(src, BatchLayout(2 * job.train.global_batch, 2 * job.train.global_batch, 1, 1, 0), seed=0,
                       shuffle=False)
    x, y = b.micro_batch(0, 0)
    model = build_model(job.model, Plan(), None, seed=job.train.seed)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(ce) / int((y != IGNORE_INDEX).sum())


@pytest.mark.slow
def test_eval_loss_through_the_worker_equals_a_single_process_reference(tmp_path):
    from dist_utils import run_distributed
    data = write_jsonl(tmp_path / "d.jsonl", _records(60))
    job = job_for(data, tmp_path, lr=1e-9, steps=3, eval_every=2, eval_batches=2, seq_len=16,
                  dataset={"eval_fraction": 0.25})
    check_inputs(job)                                        # the driver prepares; workers only read the cache
    ref = _reference_eval_loss(job)
    res = run_distributed(_eval_runs, 2, str(tmp_path), str(data), timeout=600)
    assert 4.0 < ref < 7.0                                   # about ln(320): an untrained model
    for name in ("zero1_dp2", "zo2_pair", "zero3_dp2"):
        got = res[0][name]
        assert got["eval_loss"] == res[1][name]["eval_loss"], name            # every rank reports the same
        assert [e["step"] for e in got["evals"]] == [2, 3], name               # every 2 steps and at the end
        assert got["eval_loss"] == pytest.approx(ref, rel=1e-5), (name, got["eval_loss"], ref)
        assert got["eval_perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
        recs = {r["step"]: r for r in got["records"]}
        assert recs[1]["eval_loss"] is None and recs[2]["eval_loss"] == got["evals"][0]["eval_loss"], name
