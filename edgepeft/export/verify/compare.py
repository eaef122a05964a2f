"""The comparison metrics of a check, over the positions that hold a real token.

    passes (ORT `got` vs PyTorch `want`, per step) ─► max |Δlogit| (prefill, decode)
                                                   ─► logit scale (max |reference logit|)
                                                   ─► mean KL(PyTorch || ORT), top-1 agreement
                                                   ─► where the first NaN/inf logit is
    one side on one unpadded row ─► perplexity

Torch-free (numpy, float64 for the softmax).
"""

from __future__ import annotations

import math

import numpy as np

from edgepeft.export.verify.passes import Pass


def real_positions(got, want):
    """(ORT, PyTorch) logits (positions, V) of every step, padding excluded."""
    for (a, mask), (b, _) in zip(got, want, strict=True):
        real = mask[:, -a.shape[1] :].astype(bool)  # (B, T)
        yield a[real], b[real]


def max_diff(runs: list[Pass], against=None) -> tuple[float, float]:
    """(prefill, decode) max |logit diff| over positions that hold a real token, every pass.

    `against`: per pass, other reference outputs to compare ORT's with (default: pass.want).
    """
    prefill, decode = [0.0], [0.0]
    for i, run in enumerate(runs):
        want = run.want if against is None else against[i]
        diffs = [float(np.abs(a - b).max()) for a, b in real_positions(run.got, want)]
        prefill.append(diffs[0])
        decode.extend(diffs[1:])
    return float(np.max(prefill)), float(np.max(decode))  # np.max keeps a NaN; max() may not


def logit_scale(runs: list[Pass]) -> float:
    """max |logit| of the reference over the compared positions (finite values only)."""
    scale = 0.0
    for run in runs:
        for _, b in real_positions(run.got, run.want):
            finite = np.abs(b[np.isfinite(b)])
            scale = max(scale, float(finite.max()) if finite.size else 0.0)
    return scale


def first_non_finite(runs: list[Pass], batched: bool) -> str:
    """Where the first NaN/inf logit of a real position is, on either side ("" if none)."""
    sides = (
        ("got", "onnxruntime's logits"),
        ("want", "PyTorch's logits (the reference itself: its base or adapter holds NaN/inf)"),
    )
    for attr, side in sides:
        for i, run in enumerate(runs):
            for step, (logits, mask) in enumerate(getattr(run, attr)):
                real = mask[:, -logits.shape[1] :].astype(bool)  # (B, T)
                bad = ~np.isfinite(logits).all(-1) & real  # (B, T)
                if bad.any():
                    row = int(np.flatnonzero(bad.any(-1))[0])
                    where = "the prefill" if step == 0 else f"decode step {step}"
                    return f"{side} at {where}, prompt {row if batched else i}"
    return ""


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (KL of near-equal logits needs it)."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_and_top1(runs: list[Pass]) -> tuple[float, int, int]:
    """(mean KL(PyTorch || ORT) over positions, positions with equal argmax, positions)."""
    kls, agree, total = [], 0, 0
    pairs = (pair for run in runs for pair in real_positions(run.got, run.want))
    for a, b in pairs:
        log_p, log_q = log_softmax(b), log_softmax(a)  # (positions, V)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return float(np.concatenate(kls).mean()), agree, total


def perplexity(side, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) of one unpadded row, from a single prefill."""
    logits, _ = side(ids, np.ones_like(ids), side.empty_past(1))
    log_probs = log_softmax(logits[0, :-1])  # (L-1, V)
    nll = -log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(math.exp(nll.mean()))
