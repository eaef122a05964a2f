"""The demo's words, its pretraining text and its two adapter tasks, all generated from seeds.

    WORDS (a few hundred common English words) + pseudowords (syllables, seeded)
        ├──► english_sentences   "the small dog sees a red ball ."     pretraining: text
        ├──► instruction_line    "upper: garden -> GARDEN"            pretraining: OPERATIONS
        └──► task_rows           {"prompt": "garden ->", "completion": " nedrag"}   the adapters

The base model (scripts/make_demo_base.py) is pre-trained on sentences and on the
OPERATIONS, each always written with its instruction word. The demo then trains two
adapters on prompts with *no* instruction word ("garden ->"):

    reverse   " nedrag"   a skill the base never saw                 -> a LoRA adapter
    upper     " GARDEN"   an operation the base knows only when      -> a prompt-tuning adapter
                          told "upper:"; the soft prompt replaces    (virtual tokens, no weights
                          the instruction word                        of the base change)

Test words are pseudowords drawn from a separate seed and never used in pretraining or in
any training split, so a test answer measures the rule, not memory. Pure stdlib: the
device side and the CLI import this without torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

ARROW = " ->"
"""Ends every prompt: the answer follows, after a space."""

_NOUNS = (
    "dog cat bird fish horse cow sheep mouse lion bear wolf fox frog duck goat "
    "house door window table chair bed lamp clock book paper pen cup plate bowl "
    "tree flower grass river lake sea hill road bridge garden field forest stone "
    "sun moon star cloud rain snow wind fire water light night day morning summer "
    "king queen child friend doctor farmer teacher sister brother mother father "
    "apple bread cheese milk sugar salt honey orange lemon cake soup rice "
    "boat train car ship wheel box bag key ring coat shoe hat letter song story"
).split()
_ADJECTIVES = (
    "small big red blue green old young happy quiet loud warm cold dark bright "
    "soft hard fast slow kind brave tall short clean sweet wild calm busy"
).split()
_VERBS = (
    "sees finds likes holds takes makes wants needs opens reads moves helps "
    "follows carries brings paints watches calls"
).split()
_PLACES = "near under behind above beside".split()
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_NOUNS + _ADJECTIVES + _VERBS))
"""Real words: the sentences use them, and so do the operations."""

_ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "n", "m", "s", "t", "l", "r", "k"]
MIN_LETTERS, MAX_LETTERS = 3, 6


def _upper(word: str) -> str:
    return word.upper()


OPERATIONS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "upper": _upper,
    "title": lambda w: w[:1].upper() + w[1:],
    "spell": lambda w: "-".join(w),
}
"""Instruction word -> what the base learns to answer; lines read "upper: garden -> GARDEN"."""

TASKS: dict[str, Callable[[str], str]] = {"reverse": lambda w: w[::-1], "upper": _upper}
"""The demo's adapter tasks: prompt "garden ->", completion " " + TASKS[name]("garden")."""


def pseudoword(rng: random.Random) -> str:
    """A pronounceable made-up word of MIN_LETTERS to MAX_LETTERS lowercase letters."""
    while True:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 2, 2)))
        )
        if MIN_LETTERS <= len(word) <= MAX_LETTERS:
            return word


def english_sentence(rng: random.Random) -> str:
    """A short English-like sentence from a small grammar."""
    def phrase() -> str:
        article = rng.choice(("the", "a", "my", "one"))
        return f"{article} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}" if rng.random() < 0.6 \
            else f"{article} {rng.choice(_NOUNS)}"

    sentence = f"{phrase()} {rng.choice(_VERBS)} {phrase()}"
    if rng.random() < 0.2:
        sentence += f" {rng.choice(_PLACES)} {phrase()}"
    return sentence + " ."


def instruction_line(operation: str, word: str) -> str:
    """"upper: garden -> GARDEN": how the base sees every operation in pretraining."""
    return f"{operation}: {word}{ARROW} {OPERATIONS[operation](word)}"


def _word(rng: random.Random, exclude: frozenset[str]) -> str:
    while True:
        word = rng.choice(WORDS) if rng.random() < 0.3 else pseudoword(rng)
        if word not in exclude and MIN_LETTERS <= len(word) <= MAX_LETTERS:
            return word


def test_words(n: int, seed: int = 1000) -> list[str]:
    """`n` distinct pseudowords that no training data or pretraining line uses."""
    rng, words = random.Random(seed), []
    while len(words) < n:
        word = pseudoword(rng)
        if word not in words and word not in WORDS:
            words.append(word)
    return words


HELD_OUT = frozenset(test_words(256))
"""Every word a test split may use; training and pretraining never draw one."""


def pretraining_lines(n: int, seed: int) -> list[str]:
    """`n` lines: a third sentences, two thirds instruction lines over the OPERATIONS."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append(english_sentence(rng))
        else:
            lines.append(instruction_line(rng.choice(list(OPERATIONS)), _word(rng, HELD_OUT)))
    return lines


def task_rows(task: str, words: Sequence[str]) -> list[dict[str, str]]:
    """{"prompt": "garden ->", "completion": " nedrag"} per word for demo task `task`."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; the demo tasks are {sorted(TASKS)}")
    answer = TASKS[task]
    return [{"prompt": w + ARROW, "completion": " " + answer(w)} for w in words]


def task_splits(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """(train rows, test rows): training words never held out, test words from HELD_OUT."""
    rng, train = random.Random(f"{task}-{seed}"), []
    seen: set[str] = set()
    while len(train) < n_train:
        word = _word(rng, HELD_OUT)
        if word not in seen:
            seen.add(word)
            train.append(word)
    if n_test > len(HELD_OUT):
        raise ValueError(f"at most {len(HELD_OUT)} test words; asked for {n_test}")
    return task_rows(task, train), task_rows(task, sorted(HELD_OUT)[:n_test])
