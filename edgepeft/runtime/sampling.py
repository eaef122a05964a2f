"""Next-token choice from logits, in numpy: greedy, or seeded sampling.

    logits (B, V) ─ banned tokens (eos before min_new_tokens) ─ repetition penalty (tokens
                  seen in the row) ─ / temperature
                  ─ top-k ─ top-p (nucleus) ─ softmax ─ draw with the request's Generator

temperature = 0 is greedy: argmax of the (penalised) logits, the first index on ties, as
PyTorch's argmax. The penalty follows HF transformers: a seen token's logit is divided by
the penalty when positive, multiplied when negative, over prompt and generated tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How one request picks its tokens."""

    temperature: float = 0.0
    """0: greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: all."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches top_p; 1.0: all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the row (prompt included); 1.0: off."""
    seed: int | None = None
    """Seeds the request's numpy Generator; None: fresh entropy."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_config(temperature, top_k, top_p, repetition_penalty, seed) -> SamplingConfig:
    """SamplingConfig from request arguments as callers give them (ints, floats, JSON)."""
    return SamplingConfig(
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        repetition_penalty=float(repetition_penalty),
        seed=seed,
    )


class Sampler:
    """Picks each step's tokens for one request (its own Generator, so threads never share one)."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(
        self,
        logits: np.ndarray,
        seen: list[list[int]] | None = None,
        banned: Collection[int] = (),
    ) -> np.ndarray:
        """Token per row (B,) int64 from logits (B, V).

        Args:
            logits: (B, V), not changed.
            seen: Each row's tokens so far (for the repetition penalty).
            banned: Token ids no row may get this step (eos before min_new_tokens).
        """
        c = self.config
        if banned:
            logits = _banned(logits, banned)
        if c.repetition_penalty != 1.0 and seen is not None:
            logits = _penalised(logits, seen, c.repetition_penalty)
        if c.greedy:
            return logits.argmax(axis=-1)
        return np.array([self._draw(row) for row in logits], dtype=np.int64)

    def _draw(self, row: np.ndarray) -> int:
        c = self.config
        scores = row.astype(np.float64) / c.temperature  # (V,)
        if c.top_k and c.top_k < len(scores):
            kth = np.partition(scores, -c.top_k)[-c.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        order = np.argsort(-scores, kind="stable")  # most likely first
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if c.top_p < 1.0:
            # keep tokens until the mass before them reaches top_p (always the first one)
            before = np.cumsum(probs) - probs
            probs = np.where(before < c.top_p, probs, 0.0)
            probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])


def _banned(logits: np.ndarray, banned: Collection[int]) -> np.ndarray:
    out = logits.copy()  # the caller's array may be the graph's bound output buffer
    idx = np.asarray([t for t in banned if 0 <= t < logits.shape[-1]], dtype=np.int64)
    out[:, idx] = -np.inf
    return out


def _penalised(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    out = logits.copy()
    for b, tokens in enumerate(seen):
        if not tokens:
            continue
        idx = np.unique(np.asarray(tokens, dtype=np.int64))
        values = out[b, idx]
        out[b, idx] = np.where(values > 0, values / penalty, values * penalty)
    return out


__all__ = ["Sampler", "SamplingConfig", "sampling_config"]
