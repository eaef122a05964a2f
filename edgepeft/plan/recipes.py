"""Which shipped export recipe to use on a device, and the longest context it fits.

    shipped_recipes() (edgepeft/data/recipes/*.toml, read with export.recipes.load_recipe)
        ──recommend──► for the device's accelerator, in its weight-format preference:
                       the first recipe that fits at the requested context, else the one
                       that fits the longest context (a binary search over plan_format)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepeft.devices import DeviceProfile, accelerator_for
from edgepeft.export.recipes import RECIPES_DIR, load_recipe
from edgepeft.export.weights import DEFAULT_QUANTIZATION, WeightQuantization, weight_quantization
from edgepeft.plan.budget import FormatPlan, plan_format
from edgepeft.plan.shape import ModelShape


@dataclass(frozen=True)
class Recipe:
    """A shipped export recipe and what it needs."""

    name: str
    path: str
    weights: str
    block_size: int
    accuracy_level: int
    mode: str
    max_context: int | None
    providers: tuple[str, ...]
    int4_method: str = "search"
    mixed_precision: bool = True

    @property
    def quantization(self) -> WeightQuantization:
        return weight_quantization(self.int4_method, self.mixed_precision)

    @property
    def accelerator(self) -> str:
        return accelerator_for(self.providers)


@dataclass(frozen=True)
class Recommendation:
    """The recipe to export with for a device, and how far it fits."""

    recipe: Recipe | None
    max_context: int
    """Longest context that fits with the recipe (capped by the model's and the recipe's)."""
    plan: FormatPlan | None
    """The recipe's plan at the requested context, or at max_context when that is shorter."""
    reason: str

    def to_dict(self) -> dict:
        return {
            "recipe": asdict(self.recipe) if self.recipe else None,
            "max_context": self.max_context,
            "plan": self.plan.to_dict() if self.plan else None,
            "reason": self.reason,
        }


def shipped_recipes(folder: str | os.PathLike | None = None) -> list[Recipe]:
    """Every recipe in `folder` (default: the shipped ones, edgepeft.export.recipes.RECIPES_DIR),
    read with edgepeft.export.recipes.load_recipe's checks."""
    recipes = []
    for path in sorted(Path(folder or RECIPES_DIR).glob("*.toml")):
        data = load_recipe(path)
        recipes.append(
            Recipe(
                name=path.stem,
                path=str(path),
                weights=data.get("weights", "int4"),
                block_size=data.get("block_size", 32),
                accuracy_level=data.get("accuracy_level", 4),
                mode=data.get("mode", "merged"),
                max_context=data.get("max_context"),
                providers=tuple(data.get("providers", ["CPUExecutionProvider"])),
                int4_method=data.get("int4_method", DEFAULT_QUANTIZATION.method),
                mixed_precision=data.get("mixed_precision", DEFAULT_QUANTIZATION.mixed),
            )
        )
    return recipes


def largest_context(fits, low: int, high: int) -> int:
    """Largest context in [low, high] with fits(context), monotone; 0 when none."""
    if high < low or not fits(low):
        return 0
    while high - low > 1:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return high if fits(high) else low


def recommend(
    shape: ModelShape,
    device: DeviceProfile,
    *,
    context: int,
    prefill: int,
    adapters: int,
    rank: int,
    recipes: list[Recipe] | None = None,
) -> Recommendation:
    """The shipped recipe for the device's accelerator, earliest in its format preference,
    that fits at `context`; else the one that fits the longest context."""
    recipes = shipped_recipes() if recipes is None else recipes
    usable = [
        r for r in recipes
        if r.accelerator == device.accelerator and r.weights in device.weight_formats
    ]  # fmt: skip
    usable.sort(key=lambda r: device.weight_formats.index(r.weights))
    if not usable:
        return Recommendation(None, 0, None, f"no shipped recipe for a {device.accelerator} device "
                              f"with weights {list(device.weight_formats)}")  # fmt: skip
    limit = min(x for x in (shape.max_positions, context * 64, 1 << 20) if x)
    best: tuple[int, Recipe] | None = None
    for recipe in usable:
        cap = min(limit, recipe.max_context or limit)

        def plan_at(length: int, recipe=recipe) -> FormatPlan:
            return plan_format(
                shape, device, recipe.weights, context=length, prefill=prefill,
                adapters=adapters, rank=rank, block_size=recipe.block_size,
                accelerator=recipe.accelerator, quantization=recipe.quantization,
            )  # fmt: skip

        longest = largest_context(lambda n, plan_at=plan_at: plan_at(n).fits, 1, cap)
        if longest >= min(context, cap) and longest > 0:
            at = min(context, longest)
            return Recommendation(recipe, longest, plan_at(at), "fits at the requested context")
        if longest and (best is None or longest > best[0]):
            best = (longest, recipe)
    if best is None:
        return Recommendation(None, 0, None, "no shipped recipe fits, even at a context of 1")
    longest, recipe = best
    fitted = plan_format(
        shape, device, recipe.weights, context=longest, prefill=prefill, adapters=adapters,
        rank=rank, block_size=recipe.block_size, accelerator=recipe.accelerator,
        quantization=recipe.quantization,
    )  # fmt: skip
    return Recommendation(
        recipe, longest, fitted, f"the requested context {context} does not fit; {longest} does"
    )


__all__ = ["Recipe", "Recommendation", "largest_context", "recommend", "shipped_recipes"]
