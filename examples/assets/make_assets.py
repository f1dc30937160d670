"""Build the fine-tuning examples' assets: a tokenizer, toy "pretrained" checkpoints and the data files.

Nothing here is downloaded. Every asset is made from meshpilot's own demo corpus
(``orchestrator/train/corpus/demo_corpus.txt``, synthetic English in a small vocabulary) or from
templates and word lists in this file; the checkpoints are toy models pre-trained by meshpilot
itself, not published checkpoints. Run from the repository root::

    python examples/assets/make_assets.py            # everything below (1.5-2.5 minutes on 2 cores)
    python examples/assets/make_assets.py --data     # only examples/data/*.jsonl
    python examples/assets/make_assets.py --check    # rebuild tokenizer, model configs and data in a
                                                     # temporary folder (no pre-training) and compare them
                                                     # with the committed assets; exit 1 on a difference

What it does, in order (every step seeded, so a rerun writes the same tokenizer, configs and
data; the pre-trained weights came out bit-identical in two runs on the same machine, and
another CPU may round sums differently):

1. Tokenizer: a byte-level BPE (``tokenizers``; 256 byte symbols + the special tokens ``<pad>``
   = 0, ``<s>`` = 1, ``</s>`` = 2 + merges, :data:`VOCAB` at most) trained on the demo corpus's
   paragraphs. Its post-processor puts ``<s>`` before a sequence (LLaMA style). Written as
   ``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``; bos/eos/pad).
2. Data (:func:`write_data`), deterministic from :data:`SEED`:
   ``examples/data/instructions.jsonl`` (prompt/completion: number-word addition, word counting,
   list reversal and sentence continuation over the demo corpus's sentences),
   ``examples/data/sentiment.jsonl`` and ``sentiment_eval.jsonl`` (SST-2-style binary sentiment:
   ``"Review: ...\\nSentiment:"`` -> ``" positive"`` / ``" negative"``, from word lists and templates;
   the evaluation reviews are not in the training file).
3. Randomly initialised models made with ``transformers`` (:data:`MODELS`: a llama, an OPT and a
   4-expert mixtral, hidden 64, 2 layers, the tokenizer's vocabulary), saved with the tokenizer
   files to ``examples/assets/build/init/NAME`` (``build/`` is not committed).
4. Pre-training: ``meshpilot run examples/assets/pretrain_NAME.yaml`` for each model (one CPU
   worker, the demo corpus tokenized with the tokenizer above, ``train.export: hf``); the export
   of that run is the committed checkpoint ``examples/assets/NAME`` (config.json,
   model.safetensors, tokenizer files). The runs' losses go to ``examples/assets/pretraining.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
REPO = ASSETS.parents[1]
DATA = REPO / "examples" / "data"
CORPUS = REPO / "orchestrator" / "train" / "corpus" / "demo_corpus.txt"
BUILD = ASSETS / "build"
SEED = 20251201
VOCAB = 1024
SPECIALS = ("<pad>", "<s>", "</s>")          # ids 0, 1, 2
MAX_POSITIONS = 256
MODELS = ("tiny-llama", "tiny-opt", "tiny-mixtral")
# config.json keys that the export writes itself (its dtype, the transformers version); every other
# key of the freshly made config must be in the committed one with the same value
EXPORT_OWNED_KEYS = ("dtype", "torch_dtype", "transformers_version")
FILLED_BY_EXPORT = ("head_dim",)            # null in a fresh mixtral config, hidden / heads in the export


# --- 1. tokenizer ----------------------------------------------------------------------------------

def corpus_paragraphs() -> list[str]:
    return [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def write_tokenizer(out: Path) -> int:
    """Train the BPE tokenizer on the demo corpus into ``out``; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_paragraphs(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<pad>", "model_max_length": MAX_POSITIONS, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return tok.get_vocab_size()


# --- 2. data ---------------------------------------------------------------------------------------

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
THINGS = ("apples", "flour", "rope", "honey", "lanterns", "letters", "crates", "barrels", "sacks", "kettles",
          "maps", "clocks", "baskets", "candles", "nails", "blankets")

POSITIVE = ("warm", "bright", "kind", "cheerful", "lovely", "wonderful", "delightful", "charming", "gentle",
            "splendid", "fresh", "generous", "pleasant", "beautiful", "friendly", "excellent")
NEGATIVE = ("cold", "dull", "rude", "gloomy", "awful", "dreadful", "bitter", "stale", "noisy", "clumsy",
            "tedious", "miserable", "boring", "dirty", "slow", "terrible")
SUBJECTS = ("the bakery", "the ferry", "the market", "the lighthouse tour", "the harvest supper", "the inn",
            "the bread", "the story", "the music", "the room", "the guide", "the walk by the harbour", "the soup",
            "the play", "the mill", "the festival", "the service", "the garden", "the boat trip", "the library")
REVIEW_TEMPLATES = ("{S} was {a}.", "{S} was {a} and {T} was {b}.", "I found {S} {a}.",
                    "Everything about {S} felt {a}.", "{S} was {a}, and {T} was even more {b}.",
                    "We thought {S} was {a} from start to end.")


def _sentences() -> list[str]:
    """The demo corpus's sentences of 8-20 words without quotes, in order, without repeats."""
    seen, out = set(), []
    for p in corpus_paragraphs():
        for s in re.split(r"(?<=\.) ", p):
            words = s.split()
            if '"' not in s and s.endswith(".") and 8 <= len(words) <= 20 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def instructions(rng: random.Random, per_task: int = 100) -> list[dict[str, str]]:
    """Prompt/completion records of four tasks, ``per_task`` each, shuffled."""
    rows = []
    pairs = [(a, b) for a in range(11) for b in range(11) if a + b <= 20]
    for a, b in rng.sample(pairs, per_task):
        rows.append({"prompt": f"Question: What is {NUMBERS[a]} plus {NUMBERS[b]}?\nAnswer:",
                     "completion": f" {NUMBERS[a + b]}"})
    sents = _sentences()
    for s in rng.sample(sents, per_task):
        words = s.rstrip(".").split()
        n = rng.randint(3, min(10, len(words)))
        part = " ".join(rng.sample(words, n))
        rows.append({"prompt": f"Question: How many words are in \"{part}\"?\nAnswer:", "completion": f" {NUMBERS[n]}"})
    for _ in range(per_task):
        items = rng.sample(THINGS, rng.randint(2, 5))
        rows.append({"prompt": f"Reverse the list: {', '.join(items)}\nAnswer:",
                     "completion": " " + ", ".join(reversed(items))})
    for s in rng.sample(sents, per_task):
        words = s.split()
        cut = len(words) // 2
        rows.append({"prompt": f"Continue the sentence: {' '.join(words[:cut])}\nAnswer:",
                     "completion": " " + " ".join(words[cut:])})
    rng.shuffle(rows)
    return rows


def reviews(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``n`` distinct sentiment records, half of each label, shuffled."""
    rows, seen = [], set()
    while len(rows) < n:
        positive = len(rows) % 2 == 0
        words = POSITIVE if positive else NEGATIVE
        s, t = rng.sample(SUBJECTS, 2)
        a, b = rng.sample(words, 2)
        text = rng.choice(REVIEW_TEMPLATES).format(S=s, T=t, a=a, b=b)
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": f"Review: {text}\nSentiment:", "completion": " positive" if positive else " negative"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_data(out: Path) -> list[Path]:
    """instructions.jsonl (400 records), sentiment.jsonl (400) and sentiment_eval.jsonl (100) in ``out``."""
    write_jsonl(out / "instructions.jsonl", instructions(random.Random(SEED)))
    both = reviews(random.Random(SEED + 1), 500)
    write_jsonl(out / "sentiment.jsonl", both[:400])
    write_jsonl(out / "sentiment_eval.jsonl", both[400:])
    return [out / "instructions.jsonl", out / "sentiment.jsonl", out / "sentiment_eval.jsonl"]


# --- 3. randomly initialised models ----------------------------------------------------------------

def model_config(name: str, vocab: int):
    """The ``transformers`` config of model ``name`` (token ids: pad 0, bos 1, eos 2)."""
    import transformers as T

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, **ids)
    if name == "tiny-llama":
        return T.LlamaConfig(intermediate_size=176, **llama_like)
    if name == "tiny-mixtral":
        return T.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **llama_like)
    if name == "tiny-opt":
        return T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64, do_layer_norm_before=True,
                           tie_word_embeddings=True, **ids)
    raise ValueError(name)


def write_init_model(name: str, vocab: int, tokenizer_dir: Path, out: Path, *, weights: bool = True) -> None:
    """config.json (and with ``weights`` model.safetensors, seeded) plus the tokenizer files in ``out``."""
    import torch
    import transformers as T

    cfg = model_config(name, vocab)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(SEED)
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    else:
        cfg.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)


# --- 4. pre-training through meshpilot -------------------------------------------------------------

def pretrain(name: str) -> dict:
    """``meshpilot run examples/assets/pretrain_<arch>.yaml``; its first and final loss."""
    job = ASSETS / f"pretrain_{name.split('-', 1)[1]}.yaml"
    run_dir = BUILD / "pretrain" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(job.relative_to(REPO)),
           "--run-dir", str(run_dir.relative_to(REPO)), "--no-progress"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.time() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {str(r["step"]): round(r["eval_loss"], 4) for r in records if r.get("eval_loss") is not None}
    return {"command": "meshpilot run " + str(job.relative_to(REPO)), "steps": summary["results"][0]["step"],
            "first_loss": round(records[0]["loss"], 4), "final_loss": round(summary["final_loss"], 4),
            "eval_loss_by_step": evals, "wall_s": round(wall, 1)}


# --- --check ---------------------------------------------------------------------------------------

def _differences(fresh: Path, committed: Path, what: str) -> list[str]:
    """Where ``committed`` disagrees with ``fresh`` (config.json: every key of the fresh one but
    :data:`EXPORT_OWNED_KEYS`; other files: equal JSON or bytes)."""
    if not committed.is_file():
        return [f"{what}: {committed} is missing"]
    if fresh.suffix == ".json":
        a, b = json.loads(fresh.read_text()), json.loads(committed.read_text())
        if fresh.name == "config.json":
            return [f"{what}: {k} = {b.get(k, '<missing>')!r}, a fresh build has {v!r}"
                    for k, v in a.items() if k not in EXPORT_OWNED_KEYS and b.get(k, "<missing>") != v
                    and not (v is None and k in FILLED_BY_EXPORT)]
        return [] if a == b else [f"{what}: differs from a fresh build"]
    return [] if fresh.read_bytes() == committed.read_bytes() else [f"{what}: differs from a fresh build"]


def check() -> int:
    """Rebuild tokenizer, model configs and data in a temporary folder and compare (see the module docstring)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = write_tokenizer(tmp / "tokenizer")
        for f in write_data(tmp / "data"):
            problems += _differences(f, DATA / f.name, f"examples/data/{f.name}")
        for name in MODELS:
            write_init_model(name, vocab, tmp / "tokenizer", tmp / name, weights=False)
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                problems += _differences(tmp / name / f, ASSETS / name / f, f"examples/assets/{name}/{f}")
    for p in problems:
        print(p)
    print(f"make_assets --check: {'consistent' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare a fresh build (no pre-training) with the assets")
    mode.add_argument("--data", action="store_true", help="write only examples/data/*.jsonl")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    write_data(DATA)
    if args.data:
        return 0
    vocab = write_tokenizer(BUILD / "tokenizer")
    results = {}
    for name in MODELS:
        shutil.rmtree(BUILD / "init" / name, ignore_errors=True)
        write_init_model(name, vocab, BUILD / "tokenizer", BUILD / "init" / name)
        results[name] = pretrain(name)
        print(name, results[name], flush=True)
    (ASSETS / "pretraining.json").write_text(json.dumps({"vocab": vocab, "models": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
