"""Training data: a memory-mapped token file (or synthetic tokens), sharded by data-parallel rank.

Token file format: ``NAME.bin`` holds the tokens as a flat little-endian array (uint16 when
the vocabulary fits, else uint32); the sidecar ``NAME.bin.json`` holds
``{"format": "meshpilot-tokens", "version": 1, "dtype", "num_tokens", "max_token",
"tokenizer", "source"}``. Build one with::

    python -m meshpilot.orchestrator.train.data prepare --input corpus.txt --out tokens.bin
    python -m meshpilot.orchestrator.train.data prepare --input demo --out demo.bin

Samples: sample ``i`` is the window ``tokens[i*S : i*S + S + 1]`` (S = seq_len); the model
reads ``input_ids = w[:-1]`` and ``labels = w[1:]`` (labels are already shifted).
``train.data=demo`` tokenizes the corpus shipped in ``orchestrator/data/`` in memory;
``train.data=synthetic`` draws uniform tokens from a generator seeded per sample.

Order: global sample number ``g`` (counted from the start of training) maps to epoch
``e = g // N`` and sample ``perm_e[g % N]``, where ``perm_e`` is a permutation drawn from
``numpy.random.default_rng([seed, e])``. Step ``s`` consumes global samples
``[s*B, (s+1)*B)`` (B = global batch); data-parallel rank ``r`` takes, for micro-step ``m``,
rows ``s*B + m*(mb*dp) + r*mb + [0, mb)``. The union of a step's samples therefore does
not depend on the plan (dp, micro batch, accumulation), and resuming at step ``s`` only
needs ``s``: the position is exact, with no iterator state.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.orchestrator.config.inputs import sidecar_path, token_file_meta
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.train.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

FORMAT = "meshpilot-tokens"
DEMO_CORPUS = Path(__file__).resolve().parent / "corpus" / "demo_corpus.txt"


# --- token files -----------------------------------------------------------------------------

def write_token_file(tokens: np.ndarray, path: str | Path, *, tokenizer: str = "byte", source: str = "") -> Path:
    """Write ``tokens`` and the sidecar atomically (temporary names, fsync, rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    max_token = int(tokens.max()) if tokens.size else 0
    dtype = np.uint16 if max_token < 2**16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "num_tokens": int(tokens.size),
            "max_token": max_token, "tokenizer": tokenizer, "source": source}
    write_atomic(path, tokens.astype(dtype).tobytes())
    write_atomic(sidecar_path(path), json.dumps(meta, indent=1) + "\n")
    return path


def open_token_file(path: str | Path, *, key: str = "train.data") -> tuple[np.ndarray, dict]:
    """Memory-map a token file; raise ConfigError naming ``key`` if it is missing or malformed
    (the checks of :func:`meshpilot.orchestrator.config.inputs.token_file_meta`)."""
    dtype, n, meta = token_file_meta(path, key=key)
    return np.memmap(Path(path), dtype=np.dtype(dtype), mode="r", shape=(n,)), meta


def demo_tokens() -> np.ndarray:
    """The shipped demo corpus, byte-tokenized (one document, no specials: ids < 256)."""
    return ByteTokenizer().encode(DEMO_CORPUS.read_text(encoding="utf-8"))


# --- sample sources ----------------------------------------------------------------------------

class SampleSource(Protocol):
    num_samples: int
    seq_len: int

    def sample(self, index: int) -> np.ndarray:
        """``seq_len + 1`` token ids of sample ``index`` (0 <= index < num_samples)."""


class WindowSamples:
    """Non-overlapping windows of ``seq_len + 1`` tokens (the last token of one is the first of the next).

    With ``vocab``, a window holding an id >= vocab is a ConfigError (naming ``key``): a token
    file whose sidecar under-reports its largest id fails at the first such sample, not inside
    the embedding (an IndexError the controller would retry)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, vocab: int | None = None, key: str = "train.data",
                 what: str = "the token file"):
        self.tokens, self.seq_len, self.vocab, self.key, self.what = tokens, seq_len, vocab, key, what
        self.num_samples = (len(tokens) - 1) // seq_len

    def sample(self, index: int) -> np.ndarray:
        s = index * self.seq_len
        w = np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)
        if self.vocab is not None and w.size and (int(w.max()) >= self.vocab or int(w.min()) < 0):
            bad = int(w.max()) if int(w.max()) >= self.vocab else int(w.min())
            raise ConfigError(self.key, self.what, reason=f"sample {index} holds token id {bad}, outside "
                              f"model.vocab={self.vocab}", fix="rebuild the token file for this vocabulary")
        return w


class SyntheticSamples:
    """Uniform random tokens in ``[0, vocab)``; sample ``i`` is drawn from ``default_rng([seed, i])``."""

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
        """(input_ids, labels), each ``[micro_batch, seq_len]`` int64."""
        rows = np.stack([self.source.sample(self.sample_of(g)) for g in self.layout.global_indices(step, micro)])
        return rows[:, :-1], rows[:, 1:]

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
        tokens, max_token, what = demo_tokens(), None, "the demo corpus"
    else:
        tokens, meta = open_token_file(data, key=key)
        max_token, what = int(meta["max_token"]), f"token file {data}"
    if max_token is None:
        max_token = int(tokens.max())
    if max_token >= vocab:
        raise ConfigError(key, data, reason=f"{what} has token id {max_token} >= model.vocab={vocab}",
                          fix=f"set model.vocab>={max_token + 1}")
    src = WindowSamples(tokens, seq_len, vocab=vocab, key=key, what=data)
    if src.num_samples < 1:
        raise ConfigError(key, data, reason=f"{what} has {len(tokens)} tokens, fewer than one sample of "
                          f"train.seq_len+1={seq_len + 1}", fix="use a shorter train.seq_len or more data")
    return src


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
