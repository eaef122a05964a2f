"""NaN and inf refused wherever adapter values enter, naming the adapter, tensor and file.

    adapter folder ─load_adapter─► check_finite_torch ─┐
    export: separate-mode tensors, KV prefix files      ├─► NonFiniteError: adapter, tensor,
    device: Engine.load_adapter (.onnx_adapter, prefix) ┘   file, how many NaN / inf, what to do
      numpy arrays ──────────────► check_finite ────────┘
    device: every decode step's logits rows ─► check_finite_logits ─► NonFiniteError (adapter)

One NaN in a lora_B reaches every logit of every prompt; greedy decoding then picks token 0
(np.argmax of an all-NaN row) and the engine would answer '' without a word of why. Merging
already refuses non-finite merged weights (merge.py); these refuse the values themselves.

Numpy only at import: the torch-free device runtime uses it too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

WHAT_TO_DO = (
    "the adapter is corrupt (training diverged, or the file was damaged): check the training "
    "run's loss for NaN/inf, retrain (or resume from an earlier healthy checkpoint) and save or "
    "export the adapter again"
)


class NonFiniteError(ValueError):
    """An adapter tensor, or the logits a graph computes with it, holds NaN or inf."""


def _refuse(adapter: str, file, bad: list[tuple[str, int, int, int]]) -> NonFiniteError:
    """bad: (tensor, NaN count, inf count, size) per non-finite tensor, in file order."""
    key, nan, inf, size = bad[0]
    more = f" (and {len(bad) - 1} more tensors: {', '.join(b[0] for b in bad[1:4])})" if len(bad) > 1 else ""
    return NonFiniteError(
        f"adapter {adapter!r}: tensor {key!r} in {os.fspath(file)} holds {nan} NaN and {inf} inf "
        f"of {size} values{more}; {WHAT_TO_DO}"
    )


def check_finite(tensors: Mapping[str, np.ndarray], *, adapter: str, file) -> None:
    """Raise NonFiniteError unless every float array of `tensors` is finite.

    Args:
        tensors: Tensor name -> array (integer arrays are skipped: they cannot be NaN).
        adapter: The adapter's name, for the message.
        file: Where the values come from (a file, a folder, or a description).
    """
    bad = []
    for key, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fc" or np.isfinite(value).all():
            continue
        nan = int(np.isnan(value).sum())
        bad.append((key, nan, int((~np.isfinite(value)).sum()) - nan, int(value.size)))
    if bad:
        raise _refuse(adapter, file, bad)


def check_finite_torch(tensors: Mapping[str, object], *, adapter: str, file) -> None:
    """`check_finite` for torch tensors (any dtype and device; nothing is copied to numpy)."""
    bad = []
    for key, value in tensors.items():
        if not value.is_floating_point() or bool(value.isfinite().all()):
            continue
        bad.append((key, int(value.isnan().sum()), int(value.isinf().sum()), value.numel()))
    if bad:
        raise _refuse(adapter, file, bad)


def check_finite_logits(logits: np.ndarray, *, adapter: str | None, step: int) -> None:
    """Raise NonFiniteError if a row of `logits` (B, V) holds NaN or inf.

    Args:
        logits: One step's last-position logits, rows still generating.
        adapter: The request's adapter (None: the base alone).
        step: 0 for the prefill, k for the k-th decode step.
    """
    finite = np.isfinite(logits).all(axis=-1)  # (B,)
    if finite.all():
        return
    rows = np.flatnonzero(~finite).tolist()
    where = "the prefill" if step == 0 else f"decode step {step}"
    who = "the base graph (no adapter)" if adapter is None else f"adapter {adapter!r}"
    raise NonFiniteError(
        f"the graph's logits are NaN/inf at {where} (rows {rows} of {len(finite)}) with {who}: "
        "no text is returned rather than an empty answer. "
        + (
            f"{WHAT_TO_DO}; the other adapters and the base are unaffected"
            if adapter is not None
            else "the base graph's weights are corrupt: re-export it and run `edgepeft verify`"
        )
    )


__all__ = ["WHAT_TO_DO", "NonFiniteError", "check_finite", "check_finite_logits", "check_finite_torch"]
