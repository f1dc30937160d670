"""A byte-level tokenizer: token id = byte value (0-255) of the UTF-8 text, plus specials.

Vocabulary: 256 byte tokens, then ``BOS = 256``, ``EOS = 257``, ``PAD = 258`` (size 259).
Any text round-trips exactly (``decode(encode(s)) == s``); no merges, no files.
"""
from __future__ import annotations

import numpy as np

BYTES = 256
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = ([np.array([BOS], np.uint16)] if bos else []) + [ids] + ([np.array([EOS], np.uint16)] if eos else [])
        return np.concatenate(parts) if len(parts) > 1 else ids

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        return bytes(int(i) for i in arr if 0 <= i < BYTES).decode("utf-8", errors="replace")
