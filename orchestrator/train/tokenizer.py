"""The byte tokenizer (token id = UTF-8 byte, then BOS 256, EOS 257, PAD 258), kept here for
existing imports; it lives in :mod:`meshpilot.orchestrator.data.tokenizer` beside the model
directory tokenizers, where the torch-free driver can use it."""
from __future__ import annotations

from meshpilot.orchestrator.data.tokenizer import BOS, BYTES, EOS, PAD, VOCAB_SIZE, ByteTokenizer

__all__ = ["BOS", "BYTES", "EOS", "PAD", "VOCAB_SIZE", "ByteTokenizer"]
