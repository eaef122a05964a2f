"""`edgepeft plan --train`: the training planner (edgepeft.train.memory) on a device profile.

    model ──load_config (transformers)──► HF config ─┐
    device ──load_profile──► torch_device, budget ───┴─► estimate_memory, largest_fit ──► dict

The one part of the planner that needs the [train] extra (torch, transformers): it imports
them when it runs, so the rest of `edgepeft plan` works on the bare install.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from edgepeft.config import LoraConfig
from edgepeft.devices import DeviceProfile, load_profile
from edgepeft.plan.shape import load_config


def plan_training(
    model,
    device: str | os.PathLike | DeviceProfile,
    *,
    seq_len: int,
    batch_size: int = 1,
    rank: int = 16,
    quant: str = "nf4",
    optimizer: str = "adamw",
    checkpointing: bool = False,
) -> dict:
    """The training planner (edgepeft.train.memory) on the device's torch_device and budget."""
    # lazy: train.memory imports torch; `edgepeft plan` without --train stays free of it
    from edgepeft.train.memory import estimate_memory, largest_fit

    profile = load_profile(device)
    config = model if hasattr(model, "to_dict") else load_config(model)
    args = dict(
        quant=quant,
        adapter_config=LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"),
        optimizer=optimizer,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        precision="auto",
        device=profile.torch_device,
    )
    estimate = estimate_memory(config, **args)
    fit = largest_fit(config, **args, max_memory=profile.budget)
    return {
        "device": profile.name,
        "torch_device": profile.torch_device,
        "budget": profile.budget,
        "settings": {k: v for k, v in args.items() if k != "adapter_config"} | {"rank": rank},
        "estimate": asdict(estimate),
        "fits": estimate.total <= profile.budget,
        "margin": profile.budget - estimate.total,
        "largest_batch_size": fit.batch_size,
        "largest_seq_len": fit.seq_len,
        "text": str(estimate),
    }


__all__ = ["plan_training"]
