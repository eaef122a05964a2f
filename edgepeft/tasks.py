"""Two tiny string tasks, generated from a seed: demo data that needs no download.

    make_task("reverse", n, seed)   "kbnf="  ->  "fnbk"     the letters backwards
    make_task("shift", n, seed)     "kbnf="  ->  "ncpg"     each letter -> the next one in
                                                            ALPHABET (the last wraps round)

Words are `WORD_LENGTH` letters drawn from `ALPHABET`, all distinct within one call,
so `make_splits` cuts one call into disjoint train, validation and test sets: a test word was
never seen in training, and scoring it measures the rule, not memory.

ALPHABET holds letters that the tiny tokenizer (`edgepeft.tiny`, a byte-level BPE
trained on one sentence) never merges with each other or with "=", so every letter
is one token: a prompt is 5 tokens, a completion 4 plus EOS. A random tiny model
cannot do either task; a LoRA adapter over it learns both in a few hundred CPU steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

ALPHABET = "bcfgjknp"
"""Letters each kept as one token by the tiny tokenizer (no pair of them, nor one with
"=", is a BPE merge)."""
WORD_LENGTH = 4
SEPARATOR = "="
"""Ends every prompt: where the answer starts."""


def _reverse(word: str) -> str:
    return word[::-1]


def _shift(word: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in word)


TASKS: dict[str, Callable[[str], str]] = {"reverse": _reverse, "shift": _shift}
"""Task name -> the answer for a word."""


def _words(n: int, seed: int) -> list[str]:
    """`n` distinct random words, in a seed-determined order."""
    space = len(ALPHABET) ** WORD_LENGTH
    if not 0 < n <= space:
        raise ValueError(
            f"asked for {n} distinct words; there are {space} words of {WORD_LENGTH} letters "
            f"from {ALPHABET!r}: ask for 1 to {space}"
        )
    rng = random.Random(seed)
    picks = rng.sample(range(space), n)  # distinct indices, each spelled in base len(ALPHABET)
    words = []
    for index in picks:
        letters = []
        for _ in range(WORD_LENGTH):
            index, digit = divmod(index, len(ALPHABET))
            letters.append(ALPHABET[digit])
        words.append("".join(letters))
    return words


def make_task(name: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct {"prompt", "completion"} rows of task `name`, the same for the same seed.

    Args:
        name: "reverse" or "shift".
        n: Rows (at most len(ALPHABET) ** WORD_LENGTH = 4096).
        seed: Chooses the words and their order.

    Raises:
        ValueError: unknown task, or n out of range.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in tasks are {sorted(TASKS)}")
    answer = TASKS[name]
    return [{"prompt": word + SEPARATOR, "completion": answer(word)} for word in _words(n, seed)]


def make_splits(name: str, sizes: Sequence[int], seed: int) -> list[list[dict[str, str]]]:
    """Rows of task `name` cut into parts of `sizes` (e.g. train, val, test); no word in two."""
    rows = make_task(name, sum(sizes), seed)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [rows[a:b] for a, b in zip(starts, starts[1:], strict=False)]
