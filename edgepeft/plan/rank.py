"""`edgepeft plan --model MODEL --device PROFILE --adapter DIR`: the largest rank that fits.

    DIR ──adapter_config.json + the safetensors header (read here: no torch)──►
        r, dylora_min_rank m (DyLoRA's nested ranks; a plain LoRA has only r),
        bytes per rank: (in + out) of every LoRA pair x 4 (fp32, as a separate-mode file
        holds them, as budget.py counts adapters) + the whole modules it saves
    plan(model, device, adapters=0) ──► the format (--weights, else the recommended recipe's)
        and its peak without adapters                                       planner.py
    largest b in [m, r] with  peak + N x (fixed + b x per_rank) <= budget   (memory is
        linear in b; `edgepeft.truncate_rank DIR b` or `edgepeft export --rank b` makes it)

Torch-free, like the rest of `edgepeft plan` but --train.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepeft.devices import DeviceProfile
from edgepeft.plan.planner import plan
from edgepeft.plan.text import compact_size

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DYLORA_METADATA = "edgepeft_dylora_min_rank"
"""The key edgepeft.adapters.lora writes (that module needs torch; this one must not)."""
_ITEM_BYTES = 4


@dataclass(frozen=True)
class AdapterRanks:
    """What one LoRA folder costs at each of its ranks."""

    path: str
    trained_rank: int
    min_rank: int
    """dylora_min_rank; the trained rank itself for a plain LoRA."""
    bytes_per_rank: int
    fixed_bytes: int
    """Saved whole modules (modules_to_save): the same at every rank."""

    def bytes_at(self, rank: int) -> int:
        return self.fixed_bytes + rank * self.bytes_per_rank


@dataclass(frozen=True)
class RankFit:
    """The largest rank of an adapter that fits a device next to the exported base."""

    adapter: AdapterRanks
    device: str
    weights: str
    context: int
    adapters: int
    """Copies loaded at once (separate mode), each at the rank chosen."""
    base_peak: int
    """The format's peak with no adapter loaded."""
    budget: int
    rank: int | None
    """None: not even the lowest trained rank fits."""

    @property
    def peak(self) -> int:
        rank = self.rank if self.rank is not None else self.adapter.min_rank
        return self.base_peak + self.adapters * self.adapter.bytes_at(rank)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak, "fits": self.rank is not None}

    def __str__(self) -> str:
        a = self.adapter
        nested = (
            f"DyLoRA ranks {a.min_rank}-{a.trained_rank}"
            if a.min_rank < a.trained_rank
            else f"rank {a.trained_rank} only (not DyLoRA)"
        )
        lines = [
            f"rank plan: {a.path} ({nested}, {compact_size(a.bytes_per_rank)} per rank) on "
            f"{self.device}, {self.weights} weights, context {self.context}, {self.adapters} "
            "adapter(s) loaded",
            f"  base peak {compact_size(self.base_peak)} of {compact_size(self.budget)}; adapter "
            f"{compact_size(a.bytes_at(a.min_rank))} at rank {a.min_rank}, "
            f"{compact_size(a.bytes_at(a.trained_rank))} at rank {a.trained_rank}",
        ]
        if self.rank is None:
            lines.append(f"largest rank that fits: none (rank {a.min_rank} needs "
                         f"{compact_size(self.peak - self.budget)} more)")  # fmt: skip
        else:
            how = (
                "" if self.rank == a.trained_rank
                else f" (edgepeft export --adapter NAME={a.path} --rank {self.rank})"
            )  # fmt: skip
            lines.append(
                f"largest rank that fits: {self.rank}, peak {compact_size(self.peak)}"
                f" (+{compact_size(self.budget - self.peak)}){how}"
            )
        return "\n".join(lines)


def adapter_ranks(directory: str | os.PathLike) -> AdapterRanks:
    """Ranks and sizes of a LoRA folder, from its config and the safetensors header alone."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise ValueError(f"{directory} holds a {kind} adapter; only a LoRA rank can be planned")
    header = read_header(weights_path)
    r = int(config["r"])
    low = int(header.get("__metadata__", {}).get(DYLORA_METADATA, r))
    per_rank = fixed = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape = info["shape"]
        if key.endswith(".lora_A.weight"):  # (r, in)
            per_rank += shape[1]
        elif key.endswith(".lora_B.weight"):  # (out, r)
            per_rank += shape[0]
        else:
            fixed += _numel(shape)
    return AdapterRanks(str(directory), r, low, per_rank * _ITEM_BYTES, fixed * _ITEM_BYTES)


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        raw = f.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
        text = f.read(length) if length is not None and length < 100 * 2**20 else b""
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable safetensors file (bad header)") from e


def fit_rank(
    model,
    device: str | os.PathLike | DeviceProfile,
    adapter_dir: str | os.PathLike,
    *,
    adapters: int = 1,
    context: int | None = None,
    prefill: int | None = None,
    weights: str | None = None,
    block_size: int = 32,
) -> RankFit:
    """The largest rank of `adapter_dir` whose `adapters` copies fit `device` beside the base.

    The format is `weights`, else the recipe `plan` recommends (at the context it fits).
    """
    if adapters < 1:
        raise ValueError(f"adapters must be >= 1, got {adapters}")
    ranks = adapter_ranks(adapter_dir)
    extra = {} if prefill is None else {"prefill": prefill}
    base = plan(model, device, context=context, weights=weights, block_size=block_size, **extra)
    if weights is not None:
        fmt, context, peak = weights, base.context, base.formats[weights].total
    elif base.recommendation.plan is not None:
        rec = base.recommendation
        fmt, context, peak = rec.recipe.weights, min(base.context, rec.max_context), rec.plan.total
    else:
        raise ValueError(
            f"the base alone does not fit {base.device.name}: {base.recommendation.reason}"
        )
    budget = base.device.budget
    fitting = [
        b
        for b in range(ranks.min_rank, ranks.trained_rank + 1)
        if peak + adapters * ranks.bytes_at(b) <= budget
    ]
    return RankFit(
        adapter=ranks,
        device=base.device.name,
        weights=fmt,
        context=context,
        adapters=adapters,
        base_peak=peak,
        budget=budget,
        rank=max(fitting) if fitting else None,
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["AdapterRanks", "RankFit", "adapter_ranks", "fit_rank", "read_header"]
