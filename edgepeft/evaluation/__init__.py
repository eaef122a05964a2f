"""Evaluation, the torch-free part: examples from test rows, metrics, and the report.

    rows ──examples.read_examples──► [EvalExample] (prompt or chat, and the reference)
    predictions ──metrics.score_example──► EM / token F1 / ROUGE-L per example
        ──report.score_target──► TargetResult ──► EvalReport (table, JSON)

Both evaluations build on these files: the PyTorch one (edgepeft.train.evaluate, which
generates with the trained model) and the device runtime's (edgepeft.runtime.evaluate,
which generates with onnxruntime), so their reports compare line by line.
"""

from __future__ import annotations

from edgepeft.evaluation.examples import EvalExample, read_examples
from edgepeft.evaluation.metrics import (
    METRICS,
    exact_match,
    normalize,
    rouge_l,
    rouge_tokens,
    score,
    score_example,
    token_f1,
)
from edgepeft.evaluation.report import BASE, EvalReport, TargetResult, choose_targets, score_target

__all__ = [
    "BASE",
    "METRICS",
    "EvalExample",
    "EvalReport",
    "TargetResult",
    "choose_targets",
    "exact_match",
    "normalize",
    "read_examples",
    "rouge_l",
    "rouge_tokens",
    "score",
    "score_example",
    "score_target",
    "token_f1",
]
