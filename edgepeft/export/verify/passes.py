"""Running the sides: prefill + decode steps, teacher-forced or free-running, per batch.

    ids, mask (left padded) ─► prefill (P = 0) ─► N-1 decode steps (T = 1)
        PyTorch      fed its own greedy tokens                       want, tokens
        onnxruntime  fed PyTorch's tokens (teacher forcing)          got, ort_tokens
        onnxruntime  fed its own greedy tokens (free running)        free_tokens
    each prompt alone (batch 1, unpadded) ─► its greedy continuation (`continuations`)

Torch-free itself: a side is anything sides.py describes (empty_past, then called).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.export.verify.inputs import unpadded_rows


def run_side(side, ids, mask, steps: int, forced: list[np.ndarray] | None):
    """Prefill, then `steps` decode steps: [(logits (B, T, V), mask (B, P+T))], greedy tokens.

    With `forced`, step k feeds forced[k] (the reference's tokens) instead of its own.
    """
    outputs, tokens = [], []
    logits, past = side(ids, mask, side.empty_past(ids.shape[0]))
    outputs.append((logits, mask))
    for step in range(steps + 1):
        own = logits[:, -1].argmax(-1)  # (B,)
        tokens.append(own)
        if step == steps:
            break
        feed = forced[step] if forced is not None else own
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        logits, past = side(feed[:, None].astype(np.int64), mask, past)
        outputs.append((logits, mask))
    return outputs, tokens


@dataclass(frozen=True)
class Pass:
    """One batch through both sides: teacher-forced logits, then ORT free-running."""

    ids: np.ndarray
    mask: np.ndarray
    want: list
    """PyTorch's [(logits (B, T, V), mask)] per step, fed its own greedy tokens."""
    tokens: list[np.ndarray]
    """PyTorch's greedy tokens, (B,) per step."""
    got: list
    """ORT's outputs fed PyTorch's tokens (teacher forcing)."""
    ort_tokens: list[np.ndarray]
    free_tokens: list[np.ndarray]
    """ORT's own greedy continuation."""


def run_pass(reference, ort_side, ids, mask, steps: int) -> Pass:
    """The reference, then ORT teacher-forced by its tokens, then ORT on its own."""
    want, tokens = run_side(reference, ids, mask, steps, None)
    got, ort_tokens = run_side(ort_side, ids, mask, steps, tokens)
    _, free_tokens = run_side(ort_side, ids, mask, steps, None)
    return Pass(ids, mask, want, tokens, got, ort_tokens, free_tokens)


def continuations(side, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[tuple[int, ...]]:
    """Greedy continuation (steps + 1 tokens) of each prompt run alone at batch 1, unpadded."""
    out = []
    for row, ones in unpadded_rows(ids, mask):
        _, tokens = run_side(side, row, ones, steps, None)
        out.append(tuple(int(t[0]) for t in tokens))
    return out


def token_rows(tokens: list[np.ndarray]) -> list[tuple[int, ...]]:
    """Per-step (B,) tokens as one tuple of ids per prompt."""
    return [tuple(int(t) for t in row) for row in np.stack(tokens, axis=1)]  # (B, N)
