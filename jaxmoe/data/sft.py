"""Read chat jsonl files, validate them, split train/valid, tokenize with the GLM-4.5 template, truncate.

Accepted rows (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...], "tools": [...]}
    `conversation` / `conversations` are aliases of `messages`; ShareGPT turns {"from": "human"|"gpt"|
    "system"|"observation", "value": "..."} are mapped to roles. A top-level "system" string is used as the
    system turn. Assistant turns may carry OpenAI `tool_calls` and `reasoning_content`; `tools` may be a
    list or a JSON string.

Every bad row raises DataError naming `file:line`. Truncation follows Megatron-SWIFT: a sample longer than
max_length tokens is dropped and counted (`delete`), cut from the left / right, or reported (`raise`).
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jaxmoe.data.template import TemplateError, encode

TRUNCATION_STRATEGIES = ("delete", "left", "right", "raise")
MESSAGE_KEYS = ("messages", "conversation", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function": "tool"}
# Below this many rows a process pool costs more than it saves.
PARALLEL_MIN_ROWS = 20000


class DataError(ValueError):
    """A dataset row is unusable; the message starts with file:line."""


@dataclass
class Row:
    where: str  # "path:line"
    messages: list
    tools: Any = None


@dataclass
class Sample:
    ids: np.ndarray   # int32 [n]
    mask: np.ndarray  # int8 [n], 1 = trained-on token


@dataclass
class SplitStats:
    rows: int = 0
    samples: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "samples": self.samples, "dropped": dict(self.dropped),
                "truncated": self.truncated, "tokens": self.tokens, "loss_tokens": self.loss_tokens}


def _normalize_messages(obj: dict, where: str) -> Row:
    key = next((k for k in MESSAGE_KEYS if k in obj), None)
    if key is None:
        raise DataError(f"{where}: no conversation found; expected a \"messages\" list (or \"conversation\" / "
                        f"\"conversations\"), got keys {sorted(obj)}")
    raw = obj[key]
    if not isinstance(raw, list):
        raise DataError(f"{where}: \"{key}\" must be a list of turns, got {type(raw).__name__}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with \"role\" and \"content\"")
        if "role" not in m and "from" in m:  # ShareGPT
            frm = m["from"]
            if frm not in SHAREGPT_ROLES:
                raise DataError(f"{where}: {key}[{i}] has unknown ShareGPT speaker {frm!r}; use one of "
                                f"{', '.join(SHAREGPT_ROLES)}")
            m = {"role": SHAREGPT_ROLES[frm], "content": m.get("value")}
        elif "role" not in m:
            raise DataError(f"{where}: {key}[{i}] has no \"role\" (or ShareGPT \"from\"); add "
                            f"\"role\": \"user\"|\"assistant\"|\"system\"|\"tool\"")
        messages.append(m)
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return Row(where, messages, obj.get("tools"))


def read_jsonl(paths: str | Sequence[str]) -> list[Row]:
    """Parse and normalize every row of every file (in order); raises DataError on the first bad line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[Row] = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: dataset file not found; check --dataset (space-separated jsonl paths)")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line); save the file "
                                    "as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                                    f"one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
                rows.append(_normalize_messages(obj, where))
    if not rows:
        raise DataError(f"no rows in {', '.join(map(os.fspath, paths))}: the dataset files are empty")
    return rows


def split_rows(rows: list, ratio: float, seed: int) -> tuple[list, list]:
    """Deterministic train/valid split: a seeded permutation, the first round(n * ratio) rows (>= 1) go to valid."""
    if not 0.0 <= ratio < 1.0:
        raise DataError(f"--split_dataset_ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0 or len(rows) < 2:
        return list(rows), []
    n_valid = min(len(rows) - 1, max(1, int(round(len(rows) * ratio))))
    perm = np.random.default_rng(seed).permutation(len(rows))
    valid_idx = np.sort(perm[:n_valid])
    train_idx = np.sort(perm[n_valid:])
    return [rows[i] for i in train_idx], [rows[i] for i in valid_idx]


def _encode_row(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    try:
        return encode(row.messages, row.tools, tokenizer)
    except TemplateError as e:
        raise DataError(f"{row.where}: {e}") from None


_WORKER_TOKENIZER = None


def _worker_init(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(rows: list[Row]):
    return [_encode_row(r, _WORKER_TOKENIZER) for r in rows]


def _encode_all(rows: list[Row], tokenizer, num_proc: int | None):
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(rows) >= PARALLEL_MIN_ROWS else 1
    if num_proc <= 1 or len(rows) < 2 * num_proc:
        return [_encode_row(r, tokenizer) for r in rows]
    chunk = max(1, len(rows) // (num_proc * 4))
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    # spawn, not fork: the parent may already run jax / tokenizer threads.
    with multiprocessing.get_context("spawn").Pool(num_proc, _worker_init, (tokenizer,)) as pool:
        out = []
        for part in pool.imap(_worker_encode, chunks):
            out += part
    return out


def tokenize_rows(rows: list[Row], tokenizer, max_length: int, truncation_strategy: str = "delete",
                  num_proc: int | None = None) -> tuple[list[Sample], SplitStats]:
    if truncation_strategy not in TRUNCATION_STRATEGIES:
        raise DataError(f"--truncation_strategy {truncation_strategy!r} is not one of "
                        f"{', '.join(TRUNCATION_STRATEGIES)}")
    if max_length < 2:
        raise DataError(f"--max_length must be >= 2 tokens, got {max_length}")
    stats = SplitStats(rows=len(rows))
    samples: list[Sample] = []
    for row, (ids, mask) in zip(rows, _encode_all(rows, tokenizer, num_proc)):
        if len(ids) > max_length:
            if truncation_strategy == "raise":
                raise DataError(f"{row.where}: sample has {len(ids)} tokens > --max_length {max_length}; raise "
                                f"--max_length or use --truncation_strategy delete|left|right")
            if truncation_strategy == "delete":
                stats.dropped["too_long"] = stats.dropped.get("too_long", 0) + 1
                continue
            sl = slice(-max_length, None) if truncation_strategy == "left" else slice(0, max_length)
            ids, mask = ids[sl], mask[sl]
            stats.truncated += 1
        # labels are ids[1:]: a sample whose only trained token is its first one trains nothing
        if not any(mask[1:]):
            stats.dropped["no_loss_tokens"] = stats.dropped.get("no_loss_tokens", 0) + 1
            continue
        samples.append(Sample(np.asarray(ids, np.int32), np.asarray(mask, np.int8)))
        stats.tokens += len(ids)
        stats.loss_tokens += int(np.sum(mask[1:]))
    stats.samples = len(samples)
    return samples, stats


def load_sft_samples(dataset_paths, tokenizer, max_length: int, truncation_strategy: str = "delete",
                     split_dataset_ratio: float = 0.0, seed: int = 42, num_proc: int | None = None):
    """-> (train_samples, valid_samples, stats dict)."""
    rows = read_jsonl(dataset_paths)
    train, valid = split_rows(rows, split_dataset_ratio, seed)
    train_s, train_stats = tokenize_rows(train, tokenizer, max_length, truncation_strategy, num_proc)
    valid_s, valid_stats = tokenize_rows(valid, tokenizer, max_length, truncation_strategy, num_proc)
    if not train_s:
        raise DataError(f"no usable training samples out of {len(train)} rows (dropped: {train_stats.dropped}); "
                        f"raise --max_length or use --truncation_strategy left|right")
    stats = {"rows_read": len(rows), "train": train_stats.as_dict(), "valid": valid_stats.as_dict()}
    return train_s, valid_s, stats
