"""The optimizer side of a run: how many steps, the learning-rate schedule, one update.

    config ──total_steps──► steps of the run
    adapter parameters ──make_optimizer──► AdamW (torch) | AdamW8bit | PagedAdamW8bit
    LambdaLR(lr_factor): warmup (s + 1) / (warmup + 1) ──► cosine | linear decay | constant
    optimizer_step: unscale (fp16) ──► clip ──► step ──► schedule.step ──► zero_grad
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from edgepeft.config import TrainConfig

log = logging.getLogger("edgepeft")


def total_steps(config: TrainConfig, train_examples: int) -> int:
    """Optimizer steps of the run: `max_steps`, else `epochs` passes over the examples."""
    if config.max_steps is not None:
        return config.max_steps
    micro_batches = math.ceil(train_examples / config.batch_size)
    return max(1, math.ceil(config.epochs * micro_batches / config.grad_accum))


def lr_factor(total: int, warmup: int, kind: str) -> Callable[[int], float]:
    """LambdaLR factor for 0-based step s: linear warmup, then cosine/linear decay or constant.

    Warmup gives (s + 1) / (warmup + 1), so no step runs at lr 0; the decay reaches
    0 one step after the last, so the last step still learns.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        done = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def make_optimizer(
    params: Sequence[nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """torch AdamW, or bitsandbytes' AdamW8bit / PagedAdamW8bit (paged only on CUDA)."""
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    if config.optimizer == "paged_adamw8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    if config.optimizer == "paged_adamw8bit":
        log.warning("paged_adamw8bit pages to CUDA unified memory; on %s using adamw8bit", device)
    return bnb.optim.AdamW8bit(params, **kwargs)


def optimizer_step(
    params, optimizer, scheduler, scaler, max_grad_norm
) -> tuple[float, float | None]:
    """Clip, step, advance the schedule, clear the gradients; returns (lr used, grad norm)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm
