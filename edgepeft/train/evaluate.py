"""Score generations of the base and of each adapter on a held-out set.

    rows (JSONL path or list of dicts) ──edgepeft.train.data.load_rows──► checked rows
        {"prompt", "completion"}       prompt as written, reference = completion
        {"messages": [..., assistant]} prompt = chat template of the messages before the
                                       final assistant one (+ generation prompt), reference =
                                       that assistant message
        ▼ tokenize once as training does ([BOS] + prompt), sort by length, batches
    for target in ("base", *adapters):     disable_adapters / set_adapter(name)
        model.generate: greedy, left padding (pad token, else EOS), stop at EOS
        ▼ new tokens only, cut at the first EOS, decoded, stripped
    edgepeft.metrics.score_example(prediction, reference) per example
        ▼
    EvalReport: per target the means of EM, token F1, ROUGE-L and n; every prediction

The model leaves as it came: active adapter, requires_grad flags and train/eval mode
are put back even when generation fails. Prompt and prefix tuning apply through
forward hooks, so they generate like any other adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgepeft.adapters.inject import active_adapter, disable_adapters, list_adapters, set_adapter
from edgepeft.atomic import write_json
from edgepeft.metrics import METRICS, score_example
from edgepeft.train.data import bos_to_add, load_rows

BASE = "base"
"""Name of the row that runs the base model alone."""

_COLUMNS = {"exact_match": "EM", "token_f1": "F1", "rouge_l": "ROUGE-L"}


# ---------------------------------------------------------------- data


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


def _prompt_text(tokenizer, example: EvalExample) -> str:
    if example.messages is None:
        return example.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{example.source}: a 'messages' row needs the tokenizer's chat template, but this tokenizer "
            "has none; write the rows as prompt/completion, or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(
        list(example.messages), tokenize=False, add_generation_prompt=True
    )


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class TargetResult:
    """Scores of one target (the base or one adapter) on every example."""

    name: str
    metrics: dict[str, float]
    """Mean of each metric in edgepeft.metrics.METRICS."""
    predictions: tuple[str, ...]
    scores: tuple[dict[str, float], ...]
    """Per example, in data order: every metric of its prediction."""

    @property
    def n(self) -> int:
        return len(self.predictions)


@dataclass(frozen=True)
class EvalReport:
    """What `evaluate` measured: per target the metric means, n and every prediction."""

    examples: tuple[EvalExample, ...]
    targets: tuple[TargetResult, ...]
    data: str
    max_new_tokens: int

    def __getitem__(self, name: str) -> TargetResult:
        for target in self.targets:
            if target.name == name:
                return target
        have = ", ".join(t.name for t in self.targets)
        raise KeyError(f"no target {name!r} in this report (targets: {have})")

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "n": len(self.examples),
            "targets": {t.name: {**t.metrics, "n": t.n} for t in self.targets},
            "examples": [
                {
                    "source": ex.source,
                    **({"prompt": ex.prompt} if ex.messages is None else {"messages": list(ex.messages)}),
                    "reference": ex.reference,
                    "predictions": {
                        t.name: {"prediction": t.predictions[i], **t.scores[i]} for t in self.targets
                    },
                }
                for i, ex in enumerate(self.examples)
            ],
        }

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write `to_dict()` (plus `extra` fields) as JSON, atomically.

        The JSON goes to a temporary sibling file first, then is renamed onto `path`,
        so a reader never sees half a report.
        """
        return write_json(path, {**self.to_dict(), **(extra or {})}, ensure_ascii=False)

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.targets] + [len("target")])
        header = f"{'target':<{width}}" + "".join(f"  {_COLUMNS[k]:>7}" for k in METRICS) + f"  {'n':>5}"
        lines = [
            f"{len(self.examples)} examples from {self.data} "
            f"(greedy, at most {self.max_new_tokens} new tokens)",
            header,
        ]
        for t in self.targets:
            cells = "".join(f"  {t.metrics[k]:>7.3f}" for k in METRICS)
            lines.append(f"{t.name:<{width}}{cells}  {t.n:>5}")
        return "\n".join(lines)


# ---------------------------------------------------------------- generation


def _token_ids(tokenizer, examples: Sequence[EvalExample]) -> list[list[int]]:
    """Prompt ids as training builds them: [BOS] + the text's tokens, special tokens not added.

    BOS leads only when the tokenizer puts one before plain text itself (Llama does,
    GPT-2 and Qwen do not), and never twice: a chat template may write its own.
    """
    bos = bos_to_add(tokenizer)
    ids = []
    for ex in examples:
        text = _prompt_text(tokenizer, ex)
        row = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if row[: len(bos)] != bos:
            row = [*bos, *row]
        if not row:
            raise ValueError(
                f"{ex.source}: the prompt tokenizes to no tokens; the model needs something to continue"
            )
        ids.append(row)
    return ids


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every EOS id the tokenizer or the model's generation config names (chat models add some)."""
    found: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
    return found


def _batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Example indices grouped by similar length, so batches carry little padding."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class _Greedy:
    """Greedy decoding of token-id prompts with one model and tokenizer."""

    model: nn.Module
    tokenizer: object
    pad_id: int
    stop_ids: list[int]
    max_new_tokens: int

    def __call__(self, ids: list[list[int]], batches: list[list[int]], bar) -> list[str]:
        """Continuation of every prompt, in data order."""
        device = self.model.device
        out: list[str] = [""] * len(ids)
        for batch in batches:
            length = max(len(ids[i]) for i in batch)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor(
                [[self.pad_id] * (length - len(ids[i])) + ids[i] for i in batch], device=device
            )  # (B, T)
            attention_mask = torch.tensor(
                [[0] * (length - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device
            )  # (B, T)
            generated = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids or None,
            )  # (B, T + new)
            for row, i in zip(generated[:, length:].tolist(), batch, strict=True):
                stop = next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))
                out[i] = self.tokenizer.decode(row[:stop], skip_special_tokens=True).strip()
            bar.update(len(batch))
        return out


def evaluate(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | Sequence[dict],
    adapters: Iterable[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    include_base: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Generate greedily for every prompt with each adapter (and the base) and score it.

    Args:
        model: A model from `load_base`, with adapters added or loaded on it (or none).
        tokenizer: Its tokenizer (from `load_base`).
        data: A JSONL file of {"prompt", "completion"} or {"messages"} rows, or a list
            of such dicts.
        adapters: Names of adapters on `model` to evaluate, in table order; default:
            every adapter on the model.
        max_new_tokens: Generation stops after this many tokens, or at EOS.
        batch_size: Prompts generated together (left-padded).
        include_base: Add a "base" row: the model with every adapter disabled.
        progress: Show a progress bar per target.

    Returns:
        An EvalReport; `print(report)` shows the table, `report.save(path)` writes JSON.

    Raises:
        KeyError: a named adapter is not on the model.
        ValueError: malformed data (the file and line are named), nothing to evaluate,
            or a tokenizer with neither a pad nor an EOS token.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be at least 1; got {max_new_tokens} and {batch_size}"
        )
    on_model = list(list_adapters(model))
    names = on_model if adapters is None else list(adapters)
    for name in names:
        if name not in on_model:
            raise KeyError(
                f"no adapter named {name!r} on this model (adapters: {', '.join(on_model) or 'none'}); "
                "load it first with edgepeft.load_adapter"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"adapters lists a name twice: {names}")
    if include_base and BASE in names:
        raise ValueError(
            f"an adapter is named {BASE!r}, the name of the base row; rename the adapter or "
            "pass include_base=False"
        )
    targets = ([BASE] if include_base else []) + names
    if not targets:
        raise ValueError("nothing to evaluate: the model has no adapters and include_base=False")

    examples, description = read_examples(data)
    ids = _token_ids(tokenizer, examples)
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), None)
    if pad_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token"
        )
    batches = _batches(ids, batch_size)
    generate = _Greedy(model, tokenizer, pad_id, stop_ids, max_new_tokens)

    previous = active_adapter(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout: greedy decoding must be repeatable
    results = []
    try:
        for target in targets:
            with tqdm(total=len(ids), desc=f"eval {target}", unit="ex", disable=not progress) as bar:
                if target == BASE:
                    with disable_adapters(model):
                        preds = generate(ids, batches, bar)
                else:
                    set_adapter(model, target)
                    preds = generate(ids, batches, bar)
            scores = tuple(score_example(p, ex.reference) for p, ex in zip(preds, examples, strict=True))
            means = {k: sum(s[k] for s in scores) / len(scores) for k in METRICS}
            results.append(TargetResult(target, means, tuple(preds), scores))
    finally:
        if on_model:
            set_adapter(model, previous)
        for p, flag in trainable:
            p.requires_grad_(flag)
        model.train(was_training)
    return EvalReport(tuple(examples), tuple(results), description, max_new_tokens)
