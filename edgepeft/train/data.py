"""Training data: rows from a file or a list ─► token ids with completion-only labels ─► batches.

    .jsonl / .txt / [dict] ──load_rows──► [Row(fields, line)] + DataReport (bad rows by line)
        ──split_rows(seed)──► train rows │ val rows
        ──tokenize_rows──► [Example(input_ids, labels)]     labels -100 on prompt tokens
        ──pack_examples (packing=True, train only)──► rows of whole examples ≤ max_seq_len
        ──EpochSampler(seed; position = epoch, index)──► collate ──► Batch (B, T), right-padded

Row formats (one JSON object per line; other keys are ignored):
    {"prompt": str, "completion": str}   [BOS] prompt completion EOS; loss on completion + EOS
    {"messages": [{"role", "content"}]}  rendered by tokenizer.apply_chat_template; loss on
                                         every assistant turn (the template's end-of-turn included)
    {"text": str}                        [BOS] text EOS; loss on everything
A .txt file holds one "text" example per paragraph (blank-line separated); its line
number is the paragraph's first line. BOS is added only when the tokenizer itself
adds one to plain text (Llama does, GPT-2 and Qwen do not), so rows look like pretraining.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Reading and checking rows needs no torch; it lives in edgepeft.rows (the device side uses it).
from edgepeft.rows import BadRow, DataError, DataReport, Row, load_rows  # noqa: F401

IGNORE = -100
"""Label of a token that is not trained on (prompt, padding)."""


def split_rows(rows: Sequence[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic (train, val) split by `seed`; each part keeps file order.

    With a fraction > 0 and at least two rows, validation gets at least one row
    and training keeps at least one.
    """
    n = len(rows)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held_out]
    val = [r for i, r in enumerate(rows) if i in held_out]
    return train, val


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Example:
    """One training row as token ids; labels are the ids, IGNORE where not trained on."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int
    """Source line of the (first) row in it."""

    @property
    def label_tokens(self) -> int:
        """Positions that are predicted and trained on (the first token is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def tokenize_rows(rows: Sequence[Row], tokenizer, config, *, report: DataReport | None = None) -> list[Example]:
    """Token ids and labels of `rows`, cut to `config.max_seq_len`.

    Rows left with nothing to train on after truncation are bad rows: recorded in
    `report` (when given) or raised, following `config.bad_rows`.

    Args:
        config: A TrainConfig (uses max_seq_len, completion_only, bad_rows).
        report: Updated in place: kept, tokens, label_tokens, truncated, bad rows.
    """
    report = report if report is not None else DataReport(source=rows[0].source if rows else "<rows>")
    bos = bos_to_add(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for row in rows:
        pieces = _pieces(row, tokenizer)  # [(text, trained)]
        ids, trained = list(bos), [False] * len(bos)
        for text, is_target in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            trained += [is_target or not config.completion_only] * len(piece)
        if row.kind != "messages":  # a chat template closes its own turns
            ids += eos
            trained += [True] * len(eos)
        cut = len(ids) > config.max_seq_len
        ids, trained = ids[: config.max_seq_len], trained[: config.max_seq_len]
        labels = tuple(t if keep else IGNORE for t, keep in zip(ids, trained, strict=True))
        example = Example(tuple(ids), labels, row.line)
        if example.label_tokens == 0:
            what = "completion" if row.kind != "text" else "target"
            reason = f"no {what} tokens left to train on after truncation to max_seq_len={config.max_seq_len}"
            if not cut:
                reason = f"no {what} tokens to train on ({len(ids)} tokens in all)"
            report.add_bad(row.line, reason, config.bad_rows)
            continue
        report.kept += 1
        report.truncated += cut
        report.tokens += len(ids)
        report.label_tokens += example.label_tokens
        examples.append(example)
    return examples


def bos_to_add(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts one in front of plain text itself, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def _pieces(row: Row, tokenizer) -> list[tuple[str, bool]]:
    """The row's text in order, as (text, is_target) pieces, each tokenized on its own."""
    if row.kind == "prompt":
        return [(row["prompt"], False), (row["completion"], True)]
    if row.kind == "text":
        return [(row["text"], True)]
    return _chat_pieces(row, tokenizer)


def _chat_pieces(row: Row, tokenizer) -> list[tuple[str, bool]]:
    """Split a rendered chat into non-assistant and assistant spans.

    Each assistant turn's span is what rendering the conversation up to it adds
    beyond rendering the history with a generation prompt. Templates that rewrite
    earlier turns (so a shorter rendering is not a prefix) fall back to training on
    the last assistant turn alone.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{row.source}:{row.line} has 'messages', but the tokenizer has no chat template; "
            "set tokenizer.chat_template, or write the rows as prompt/completion"
        )
    messages = list(row["messages"])

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(i, True) if i else "", render(i + 1, False)
        if not (full.startswith(end) and end.startswith(start)):
            spans = None
            break
        spans.append((len(start), len(end)))
    if spans is None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        start = render(last, True)
        if not full.startswith(start):
            raise ValueError(
                f"{row.source}:{row.line}: the chat template does not render the conversation "
                "before the last assistant turn as a prefix of the whole; cannot tell the assistant "
                "tokens apart. Use prompt/completion rows or completion_only=False"
            )
        spans = [(len(start), len(full))]
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    pieces.append((full[cursor:], False))
    return [(text, target) for text, target in pieces if text]


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Greedily put whole examples, in order, into rows of at most `max_seq_len` tokens.

    Examples are concatenated as they are (each already ends with EOS); attention
    is not blocked between them. An example that does not fit starts a new row.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    line = 0
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_seq_len:
            packed.append(Example(tuple(ids), tuple(labels), line))
            ids, labels = [], []
        if not ids:
            line = example.line
        ids += example.input_ids
        labels += example.labels
    if ids:
        packed.append(Example(tuple(ids), tuple(labels), line))
    return packed


def examples_fingerprint(*parts: Sequence[Example]) -> str:
    """Short hash of the token ids and labels; a resumed run checks its data is unchanged."""
    h = hashlib.sha256()
    for examples in parts:
        h.update(b"|")
        for example in examples:
            h.update(json.dumps([example.input_ids, example.labels]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- batching


class EpochSampler:
    """Batches of example indices, reshuffled each epoch by (seed, epoch).

    Its position (epoch, index of the next example in that epoch's order) is all
    a checkpoint needs to continue with exactly the batches an uninterrupted run
    would see. The last batch of an epoch may be smaller.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        if size < 1:
            raise ValueError("EpochSampler needs at least one example")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.index = epoch, index
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.size, generator=generator).tolist())
        return self._order[1]

    def next_batch(self) -> list[int]:
        batch = self.order(self.epoch)[self.index : self.index + self.batch_size]
        self.index += len(batch)
        if self.index >= self.size:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.size / self.batch_size)

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.index / self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state["size"], state["seed"]) != (self.size, self.seed):
            raise ValueError(
                f"checkpoint sampler was over {state['size']} examples with seed {state['seed']}; "
                f"this run has {self.size} with seed {self.seed}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), IGNORE on prompt and padding

    @property
    def label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example: ids with `pad_id`, labels with IGNORE, mask 0."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else EOS, else 0 (padding is masked, so any id works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ---------------------------------------------------------------- the whole pipeline


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    val: list[Example]
    report: DataReport
    """The training source's report (its val rows included when split from it)."""
    val_report: DataReport | None
    """The separate `val_data` file's report, when there is one."""


def check_data(data, config) -> list[DataReport]:
    """Read and check the rows of `data` (and config.val_data) before any model is loaded.

    Needs no tokenizer, so a bad row (bad_rows="error") or a source with no usable row
    stops a run in seconds; prepare_data reads the rows again and reports them in full.

    Raises:
        DataError: bad_rows="error" and a bad row (file:line).
        ValueError: a source whose rows are all bad (its report names the file and lines).
    """
    sources = [data] if config.val_data is None else [data, config.val_data]
    reports = []
    for source in sources:
        rows, report = load_rows(source, bad_rows=config.bad_rows)
        if not rows:
            raise ValueError(f"no usable rows in {report.source}.\n{report}")
        reports.append(report)
    return reports


def prepare_data(data, tokenizer, config) -> PreparedData:
    """Load, split, tokenize and (optionally) pack the training and validation data.

    Validation examples are never packed, so the validation loss does not depend
    on which examples happened to share a row.
    """
    rows, report = load_rows(data, bad_rows=config.bad_rows)
    val_report = None
    if config.val_data is not None:
        train_rows = rows
        val_rows, val_report = load_rows(config.val_data, bad_rows=config.bad_rows)
    else:
        train_rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    train = tokenize_rows(train_rows, tokenizer, config, report=report)
    val = tokenize_rows(val_rows, tokenizer, config, report=val_report or report)
    if not train:
        raise ValueError(f"no usable training rows.\n{report}")
    if config.packing:
        train = pack_examples(train, config.max_seq_len)
    return PreparedData(train, val, report, val_report)
