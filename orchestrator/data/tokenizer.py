"""Tokenizers for datasets: the byte tokenizer, or a model directory's ``tokenizer.json``.

Both give :func:`load_tokenizer`'s interface: ``encode_batch(texts)`` (ids without special
tokens), ``prefix_ids`` (the special tokens the tokenizer puts before a single sequence, e.g.
LLaMA's BOS; empty for GPT-2 and the byte tokenizer), ``eos_id``, ``pad_id``, ``chat_template``
(None without one), ``render_chat(messages, add_generation_prompt)``, ``name`` and
``fingerprint`` (SHA-256 of the files that decide the ids).

The byte tokenizer: token id = byte value (0-255) of the UTF-8 text, plus ``BOS = 256``,
``EOS = 257``, ``PAD = 258`` (vocabulary size 259); any text round-trips exactly.

A model directory's tokenizer is read with the ``tokenizers`` library from ``tokenizer.json``
(no ``transformers``, which would import torch into the driver); its EOS, PAD and BOS tokens
from ``tokenizer_config.json`` (``eos_token``, ``pad_token``: a string or ``{"content": ...}``)
or ``config.json`` (``eos_token_id``, ``pad_token_id``); the chat template from
``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``, rendered in a
sandboxed Jinja environment as ``transformers``' ``apply_chat_template`` renders it
(``trim_blocks``, ``lstrip_blocks``; ``messages``, ``add_generation_prompt``, the special
tokens as strings, ``raise_exception``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from meshpilot.orchestrator.errors import ConfigError

BYTES = 256
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS, EOS, PAD
    name = "byte"
    fingerprint = "byte-1"
    prefix_ids: tuple[int, ...] = ()
    chat_template = None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = ([np.array([BOS], np.uint16)] if bos else []) + [ids] + ([np.array([EOS], np.uint16)] if eos else [])
        return np.concatenate(parts) if len(parts) > 1 else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        return bytes(int(i) for i in arr if 0 <= i < BYTES).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        raise NotImplementedError("the byte tokenizer has no chat template")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(key, str(path), reason=f"cannot read {path.name}: {str(e)[:200]}") from None
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A ``tokenizer.json`` (``tokenizers`` library) with its folder's special tokens and chat template."""

    def __init__(self, tokenizer_json: Path, *, key: str):
        from tokenizers import Tokenizer

        folder = tokenizer_json.parent
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises its own exception type
            raise ConfigError(key, str(tokenizer_json), reason=f"cannot load the tokenizer: {str(e)[:200]}") from None
        cfg = _read_json(folder / "tokenizer_config.json", key)
        model_cfg = _read_json(folder / "config.json", key)
        self.name = str(tokenizer_json)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: t for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                               if (t := _token_text(cfg.get(k))) is not None}
        self.eos_id = self._special_id("eos_token", model_cfg.get("eos_token_id"))
        self.pad_id = self._special_id("pad_token", model_cfg.get("pad_token_id"))
        template = cfg.get("chat_template")
        if isinstance(template, list):          # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        jinja_file = folder / "chat_template.jinja"
        if not isinstance(template, str) and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None
        self.prefix_ids = self._prefix()
        h = hashlib.sha256()
        for f in (tokenizer_json, folder / "tokenizer_config.json", jinja_file, folder / "config.json"):
            h.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\0")
        self.fingerprint = h.hexdigest()
        self._template = None

    def _special_id(self, name: str, fallback: Any) -> int | None:
        text = self.special_tokens.get(name)
        if text is not None and self.tok.token_to_id(text) is not None:
            return int(self.tok.token_to_id(text))
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return int(fallback) if isinstance(fallback, int) and not isinstance(fallback, bool) else None

    def _prefix(self) -> tuple[int, ...]:
        """The special tokens the post-processor puts before a single sequence (BOS, or none):
        where the plain ids of a probe text start inside its ids with special tokens."""
        probe = "a b"
        plain = self.tok.encode(probe, add_special_tokens=False).ids
        full = self.tok.encode(probe, add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return tuple(full[:i])
        return ()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template or "")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)


TextTokenizer = ByteTokenizer | HFTokenizer


def find_tokenizer_json(spec: str) -> Path | None:
    """``spec`` itself when it is a ``*.json`` file, else ``spec/tokenizer.json`` if it exists."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        return p
    return p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None


def load_tokenizer(spec: str | None, *, key: str, fallback_to_bytes: bool = False) -> TextTokenizer:
    """``byte`` or None: the byte tokenizer; a folder holding ``tokenizer.json`` (or that file):
    :class:`HFTokenizer`. A folder without one is a ConfigError naming ``key``, unless
    ``fallback_to_bytes`` (the model directory's default: a model without a tokenizer)."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    found = find_tokenizer_json(spec)
    if found is None:
        if fallback_to_bytes:
            return ByteTokenizer()
        raise ConfigError(key, spec, reason="is neither 'byte' nor a folder holding tokenizer.json (nor such a file)",
                          fix=f"set {key} to the model directory with tokenizer.json, or {key}=byte")
    return HFTokenizer(found, key=key)
