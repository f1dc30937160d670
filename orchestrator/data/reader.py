"""Local dataset files -> documents, read offline with the ``datasets`` library.

A dataset is a file or a folder (its files with the suffixes below, in sorted path order,
sub-folders included, names starting with ``.`` skipped):

==============  =============================  ===============================================
suffix          read as                        one document
==============  =============================  ===============================================
``.txt``        ``load_dataset("text",         a paragraph: text between blank lines
                sample_by="paragraph")``       (a file without blank lines is one document)
``.jsonl``,     ``load_dataset("json")``       a record (a JSON object per line, or a list)
``.json``
``.parquet``    ``load_dataset("parquet")``    a row
==============  =============================  ===============================================

Formats (``train.dataset.format``): ``text`` (``.txt`` files), ``jsonl-text`` (the
``text_field`` of each record), ``prompt-completion`` (``prompt_field`` then
``completion_field``; the prompt is masked out of the loss with ``mask_prompt``), ``chat``
(``messages_field``: a list of ``{role, content}``; the assistant turns are trained, the rest
masked with ``mask_prompt``), or ``auto``: ``text`` for ``.txt``, else chosen from the first
file's columns (messages, then prompt + completion, then text).

A document is a list of segments ``(text, trained)``. Chat documents are rendered with the
tokenizer's chat template when it has one: for each assistant turn ``i`` the template renders
``messages[:i]`` with the generation prompt and ``messages[:i+1]``; the text between the two
(the reply and the template's end-of-turn marker) is trained. Without a chat template (or with
the byte tokenizer) the plain template :func:`plain_chat` renders ``"{role}: {content}\\n"``
per message, the assistant's ``content\\n`` trained.

``datasets`` is told to stay offline (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, set
before it is imported) and writes its Arrow files to a folder the caller gives (removed by
:mod:`.prepare`), not to ``~/.cache/huggingface``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from meshpilot.orchestrator.errors import ConfigError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FORMATS = ("auto", "text", "jsonl-text", "prompt-completion", "chat")
Segment = tuple[str, bool]              # (text, trained)
Document = list[Segment]


@dataclass(frozen=True)
class Fields:
    """Record field names (``train.dataset.*_field``) and whether prompts are masked."""
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    mask_prompt: bool = True


def is_dataset(data: str) -> bool:
    """``train.data`` names a dataset (a file with one of :data:`SUFFIXES`, or a folder), not a
    token file, ``demo`` or ``synthetic``."""
    return data not in ("synthetic", "demo") and (Path(data).suffix.lower() in SUFFIXES or Path(data).is_dir())


def dataset_files(data: str, *, key: str = "train.data") -> list[Path]:
    """The files of a dataset, sorted; ConfigError naming ``key`` when there are none."""
    p = Path(data).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ConfigError(key, data, reason="the folder holds no " + "/".join(SUFFIXES) + " files",
                              fix=f"point {key} at a dataset file or a folder of them")
        return files
    if not p.is_file():
        raise ConfigError(key, data, reason="no such dataset file", fix=f"check the path, or set {key}=demo")
    return [p]


def _offline_datasets() -> Any:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    datasets.disable_progress_bars()
    return datasets


def load_table(path: Path, *, cache_dir: Path, key: str = "train.data") -> Any:
    """One file as a ``datasets.Dataset`` (Arrow, memory-mapped from ``cache_dir``)."""
    datasets = _offline_datasets()
    builder = SUFFIXES[path.suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(cache_dir),
                                     **kwargs)
    except Exception as e:  # malformed JSON/Parquet: the library's many error types
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError(key, str(path), reason=f"cannot be read as {builder}: {first}") from None


def detect_format(fmt: str, path: Path, columns: list[str], fields: Fields) -> str:
    """The format of a file: ``fmt`` itself (checked against the file), or chosen for ``auto``."""
    text_file = path.suffix.lower() == ".txt"
    if fmt == "auto":
        if text_file:
            return "text"
        if fields.messages in columns:
            return "chat"
        if fields.prompt in columns and fields.completion in columns:
            return "prompt-completion"
        if fields.text in columns:
            return "jsonl-text"
        raise ConfigError("train.dataset.text_field", fields.text, reason=f"{path.name} has no column "
                          f"{fields.text!r} (nor {fields.messages!r}, nor {fields.prompt!r} + {fields.completion!r}); "
                          f"its columns: {', '.join(columns[:20])}",
                          fix="set train.dataset.text_field (or prompt_field/completion_field/messages_field) "
                              "to the file's column")
    if text_file != (fmt == "text"):
        raise ConfigError("train.dataset.format", fmt, reason=f"{path.name} is a "
                          f"{'plain text' if text_file else 'records'} file",
                          fix="use format text for .txt files, jsonl-text/prompt-completion/chat for JSON or "
                              "Parquet records, or format auto")
    need = {"jsonl-text": [("text_field", fields.text)], "chat": [("messages_field", fields.messages)],
            "prompt-completion": [("prompt_field", fields.prompt), ("completion_field", fields.completion)]}
    for name, col in need.get(fmt, []):
        if col not in columns:
            raise ConfigError(f"train.dataset.{name}", col, reason=f"{path.name} has no such column; its columns: "
                              f"{', '.join(columns[:20])}", fix=f"set train.dataset.{name} to one of them")
    return fmt


def plain_chat(messages: list[dict[str, str]], mask_prompt: bool) -> Document:
    """The plain chat template: ``"{role}: {content}\\n"`` per message; the assistant's
    ``"{content}\\n"`` is trained, the rest only when prompts are not masked."""
    out: Document = []
    for m in messages:
        if m["role"] == "assistant":
            out += [("assistant: ", not mask_prompt), (m["content"] + "\n", True)]
        else:
            out.append((f"{m['role']}: {m['content']}\n", not mask_prompt))
    return out


def template_chat(messages: list[dict[str, str]], tokenizer: Any, mask_prompt: bool, where: str) -> Document:
    """Segments of the chat template's rendering: the text each assistant turn adds (after the
    generation prompt) is trained."""
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    out: Document = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        upto = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise ConfigError("train.dataset.format", "chat", reason=f"{where}: the tokenizer's chat template does "
                              "not render the conversation's first turns as a prefix of the whole, so the assistant "
                              "replies cannot be located", fix="render the conversations to prompt/completion "
                              "records and use format prompt-completion")
        if len(before) > done:
            out.append((full[done:len(before)], not mask_prompt))
        out.append((full[len(before):len(upto)], True))
        done = len(upto)
    if done < len(full):
        out.append((full[done:], not mask_prompt))
    return [s for s in out if s[0]]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise ConfigError("train.dataset.messages_field", where, reason="must be a list of {role, content} "
                          "objects with string values")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value: Any, field_key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(field_key, where, reason=f"holds a {type(value).__name__}, not a string")
    return value


def documents(table: Any, fmt: str, fields: Fields, tokenizer: Any, *, name: str, start: int = 0,
              stop: int | None = None, batch: int = 1000) -> Iterator[Document]:
    """Documents of rows ``[start, stop)`` of ``table`` in format ``fmt`` (a resolved format).
    An empty document (no text) is yielded as ``[]``; the caller counts and skips it."""
    stop = table.num_rows if stop is None else stop
    for lo in range(start, stop, batch):
        cols = table[lo:min(stop, lo + batch)]
        n = len(next(iter(cols.values()))) if cols else 0
        for j in range(n):
            where = f"{name} record {lo + j + 1}"
            if fmt == "text":
                text = cols["text"][j].strip("\n")
                yield [(text, True)] if text.strip() else []
            elif fmt == "jsonl-text":
                text = _text(cols[fields.text][j], "train.dataset.text_field", where)
                yield [(text, True)] if text else []
            elif fmt == "prompt-completion":
                p = _text(cols[fields.prompt][j], "train.dataset.prompt_field", where)
                c = _text(cols[fields.completion][j], "train.dataset.completion_field", where)
                yield [s for s in ((p, not fields.mask_prompt), (c, True)) if s[0]] if c else []
            else:
                msgs = _messages(cols[fields.messages][j], where)
                if not any(m["role"] == "assistant" for m in msgs):
                    yield []
                elif tokenizer.chat_template is not None:
                    yield template_chat(msgs, tokenizer, fields.mask_prompt, where)
                else:
                    yield plain_chat(msgs, fields.mask_prompt)
