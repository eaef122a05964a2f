"""Evaluation cases from the rows of a test set: what to ask and the reference answer.

    rows (JSONL path or list of dicts) ──edgepeft.rows.load_rows──► checked rows
        {"prompt", "completion"}       prompt as written, reference = completion
        {"messages": [..., assistant]} prompt = the messages before the final assistant
                                       one (rendered later with the chat template),
                                       reference = that assistant message
        ▼
    [EvalExample] in file order; any bad row is an error (skipping one changes the scores)

Standard library only (and edgepeft.rows): the PyTorch evaluation (edgepeft.train.evaluate)
and the device runtime's (edgepeft.runtime.evaluate) read the same examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from edgepeft.rows import load_rows


@dataclass(frozen=True)
class EvalExample:
    """One evaluation case: what the model answers and what it should say."""

    reference: str
    source: str
    """Where the row came from: "file.jsonl:LINE" ("<rows>:N" for the N-th dict of a list)."""
    prompt: str | None = None
    """The text to continue (prompt/completion rows)."""
    messages: tuple[dict, ...] | None = None
    """The chat to answer, rendered with the tokenizer's chat template (messages rows)."""


_MAX_LISTED = 5


def read_examples(data: str | os.PathLike | Sequence[dict]) -> tuple[list[EvalExample], str]:
    """(examples, name of the source) from a JSONL path or a list of dicts.

    Rows are read and checked by the training data module (`load_rows`); every bad
    row is an error here, since skipping one would change what the scores mean.

    Raises:
        ValueError: bad rows (each named by file:line), no rows, or a row with no
            reference ("text" rows, messages not ending with the assistant's).
        FileNotFoundError: the path does not exist.
    """
    rows, report = load_rows(data, bad_rows="skip")
    if report.bad:
        listed = "; ".join(f"{report.source}:{b.line}: {b.reason}" for b in report.bad[:_MAX_LISTED])
        more = f" (and {len(report.bad) - _MAX_LISTED} more)" if len(report.bad) > _MAX_LISTED else ""
        raise ValueError(
            f"{len(report.bad)} bad row(s) in evaluation data: {listed}{more}; fix them: "
            "evaluation scores every row"
        )
    if not rows:
        raise ValueError(f"evaluation data {report.source} holds no rows")
    examples = []
    for row in rows:
        where = f"{row.source}:{row.line}"
        if row.kind == "prompt":
            examples.append(EvalExample(row["completion"], where, prompt=row["prompt"]))
        elif row.kind == "messages":
            history, answer = _split_chat(row["messages"], where)
            examples.append(EvalExample(answer, where, messages=tuple(history)))
        else:
            raise ValueError(
                f"{where}: a 'text' row has no reference to score; evaluation needs "
                "prompt/completion or messages rows"
            )
    return examples, report.source


def _split_chat(messages: list[dict], where: str) -> tuple[list[dict], str]:
    """(the messages to answer, the final assistant message's text: the reference)."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: 'messages' must end with the assistant message to score, after at least "
            f"one message to answer; found roles {[m['role'] for m in messages]}"
        )
    return messages[:-1], messages[-1]["content"]


__all__ = ["EvalExample", "read_examples"]
