"""Rows of training and evaluation data, read and checked; standard library only.

    .jsonl (one JSON object a line) / .txt (one "text" row a paragraph) / [dict]
        ──load_rows──► [Row(fields, line, source)] + DataReport (bad rows by line)

Row formats (other keys are ignored):
    {"prompt": str, "completion": str}
    {"messages": [{"role", "content"}, ...]}   at least one non-empty assistant message
    {"text": str}
A .txt file holds one "text" row per paragraph (blank-line separated); its line number
is the paragraph's first line. Training (edgepeft.train.data) tokenizes these rows;
evaluation (edgepeft.eval_rows) reads them too, also on the torch-free device side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class DataError(ValueError):
    """A row cannot be used; the message starts with `file:line`."""


@dataclass(frozen=True)
class Row:
    """One parsed, validated input row and where it came from."""

    fields: Mapping[str, Any]
    line: int
    """1-based line in the source file (position in the list for in-memory rows)."""
    source: str = "<rows>"

    @property
    def kind(self) -> Literal["messages", "prompt", "text"]:
        if "messages" in self.fields:
            return "messages"
        return "prompt" if "prompt" in self.fields else "text"

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class DataReport:
    """What happened to the rows of one source; filled in by `load_rows` and `tokenize_rows`."""

    source: str
    rows: int = 0
    """Rows (or paragraphs) read."""
    kept: int = 0
    """Rows that became training examples."""
    bad: list[BadRow] = field(default_factory=list)
    tokens: int = 0
    """Tokens in the kept examples (before padding)."""
    label_tokens: int = 0
    """Tokens the loss is computed on."""
    truncated: int = 0
    """Kept rows cut to max_seq_len."""

    def add_bad(self, line: int, reason: str, policy: str) -> None:
        if policy == "error":
            raise DataError(f"{self.source}:{line}: {reason} (bad_rows='skip' skips such rows)")
        self.bad.append(BadRow(line, reason))

    def to_dict(self, max_bad: int = 50) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "bad": len(self.bad),
            "bad_rows": [{"line": b.line, "reason": b.reason} for b in self.bad[:max_bad]],
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
            "truncated": self.truncated,
        }

    def __str__(self) -> str:
        text = (
            f"{self.source}: {self.rows} rows, {self.kept} kept, {len(self.bad)} bad, "
            f"{self.truncated} truncated, {self.tokens} tokens ({self.label_tokens} trained on)"
        )
        for bad in self.bad[:10]:
            text += f"\n  {self.source}:{bad.line}: {bad.reason}"
        if len(self.bad) > 10:
            text += f"\n  ... and {len(self.bad) - 10} more"
        return text


# ---------------------------------------------------------------- reading rows


def load_rows(
    path_or_rows: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    bad_rows: Literal["skip", "error"] = "skip",
) -> tuple[list[Row], DataReport]:
    """Read and validate rows from a .jsonl or .txt file, or a list of dicts.

    Args:
        path_or_rows: A file path, or rows already in memory (line = position, from 1).
        bad_rows: "skip" records unusable rows in the report; "error" raises `DataError`
            naming file:line at the first.

    Returns:
        (valid rows in file order, report).
    """
    if isinstance(path_or_rows, (str, os.PathLike)):
        path = Path(path_or_rows)
        if not path.is_file():
            raise FileNotFoundError(f"training data {path} not found")
        report = DataReport(source=str(path))
        if path.suffix == ".txt":
            numbered: Iterable[tuple[int, Any]] = _paragraphs(path, report, bad_rows)
        elif path.suffix == ".jsonl":
            numbered = _json_lines(path, report, bad_rows)
        else:
            raise ValueError(f"training data {path}: expected a .jsonl or .txt file, got {path.suffix!r}")
    elif isinstance(path_or_rows, Sequence):
        report = DataReport(source="<rows>")
        numbered = enumerate(path_or_rows, start=1)
    else:
        raise TypeError(
            f"data must be a .jsonl/.txt path or a list of row dicts, got {type(path_or_rows).__name__}"
        )
    rows = []
    for line, value in numbered:
        report.rows += 1
        reason = _problem(value)
        if reason:
            report.add_bad(line, reason, bad_rows)
        else:
            rows.append(Row(dict(value), line, report.source))
    return rows, report


def _paragraphs(path: Path, report: DataReport, bad_rows: str) -> Iterable[tuple[int, dict]]:
    """(first line, {"text"}) per paragraph; one with a line that is not UTF-8 is a bad row."""
    start, lines, bad = 0, [], None
    for number, text, problem in _lines(path):
        if problem is not None or text.strip():
            start = start or number
            lines.append(text)
            if problem is not None and bad is None:
                bad = (number, problem)
            continue
        if lines:
            yield from _paragraph(start, lines, bad, report, bad_rows)
        start, lines, bad = 0, [], None
    if lines:
        yield from _paragraph(start, lines, bad, report, bad_rows)


def _paragraph(start, lines, bad, report: DataReport, bad_rows: str) -> Iterable[tuple[int, dict]]:
    if bad is None:
        yield start, {"text": "\n".join(lines)}
        return
    number, problem = bad
    report.rows += 1
    report.add_bad(number, f"{problem} (in the paragraph from line {start})", bad_rows)


def _json_lines(path: Path, report: DataReport, bad_rows: str) -> Iterable[tuple[int, Any]]:
    for number, text, problem in _lines(path):
        if problem is not None:
            report.rows += 1
            report.add_bad(number, problem, bad_rows)
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            report.rows += 1
            report.add_bad(number, f"invalid JSON ({e.msg} at column {e.colno})", bad_rows)


def _lines(path: Path) -> Iterable[tuple[int, str, str | None]]:
    """(line number, text without its line ending, why its bytes are not UTF-8 or None).

    Decoded line by line, so one stray byte (a latin-1 row) costs its row, not the file.
    """
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                problem = (
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                    "line); save the file as UTF-8"
                )
                yield number, "", problem


def _problem(value: Any) -> str | None:
    """Why a parsed row cannot be used, or None."""
    if not isinstance(value, Mapping):
        return f"expected a JSON object, got {type(value).__name__}"
    if "messages" in value:
        return _messages_problem(value["messages"])
    if "prompt" in value or "completion" in value:
        for key in ("prompt", "completion"):
            if key not in value:
                return f"missing key {key!r} (a prompt row needs 'prompt' and 'completion')"
            if not isinstance(value[key], str):
                return f"{key!r} must be a string, got {type(value[key]).__name__}"
        if not value["completion"].strip():
            return "empty completion"
        return None
    if "text" in value:
        if not isinstance(value["text"], str):
            return f"'text' must be a string, got {type(value['text']).__name__}"
        return None if value["text"].strip() else "empty text"
    return f"no 'prompt'/'completion', 'messages' or 'text' key (keys: {sorted(value)})"


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            return f"messages[{i}] must be an object with a string 'role'"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}]['content'] must be a string"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no non-empty assistant message to train on"
    return None
