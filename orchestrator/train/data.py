"""Training data: a memory-mapped token file, a prepared dataset (or synthetic tokens), sharded by
data-parallel rank.

``train.data`` is ``synthetic``, ``demo``, a token file, or a local dataset (``.txt``,
``.jsonl``/``.json``, ``.parquet`` or a folder of them), which the driver tokenizes, packs and
caches before the workers start (:mod:`meshpilot.orchestrator.data.prepare`; ``meshpilot data
prepare`` does it ahead of time); a worker only memory-maps the cache. Token file format:
:mod:`meshpilot.orchestrator.data.tokens`. Build a byte-level one from a text file with::

    python -m meshpilot.orchestrator.train.data prepare --input corpus.txt --out tokens.bin
    python -m meshpilot.orchestrator.train.data prepare --input demo --out demo.bin

Samples: in a stream file sample ``i`` is the window ``tokens[i*S : i*S + S + 1]`` (S =
seq_len); in a packed file (a prepared dataset) the ``i``-th stored window of ``S + 1`` tokens.
The model reads ``input_ids = w[:-1]`` and ``labels = w[1:]`` (labels are already shifted); in a
packed file a label whose loss-mask entry is 0 (a document's first token, a masked prompt,
padding) is ``IGNORE_INDEX`` (-100), which the model's loss skips. ``train.data=demo``
tokenizes the corpus shipped in ``orchestrator/train/corpus/`` in memory;
``train.data=synthetic`` draws uniform tokens from a generator seeded per sample.

Order: global sample number ``g`` (counted from the start of training) maps to epoch
``e = g // N`` and sample ``perm_e[g % N]``, where ``perm_e`` is a permutation drawn from
``numpy.random.default_rng([seed, e])``. Step ``s`` consumes global samples
``[s*B, (s+1)*B)`` (B = global batch); data-parallel rank ``r`` takes, for micro-step ``m``,
rows ``s*B + m*(mb*dp) + r*mb + [0, mb)``. The union of a step's samples therefore does
not depend on the plan (dp, micro batch, accumulation), and resuming at step ``s`` only
needs ``s``: the position is exact, with no iterator state. Evaluation reads the eval split
with the same layout, unshuffled: evaluation batch ``k`` is eval samples ``[k*B, (k+1)*B)``
(modulo the split's size).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from meshpilot.orchestrator.data.prepare import DatasetOptions, find_prepared
from meshpilot.orchestrator.data.reader import is_dataset
from meshpilot.orchestrator.data.tokenizer import ByteTokenizer
from meshpilot.orchestrator.data.tokens import IGNORE_INDEX, read_token_file, sidecar_path, write_token_file
from meshpilot.orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "meshpilot-tokens"
DEMO_CORPUS = Path(__file__).resolve().parent / "corpus" / "demo_corpus.txt"


# --- token files -----------------------------------------------------------------------------

def open_token_file(path: str | Path, *, key: str = "train.data") -> tuple[np.ndarray, dict]:
    """Memory-map a token file's tokens; raise ConfigError naming ``key`` if it is missing or
    malformed (:func:`meshpilot.orchestrator.data.tokens.read_token_file`, the one reader)."""
    f = read_token_file(path, key=key)
    return f.tokens, f.meta


def demo_tokens() -> np.ndarray:
    """The shipped demo corpus, byte-tokenized (one document, no specials: ids < 256)."""
    return ByteTokenizer().encode(DEMO_CORPUS.read_text(encoding="utf-8"))


# --- sample sources ----------------------------------------------------------------------------

class SampleSource(Protocol):
    num_samples: int
    seq_len: int
    has_mask: bool          # whether :meth:`mask` gives loss masks (packed files); else every label counts

    def sample(self, index: int) -> np.ndarray:
        """``seq_len + 1`` token ids of sample ``index`` (0 <= index < num_samples)."""

    def mask(self, index: int) -> np.ndarray:
        """``seq_len + 1`` entries, 1 where the token is a target (only when ``has_mask``)."""


class WindowSamples:
    """Non-overlapping windows of ``seq_len + 1`` tokens (the last token of one is the first of the next).

    With ``vocab``, a window holding an id >= vocab is a ConfigError (naming ``key``): a token
    file whose sidecar under-reports its largest id fails at the first such sample, not inside
    the embedding (an IndexError the controller would retry)."""

    has_mask = False
    stride_extra = 0            # window i starts at i * (seq_len + stride_extra): here they share one token

    def __init__(self, tokens: np.ndarray, seq_len: int, *, vocab: int | None = None, key: str = "train.data",
                 what: str = "the token file"):
        self.tokens, self.seq_len, self.vocab, self.key, self.what = tokens, seq_len, vocab, key, what
        self.num_samples = (len(tokens) - 1 + self.stride_extra) // (seq_len + self.stride_extra)

    def sample(self, index: int) -> np.ndarray:
        s = index * (self.seq_len + self.stride_extra)
        w = np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)
        if self.vocab is not None and w.size and (int(w.max()) >= self.vocab or int(w.min()) < 0):
            bad = int(w.max()) if int(w.max()) >= self.vocab else int(w.min())
            raise ConfigError(self.key, self.what, reason=f"sample {index} holds token id {bad}, outside "
                              f"model.vocab={self.vocab}", fix="rebuild the token file for this vocabulary")
        return w


class PackedSamples(WindowSamples):
    """The stored windows of a packed token file (``seq_len + 1`` tokens each, no sharing) and
    their loss masks."""

    has_mask = True
    stride_extra = 1            # stored one after the other: len(tokens) // (seq_len + 1) windows

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, seq_len: int, *, vocab: int | None = None,
                 key: str = "train.data", what: str = "the token file"):
        super().__init__(tokens, seq_len, vocab=vocab, key=key, what=what)
        self.mask_array = mask

    def mask(self, index: int) -> np.ndarray:
        s = index * (self.seq_len + 1)
        return np.asarray(self.mask_array[s:s + self.seq_len + 1], dtype=np.uint8)


class SyntheticSamples:
    """Uniform random tokens in ``[0, vocab)``; sample ``i`` is drawn from ``default_rng([seed, i])``."""

    has_mask = False

    def __init__(self, vocab: int, seq_len: int, seed: int, num_samples: int = 1 << 40):
        self.vocab, self.seq_len, self.seed, self.num_samples = vocab, seq_len, seed, num_samples

    def sample(self, index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, index]).integers(0, self.vocab, self.seq_len + 1, dtype=np.int64)


# --- sharded, resumable batches ----------------------------------------------------------------

@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int
    grad_accum: int
    dp: int
    dp_rank: int

    def __post_init__(self) -> None:
        assert self.micro_batch * self.grad_accum * self.dp == self.global_batch, self
        assert 0 <= self.dp_rank < self.dp, self

    def global_indices(self, step: int, micro: int) -> range:
        start = step * self.global_batch + micro * self.micro_batch * self.dp + self.dp_rank * self.micro_batch
        return range(start, start + self.micro_batch)


class ShardedBatches:
    """This data-parallel rank's micro-batches for any step (a pure function of the step)."""

    def __init__(self, source: SampleSource, layout: BatchLayout, *, seed: int, shuffle: bool = True):
        self.source, self.layout, self.seed, self.shuffle = source, layout, seed, shuffle
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle or self.source.num_samples >= 1 << 32:   # synthetic: already random
            return None
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def sample_of(self, g: int) -> int:
        """Which sample global sample number ``g`` reads."""
        n = self.source.num_samples
        perm = self._order(g // n)
        return int(perm[g % n]) if perm is not None else g % n

    def micro_batch(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels), each ``[micro_batch, seq_len]`` int64; labels whose loss mask is 0
        are ``IGNORE_INDEX``."""
        index = [self.sample_of(g) for g in self.layout.global_indices(step, micro)]
        rows = np.stack([self.source.sample(i) for i in index])
        x, y = rows[:, :-1], rows[:, 1:]
        if self.source.has_mask:
            keep = np.stack([self.source.mask(i) for i in index])[:, 1:].astype(bool)
            y = np.where(keep, y, IGNORE_INDEX)
        return x, y

    def step_batches(self, step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for m in range(self.layout.grad_accum):
            yield self.micro_batch(step, m)

    @staticmethod
    def consumed_samples(step: int, global_batch: int) -> int:
        return step * global_batch


def resolve_source(data: str, *, vocab: int, seq_len: int, seed: int, key: str = "train.data") -> SampleSource:
    """``synthetic`` | ``demo`` | a token file path -> a sample source; ConfigError for user mistakes."""
    if data == "synthetic":
        return SyntheticSamples(vocab, seq_len, seed)
    if data == "demo":
        tokens, max_token, what, f = demo_tokens(), None, "the demo corpus", None
    else:
        f = read_token_file(data, key=key)
        tokens, max_token, what = f.tokens, f.max_token, f"token file {data}"
    if max_token is None:
        max_token = int(tokens.max())
    if max_token >= vocab:
        raise ConfigError(key, data, reason=f"{what} has token id {max_token} >= model.vocab={vocab}",
                          fix=f"set model.vocab>={max_token + 1}")
    if f is not None and f.packed:
        if int(f.meta["seq_len"]) != seq_len:
            raise ConfigError("train.seq_len", seq_len, reason=f"{what} holds windows packed for seq_len "
                              f"{f.meta['seq_len']}", fix=f"set train.seq_len={f.meta['seq_len']}, or prepare the "
                              "dataset again for this seq_len")
        src: SampleSource = PackedSamples(tokens, f.mask, seq_len, vocab=vocab, key=key, what=data)
    else:
        src = WindowSamples(tokens, seq_len, vocab=vocab, key=key, what=data)
    if src.num_samples < 1:
        raise ConfigError(key, data, reason=f"{what} has {len(tokens)} tokens, fewer than one sample of "
                          f"train.seq_len+1={seq_len + 1}", fix="use a shorter train.seq_len or more data")
    return src


def resolve_job_source(job, *, split: str = "train") -> SampleSource:
    """The samples of ``job``'s ``train.data`` (``split`` "train"), or of its evaluation split
    (``split`` "eval"; a dataset with ``train.dataset.eval_fraction`` or ``eval_data``).

    A dataset is read from its prepared cache only: a worker never tokenizes (the driver
    prepared it before starting the workers; ``meshpilot data prepare`` does it ahead of time)."""
    t = job.train
    if not is_dataset(t.data):
        if split != "train":
            raise ConfigError("train.eval_every", t.eval_every, reason=f"train.data={t.data} has no evaluation split")
        return resolve_source(t.data, vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed)
    ds = find_prepared(DatasetOptions.from_job(job))
    if ds is None:
        raise ConfigError("train.data", t.data, reason="the dataset has not been prepared (tokenized) for this job, "
                          "or its files, tokenizer or options changed since",
                          fix="run `meshpilot data prepare JOB.yaml` (meshpilot run does it before starting workers); "
                              "the cache folder train.dataset.cache_dir must be visible to every node")
    path = ds.train_file if split == "train" else ds.eval_file
    if path is None:
        raise ConfigError("train.eval_every", t.eval_every, reason=f"the prepared dataset {ds.directory} has no "
                          "evaluation split", fix="set train.dataset.eval_fraction or train.dataset.eval_data")
    return resolve_source(str(path), vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed, key="train.data")


# --- command line ------------------------------------------------------------------------------

def _prepare(args: argparse.Namespace) -> int:
    tok = ByteTokenizer()
    if args.input == "demo":
        tokens, source = demo_tokens(), "demo"
    else:
        src = Path(args.input)
        if not src.is_file():
            print(f"data prepare: error: --input {args.input}: no such file", file=sys.stderr)
            return 2
        docs = src.read_text(encoding="utf-8", errors="replace").split(args.doc_separator) if args.eos else \
            [src.read_text(encoding="utf-8", errors="replace")]
        tokens = np.concatenate([tok.encode(d, eos=args.eos) for d in docs if d])
        source = str(src)
    out = write_token_file(tokens, args.out, tokenizer="byte", source=source)
    print(f"wrote {out} ({tokens.size} tokens, max id {int(tokens.max())}) and {sidecar_path(out).name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshpilot.orchestrator.train.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize a UTF-8 text file (byte-level) into a token file")
    pp.add_argument("--input", required=True, help="text file, or 'demo' for the shipped corpus")
    pp.add_argument("--out", required=True, help="output token file (NAME.bin; NAME.bin.json is written beside it)")
    pp.add_argument("--eos", action="store_true", help=f"append EOS ({ByteTokenizer.eos_id}) after each document")
    pp.add_argument("--doc-separator", default="\n\n\n", help="separator between documents (with --eos)")
    args = p.parse_args(argv)
    return _prepare(args)


if __name__ == "__main__":
    sys.exit(main())
