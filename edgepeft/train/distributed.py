"""Data-parallel training: every rank runs the same loop on its slice of each batch.

    torchrun --nproc_per_node N  ──env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*──►
        init_from_env(): gloo on CPU, NCCL on CUDA (device cuda:LOCAL_RANK)

    start: rank 0's adapter values broadcast to every rank
    one optimizer step, all ranks in lockstep (same seed, same sampler, same order):
        global micro-batch [e0 e1 e2 e3 e4]  (sampler order, identical on every rank)
            rank 0: shard ─► [e0 e1 e2]      rank 1: shard ─► [e3 e4]
        each rank: Σ token CE of its rows / label tokens of the GLOBAL batch ──► backward
        reduce_gradients: one SUM all-reduce of [grads..., loss] ──► every rank holds the
            gradient (and loss) of the whole batch, as one process would compute it
        clip + optimizer step on identical gradients ──► identical adapters on every rank
    validation: each rank scores its shard; (Σ loss, Σ tokens) summed over ranks
    files (checkpoints, adapters, metrics, reports, progress): rank 0 only
    resume: every rank reads the same checkpoint

`current()` describes the process group a caller (or torchrun via `init_from_env`) set
up; without one it is the single-process context, whose methods do nothing, so the
training loop runs the same code either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    """Where collective tensors live: cuda:LOCAL_RANK under NCCL, else the CPU."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of `items`; slices differ in size by at most one.

        A rank may get nothing (fewer items than ranks): it then adds zero gradients.
        """
        n, world = len(items), self.world_size
        start, stop = self.rank * n // world, (self.rank + 1) * n // world
        return list(items[start:stop])

    def reduce_gradients(self, params: Sequence[nn.Parameter], loss: float) -> float:
        """Sum every parameter's gradient and `loss` over the ranks, in place; returns the loss.

        Each rank's gradient must already be its rows' share of the global batch mean (its
        summed token loss divided by the whole batch's label tokens), so the sum is the
        gradient one process gets from the whole batch. A parameter without a gradient
        on some rank (its rows never reached it) counts as zeros.
        """
        if not self.enabled:
            return loss
        import torch.distributed as dist

        device = params[0].device
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
        flat = torch.cat([*parts, torch.tensor([loss], dtype=torch.float32, device=device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # one message per step, whatever the adapter
        offset = 0
        for p in params:
            n = p.numel()
            summed = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            offset += n
        return float(flat[-1])

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Copy rank 0's values into every rank's `params`, as DDP does at the start.

        Ranks that seeded alike already agree; this makes it so whatever each
        rank's random initialisation did.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def combine_mean(self, mean: float, count: int) -> tuple[float, int]:
        """(mean over all ranks' items, total count) from each rank's (mean, count)."""
        if not self.enabled:
            return mean, count
        import torch.distributed as dist

        pair = torch.tensor([mean * count, float(count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(pair, op=dist.ReduceOp.SUM)
        total, n = float(pair[0]), int(pair[1])
        return total / max(n, 1), n

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: ranks must stop at the same step."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


SINGLE = Context()
"""One process, no process group."""


def current() -> Context:
    """The context of the initialised default process group, else `SINGLE`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    cuda = dist.get_backend() == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init_from_env(backend: str | None = None) -> Context:
    """Join the process group torchrun describes in the environment, if it does.

    Needs WORLD_SIZE > 1, RANK, and MASTER_ADDR / MASTER_PORT (torchrun sets them all;
    LOCAL_RANK picks the GPU). Without WORLD_SIZE, or with a group already set up by the
    caller, nothing is initialised.

    Args:
        backend: "gloo" or "nccl"; default NCCL when CUDA is present, else gloo.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node N -m edgepeft.cli train ...`, which sets them"
        )
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return current()
