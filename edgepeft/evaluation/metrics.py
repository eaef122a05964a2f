"""Text-generation metrics: exact match, token F1 (SQuAD) and ROUGE-L (rouge-score).

    prediction, reference
        │ normalize: lowercase, drop punctuation, drop a/an/the, collapse spaces
        ├──► exact_match   1.0 when the normalized strings are equal
        ├──► token_f1      F1 of the bag of normalized, space-split tokens
        │ rouge tokens: lowercase, every run of characters outside [a-z0-9] splits
        └──► rouge_l       F-measure of the token LCS (precision over the prediction,
                           recall over the reference)
    score(preds, refs) ──► {"exact_match", "token_f1", "rouge_l"}: means over examples

Two tokenisations on purpose, each the one its metric is known by: EM and F1 follow
the SQuAD evaluation script (so punctuation inside a word is deleted, "don't" ->
"dont", and any script's letters stay), ROUGE-L follows the `rouge_score` package's
default tokenizer without stemming (so "don't" -> "don", "t", and characters outside
ASCII a-z0-9, accented or CJK letters included, are separators and never score).
ROUGE-L equals `rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure`.

Only the standard library is used: the torch-free device runtime scores with it too.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

METRICS = ("exact_match", "token_f1", "rouge_l")
"""Keys of `score` and `score_example`, in table order."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NOT_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    """SQuAD answer normalization.

    Lowercase, delete ASCII punctuation (string.punctuation), delete the articles
    "a", "an", "the" as whole words, and collapse whitespace to single spaces
    (leading and trailing whitespace removed). The steps run in the SQuAD script's
    order, so "The U.S.A." becomes "usa".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when `pred` and `ref` are equal after `normalize`, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """F1 of the multiset of normalized tokens shared by `pred` and `ref` (SQuAD).

    Two texts that normalize to nothing agree (1.0); one empty and one not score 0.0.
    """
    pred_tokens, ref_tokens = normalize(pred).split(), normalize(ref).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokens: lowercase ASCII letter/digit runs, no stemming."""
    return _NOT_ROUGE_TOKEN.sub(" ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence; O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure: 2PR / (P + R) with P = LCS / |pred|, R = LCS / |ref| over rouge tokens.

    As rouge_score, a side with no tokens scores 0.0 (even when both are empty).
    """
    pred_tokens, ref_tokens = rouge_tokens(pred), rouge_tokens(ref)
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(ref_tokens, pred_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def score_example(pred: str, ref: str) -> dict[str, float]:
    """Every metric of one prediction against its reference."""
    return {
        "exact_match": exact_match(pred, ref),
        "token_f1": token_f1(pred, ref),
        "rouge_l": rouge_l(pred, ref),
    }


def score(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over aligned predictions and references.

    Raises:
        ValueError: the two lists differ in length, or are empty.
    """
    if len(preds) != len(refs):
        raise ValueError(
            f"score needs one reference per prediction; got {len(preds)} predictions and "
            f"{len(refs)} references"
        )
    if not preds:
        raise ValueError("score needs at least one prediction; got none")
    rows = [score_example(p, r) for p, r in zip(preds, refs, strict=True)]
    return {key: sum(row[key] for row in rows) / len(rows) for key in METRICS}


__all__ = [
    "METRICS",
    "exact_match",
    "normalize",
    "rouge_l",
    "rouge_tokens",
    "score",
    "score_example",
    "token_f1",
]
