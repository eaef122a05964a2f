"""The training loss: next-token cross-entropy over label tokens, under the run's precision.

    batch ──forward (autocast)──► logits (B, T, V) ──CE vs labels shifted left──► Σ token loss
    micro-batches ──Σ token loss / label tokens of ALL of them──► backward   (accumulate_gradients)
    held-out examples ──eval mode, no grad──► mean loss per label token     (evaluate_loss)

The memory planner (train/memory.py) models exactly this loss: it keeps the fp32
log-softmax and lets go of the model output when it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.train.data import IGNORE, Batch, Example, collate


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp32" on CPU, "bf16" (or "fp16" without bf16 support) on CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (the adapter is on {device}); use 'bf16' or 'fp32'"
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def token_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's label tokens (a 0-d fp32 tensor)."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = output.logits  # (B, T, V)
    # Position t predicts token t+1. Shifting the labels (the last position gets IGNORE)
    # rather than slicing the logits keeps the reshape a view: no (B, T-1, V) copy
    # forward, and no zero-filled (B, T, V) gradient to scatter it into backward.
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    precision: str = "fp32",
    scaler=None,
    label_tokens: int | None = None,
) -> float:
    """Backward over all micro-batches as if they were one batch; returns its mean token loss.

    Each micro-batch's summed loss is divided by the label tokens of *all* of them,
    so 2 micro-batches of 2 rows give the gradient of one batch of 4 rows.
    `label_tokens` overrides that count: a data-parallel rank divides by the label
    tokens of the whole global batch, so the ranks' gradients (and losses) add up.
    """
    device = input_device(model)
    if label_tokens is None:
        label_tokens = sum(b.label_tokens for b in micro_batches)
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast(device, precision):
            part = token_loss_sum(model, batch)
        loss = part / label_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += part.detach()
    return float(loss_sum / label_tokens)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> tuple[float, int]:
    """(mean loss per label token, label tokens) of `examples`, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = input_device(model)
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id).to(device)
            with autocast(device, precision):
                total += token_loss_sum(model, batch).double().cpu()
            tokens += batch.label_tokens
    finally:
        model.train(was_training)
    return float(total / max(tokens, 1)), tokens
