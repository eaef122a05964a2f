"""`plan(model, device)`: every weight format's budget on a device, and the recipe to use.

    model ──model_shape──► ModelShape ─┐
    device ──load_profile──► profile ──┼──► plan_format per format (budget.py)
                                       └──► recommend (recipes.py) ──► Plan (str(): text.py)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from edgepeft.devices import DeviceProfile, load_profile
from edgepeft.plan.budget import DEFAULT_CONTEXT, DEFAULT_PREFILL, FormatPlan, plan_format
from edgepeft.plan.recipes import Recommendation, recommend
from edgepeft.plan.shape import ModelShape, model_shape
from edgepeft.plan.text import render
from edgepeft.plan.weights import FORMATS


@dataclass(frozen=True)
class Plan:
    """A model on a device: each weight format's memory and speed, and the recipe to use."""

    model: ModelShape
    device: DeviceProfile
    context: int
    prefill: int
    adapters: int
    rank: int
    formats: dict[str, FormatPlan]
    recommendation: Recommendation
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "device": self.device.to_dict(),
            "accelerator": self.device.accelerator,
            "context": self.context,
            "prefill": self.prefill,
            "adapters": self.adapters,
            "rank": self.rank,
            "formats": {k: v.to_dict() for k, v in self.formats.items()},
            "recommendation": self.recommendation.to_dict(),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return render(self)


def plan(
    model,
    device: str | os.PathLike | DeviceProfile,
    *,
    context: int | None = None,
    prefill: int = DEFAULT_PREFILL,
    adapters: int = 0,
    rank: int = 16,
    weights: str | None = None,
    block_size: int = 32,
) -> Plan:
    """Plan `model` (folder, config.json, dict or config) on `device` (profile name or path).

    Args:
        context: Tokens per sequence (default: 2048, or the model's limit if shorter).
        prefill: Tokens fed at once when reading a prompt (their logits are the largest
            activation).
        adapters: Separate-mode LoRA adapters loaded at once; rank: their r.
        weights: One format to plan (default: all of FORMATS).
    """
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    profile = load_profile(device)
    context = context or min(DEFAULT_CONTEXT, shape.max_positions or DEFAULT_CONTEXT)
    notes = []
    if shape.max_positions and context > shape.max_positions:
        raise ValueError(
            f"context {context} exceeds the model's {shape.max_positions} positions; "
            f"pass --context {shape.max_positions} or less"
        )
    if not shape.fused:
        notes.append(
            f"model_type {shape.model_type!r} has no fused graph: the generic exporter's "
            "layout differs, these figures are the fused layout's"
        )
    if profile.bandwidth_kind == "peak":
        notes.append(
            f"decode speed from the vendor's peak bandwidth x efficiency {profile.efficiency:g} "
            "(an estimate; `local` is measured and calibrated by scripts/bench_plan.py)"
        )
    formats = (weights,) if weights else FORMATS
    settings = dict(context=context, prefill=prefill, adapters=adapters, rank=rank)
    plans = {
        fmt: plan_format(shape, profile, fmt, block_size=block_size, **settings) for fmt in formats
    }
    return Plan(
        model=shape,
        device=profile,
        context=context,
        prefill=min(prefill, context),
        adapters=adapters,
        rank=rank,
        formats=plans,
        recommendation=recommend(shape, profile, **settings),
        notes=tuple(notes),
    )


__all__ = ["Plan", "plan"]
