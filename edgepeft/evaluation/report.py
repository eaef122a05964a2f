"""The evaluation report: per target (the base, each adapter) metric means and predictions.

    predictions of one target + the examples' references
        ──score_target──► TargetResult(name, means of EM / token F1 / ROUGE-L, scores)
    EvalReport(examples, targets) ──str()──► the table; ──save()──► JSON (atomic)
    print_report(report, out, extra): the table on stdout, and the JSON when `out` is given

Also what both evaluations do alike before generating: check_sizes, choose_targets, and
length_batches (example indices grouped by prompt length).

Standard library only: PyTorch evaluation (edgepeft.train.evaluate) and the device
runtime's (edgepeft.runtime.evaluate) build the same report, so the two compare line by line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepeft.atomic import write_json
from edgepeft.evaluation.examples import EvalExample
from edgepeft.evaluation.metrics import METRICS, score_example

BASE = "base"
"""Name of the row that runs the base model alone."""

_COLUMNS = {"exact_match": "EM", "token_f1": "F1", "rouge_l": "ROUGE-L"}


@dataclass(frozen=True)
class TargetResult:
    """Scores of one target (the base or one adapter) on every example."""

    name: str
    metrics: dict[str, float]
    """Mean of each metric in edgepeft.evaluation.metrics.METRICS."""
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


def check_sizes(max_new_tokens: int, batch_size: int) -> None:
    """Both evaluations' check of their generation sizes, before any data or model work."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be at least 1; got {max_new_tokens} and {batch_size}"
        )


def length_batches(lengths: Sequence[int], batch_size: int, equal_length: bool = False) -> list[list[int]]:
    """Example indices grouped by similar prompt length, so batches carry little padding.

    `equal_length`: a batch holds prompts of one token length only (no padding at all).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if not equal_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(lengths[i], []).append(i)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def print_report(report: EvalReport, out: str | os.PathLike | None, extra: dict) -> None:
    """What `edgepeft eval` prints: the table; with `out`, the JSON (plus `extra`) written too."""
    print(report)
    if out:
        report.save(out, extra=extra)
        print(f"wrote {out}")


def choose_targets(
    available: Sequence[str],
    adapters: Sequence[str] | None,
    include_base: bool,
    *,
    holder: str,
    listed: str,
    remedy: str,
) -> list[str]:
    """The rows to evaluate: BASE (when `include_base`), then `adapters` (default: all available).

    `holder` names where adapters live ("this model", "the engine for out/"), `listed` how the
    available ones are introduced, `remedy` how to add a missing one; they word the errors.
    """
    names = list(available) if adapters is None else list(adapters)
    for name in names:
        if name not in available:
            raise KeyError(
                f"no adapter named {name!r} on {holder} ({listed}: {', '.join(available) or 'none'}); "
                f"{remedy}"
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
        raise ValueError(f"nothing to evaluate: {holder} has no adapters and include_base=False")
    return targets


def score_target(name: str, predictions: Sequence[str], examples: Sequence[EvalExample]) -> TargetResult:
    """Every metric of each prediction against its example's reference, and their means."""
    scores = tuple(score_example(p, ex.reference) for p, ex in zip(predictions, examples, strict=True))
    means = {k: sum(s[k] for s in scores) / len(scores) for k in METRICS}
    return TargetResult(name, means, tuple(predictions), scores)


__all__ = [
    "BASE",
    "EvalReport",
    "TargetResult",
    "check_sizes",
    "choose_targets",
    "length_batches",
    "print_report",
    "score_target",
]
