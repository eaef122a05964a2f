"""Metrics against hand-computed cases (EM, token F1) and the reference ROUGE-L (rouge-score).

    generated sentence pairs (seeded; case, punctuation, repeats, empties)
        edgepeft.evaluation.metrics.rouge_l(pred, ref)
        rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
            equal to 1e-9 (both tokenize to lowercase ASCII alphanumeric runs)
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from edgepeft.evaluation import metrics
from edgepeft.evaluation.metrics import (
    exact_match,
    normalize,
    rouge_l,
    score,
    score_example,
    token_f1,
)

ROUGE_TOL = 1e-9


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat sat on a mat.", "cat sat on mat"),
        ("  An   apple,\tthe\npear ", "apple pear"),
        ("The U.S.A.", "usa"),
        ("don't", "dont"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("Ünïcode Straße!", "ünïcode straße"),
        ("", ""),
        ("a an the", ""),
    ],
)
def test_normalize_is_squad_normalization(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "pred, ref, em",
    [
        ("Paris", "paris", 1.0),
        ("the Eiffel Tower!", "Eiffel tower", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(pred, ref, em):
    assert exact_match(pred, ref) == em


@pytest.mark.parametrize(
    "pred, ref, f1",
    [
        # 1 shared of 2 predicted, 1 of 1 reference: P=1/2, R=1 -> 2/3
        ("Paris France", "Paris", 2 / 3),
        # pred "cat cat dog" ref "cat dog dog": shared cat x1, dog x1 = 2; P=R=2/3
        ("cat cat dog", "cat dog dog", 2 / 3),
        # articles and punctuation vanish first: "quick fox" vs "quick brown fox": P=1, R=2/3 -> 0.8
        ("The quick, fox.", "a quick brown fox", 0.8),
        ("red", "blue", 0.0),
        ("the", "a", 1.0),  # both normalize to nothing: agree
        ("the", "blue", 0.0),
    ],
)
def test_token_f1_hand_computed(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1, abs=1e-12)


def test_rouge_l_hand_computed():
    # LCS of "a b c d e" and "a x c e" is "a c e" = 3; P = 3/4, R = 3/5 -> 2/3
    assert rouge_l("a x c e", "a b c d e") == pytest.approx(2 / 3, abs=1e-12)
    assert rouge_l("", "") == 0.0  # as rouge_score: an empty side scores 0


_WORDS = ["the", "cat", "Dog", "sat", "on", "mat", "a", "red", "Red", "x1", "42", "don't", "u.s.a", "café"]
_GLUE = [" ", " ", " ", ", ", ". ", "  ", "!", "-", "\n"]


def _sentence(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 3, 5, 8, 13])
    return "".join(rng.choice(_WORDS) + rng.choice(_GLUE) for _ in range(n)).strip()


def _pairs(count: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    pairs = []
    for _ in range(count):
        ref = _sentence(rng)
        if rng.random() < 0.4:  # an edited copy of the reference: long common subsequences
            words = ref.split()
            for _ in range(rng.randint(0, 3)):
                op = rng.choice(["drop", "add", "swap"])
                if op == "drop" and words:
                    words.pop(rng.randrange(len(words)))
                elif op == "add":
                    words.insert(rng.randint(0, len(words)), rng.choice(_WORDS))
                elif len(words) > 1:
                    i, j = rng.sample(range(len(words)), 2)
                    words[i], words[j] = words[j], words[i]
            pred = " ".join(words)
        else:
            pred = _sentence(rng)
        pairs.append((pred, ref))
    return pairs


def test_rouge_l_equals_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # default: no stemming
    pairs = _pairs(48)
    diffs = [
        abs(rouge_l(pred, ref) - scorer.score(ref, pred)["rougeL"].fmeasure) for pred, ref in pairs
    ]
    assert max(diffs) <= ROUGE_TOL
    # The cases must exercise the metric, not only its zeros and ones.
    values = [rouge_l(p, r) for p, r in pairs]
    assert len({round(v, 6) for v in values}) >= 10
    assert any(0.0 < v < 1.0 for v in values)


def test_score_is_the_mean_of_score_example():
    pairs = _pairs(20)
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    means = score(preds, refs)
    assert list(means) == list(metrics.METRICS)
    for key in metrics.METRICS:
        expected = sum(score_example(p, r)[key] for p, r in pairs) / len(pairs)
        assert means[key] == pytest.approx(expected, abs=1e-12)
    assert score(["Paris", "Rome"], ["paris", "Madrid"]) == {
        "exact_match": 0.5,
        "token_f1": 0.5,
        "rouge_l": 0.5,
    }


def test_score_rejects_misaligned_or_empty_lists():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        score([], [])


def test_metrics_imports_only_the_standard_library_and_numpy():
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    import sys

    allowed = set(sys.stdlib_module_names) | {"numpy"}
    assert imported - allowed == set(), imported - allowed
