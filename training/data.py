"""Task datasets: read a tenant's training data, check it, and turn it into labelled tokens.

Tenants hand over data in whatever shape they have, so three JSONL shapes are accepted (raw
``text``, ``prompt`` + ``completion``, chat ``messages``) plus a local Hugging Face
``datasets`` directory. Malformed data fails here, before any model is loaded, with the file
and line that is wrong. Loss is only taken on what the adapter should learn to produce:
prompt tokens and padding get the label -100. The sha256 of the raw data goes into the
adapter's manifest so a published adapter can be traced back to exactly what trained it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


class DatasetError(ValueError):
    """Training data that cannot be used; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example; ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TaskData:
    """A task's examples and the digest of the raw data they came from."""

    path: Path
    examples: list[Example]
    sha256: str
    skipped: int = 0
    files: list[Path] = field(default_factory=list)


def data_sha256(path: Path) -> str:
    """sha256 of a data file, or of every file under a directory (path and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line; ``where`` is ``file:line``."""
    records: list[tuple[str, dict[str, Any]]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: each line must be a JSON object")
        records.append((where, record))
    return records


def _read_hf_directory(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError(
            f"{path} is a directory, which is read as a Hugging Face `datasets` dataset; "
            "install it (pip install datasets) or convert the data to JSONL"
        ) from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a bad directory
        raise DatasetError(f"{path}: not a dataset saved with save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{path}: a DatasetDict needs a 'train' split")
        loaded = loaded["train"]
    return [(f"{path} row {i}", dict(row)) for i, row in enumerate(loaded)]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _string(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: '{key}' must be a non-empty string")
    return value


def _encode_chat(messages: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DatasetError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
            )
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise DatasetError(f"{where}: 'messages' has no assistant message to learn from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError(f"{where}: chat 'messages' need a tokenizer with a chat template")

    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=prompt
        )

    # Render the conversation up to each assistant turn. When every rendering is a prefix
    # of the next (true for ordinary templates), each assistant turn is a separate span and
    # all of them are learned; otherwise only the last assistant message is.
    bounds: list[tuple[str, bool]] = []
    for i in assistant:
        bounds += [(render(i, True), False), (render(i + 1, False), True)]
    full = render(len(messages), False)
    texts = [text for text, _ in bounds]
    if all(b.startswith(a) for a, b in zip(texts, [*texts[1:], full], strict=True)):
        spans = bounds
    else:
        last = assistant[-1]
        prompt_text = render(last, True)
        through = render(last + 1, False)
        if not through.startswith(prompt_text):
            raise DatasetError(f"{where}: the chat template cannot separate prompt from reply")
        spans = [(prompt_text, False), (through, True)]
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for text, learn in [*spans, (full, False)]:
        piece = _tokens(tokenizer, text[len(done):]) if len(text) > len(done) else []
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
        done = text
    return ids, labels


def encode_record(
    record: dict[str, Any], tokenizer: Any, max_length: int, where: str
) -> Example:
    """Tokenize one record; loss only on the text, the completion or assistant turns."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in record:
        ids, labels = _encode_chat(record["messages"], tokenizer, where)
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            raise DatasetError(f"{where}: 'prompt' and 'completion' must come together")
        prompt = _tokens(tokenizer, _string(record, "prompt", where))
        completion = _tokens(tokenizer, _string(record, "completion", where)) + eos
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    elif "text" in record:
        ids = _tokens(tokenizer, _string(record, "text", where)) + eos
        labels = list(ids)
    else:
        raise DatasetError(
            f"{where}: a record needs 'text', 'prompt' + 'completion', or 'messages' "
            f"(found keys {sorted(record)[:8]})"
        )
    return Example(ids[:max_length], labels[:max_length])


def load_task_data(path: Path, tokenizer: Any, max_length: int) -> TaskData:
    """Read and tokenize a task's data file (JSONL) or ``datasets`` directory."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: data file does not exist")
    if max_length < 2:
        raise DatasetError(f"max_length must be at least 2, got {max_length}")
    records = _read_hf_directory(path) if path.is_dir() else read_jsonl(path)
    if not records:
        raise DatasetError(f"{path}: no training records (the file is empty)")
    examples: list[Example] = []
    skipped = 0
    for where, record in records:
        example = encode_record(record, tokenizer, max_length, where)
        if example.loss_tokens == 0:
            skipped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        examples.append(example)
    if not examples:
        raise DatasetError(
            f"{path}: every record's prompt fills max_length={max_length}; nothing to learn from"
        )
    return TaskData(path, examples, data_sha256(path), skipped, [path])


def split_eval(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded split into (train, eval); eval is empty when fraction is 0 or data is tiny."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * fraction)
    if fraction > 0 and n_eval == 0 and len(examples) >= 2:
        n_eval = 1
    n_eval = min(n_eval, len(examples) - 1)
    held = sorted(order[:n_eval])
    held_set = set(held)
    train = [e for i, e in enumerate(examples) if i not in held_set]
    return train, [examples[i] for i in held]


def collate(examples: Iterable[Example], pad_id: int, padding_side: str = "right"):
    """Pad a batch into ``input_ids``/``attention_mask``/``labels`` tensors."""
    import torch

    batch = list(examples)
    width = max(len(e.input_ids) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        pad = width - len(e.input_ids)
        if padding_side == "left":
            ids.append([pad_id] * pad + e.input_ids)
            mask.append([0] * pad + [1] * len(e.input_ids))
            labels.append([IGNORE_INDEX] * pad + e.labels)
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
            labels.append(e.labels + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
