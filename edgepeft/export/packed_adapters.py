"""Packed projections in separate mode: one adapter branch for q|k|v and one for gate|up.

    x ──► MatMulNBits([Wq; Wk; Wv]) ──────────────────────────────────────┐
     └──► MatMul A (in, rq+rk+rv) ──► MatMul B (rq+rk+rv, q+k+v) ─────────+──► qkv
                                         ┌ Bq  0   0  ┐  rq rows
          A = [Aq | Ak | Av]         B = │ 0   Bk  0  │  rk rows
                                         └ 0   0   Bv ┘  rv rows
    x A B = [x Aq Bq | x Ak Bk | x Av Bv]: each module gets exactly its own update.

The fused graph keeps sibling projections packed (PACKED_PROJECTIONS) in separate mode too,
so an all-linear LoRA costs 4 branches per layer instead of 7 and the base keeps its packed
MatMulNBits. The branch's inputs are named after the packed module
(`model.layers.0.self_attn.qkv_proj.lora_A`; phi3's own module name). A module an adapter
leaves out adds no columns to A and no rows to B (its rank is 0 there), so ranks may differ
per module and per adapter and the rank axis stays dynamic. Per-output scales concatenate
over the packed outputs, ones for a module left out:

    dora_scale (q+k+v,) = [m/||W+sBA|| of q | 1 ... (k not adapted) | ... of v]
    ia3_scale  (q+k+v,) = [l_q | l_k | 1 ...]                      output-side IA3

Not packable, so such a group stays unpacked (one branch per module, as before): IA3 on a
module's input (the siblings share x), bottleneck adapters (a nonlinearity per module) and
UniPELT's gated branches (a gate per module).

    adapter tensors per PyTorch module ──pack_tensors(layout)──► graph input values
    layout: packed module -> ((member, out_features), ...)  from the slots at export time
            (packed_layout) or, later, from the graph's inputs (graph_layout)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from torch import nn

from edgepeft.adapters.layer import AdapterLayer
from edgepeft.artifacts.graph_io import PACKED_PROJECTIONS  # the graph contract's one copy
from edgepeft.base import is_linear_like, linear_features
from edgepeft.export.adapter_slots import AdapterSlot, split_input

PACKABLE_SUFFIXES = frozenset({"lora_A", "lora_B", "dora_scale", "ia3_scale"})

Layout = Mapping[str, tuple[tuple[str, int], ...]]
"""packed module -> ((member module, its out_features), ...) in row order."""


def _linear_features(model: nn.Module, path: str) -> tuple[int, int] | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, AdapterLayer):  # an adapter loaded on the base: its layer inside
        module = module.innermost()
    return linear_features(module) if is_linear_like(module) else None


def _groups(model: nn.Module, paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """packed module -> its members, for every group one of `paths` belongs to whose
    members are all linear layers of `model` with one input width."""
    groups = {}
    for path in paths:
        for packed, members in PACKED_PROJECTIONS.items():
            member = next((m for m in members if path.endswith("." + m)), None)
            if member is None:
                continue
            prefix = path[: -len(member)]
            names = tuple(prefix + m for m in members)
            features = [_linear_features(model, n) for n in names]
            if all(features) and len({f[0] for f in features}) == 1:
                groups[prefix + packed] = names
    return groups


def pack_slots(model: nn.Module, slots: Mapping[str, AdapterSlot]) -> dict[str, AdapterSlot]:
    """The slots with sibling modules (q/k/v, gate/up) merged into one packed slot each,
    where every adapter kind on them packs (no input-side IA3, no bottleneck)."""
    out = dict(slots)
    for packed, members in _groups(model, slots).items():
        present = [slots[m] for m in members if m in slots]
        own = ("bottleneck", "gated_lora", "gated_bottleneck")
        if any(s.ia3 == "input" or any(getattr(s, k) for k in own) for s in present):
            continue  # these need the module's own input or output: leave the group unpacked
        features = [_linear_features(model, m) for m in members]
        for m in members:
            out.pop(m, None)
        out[packed] = AdapterSlot(
            packed,
            features[0][0],
            sum(f[1] for f in features),
            lora=any(s.lora for s in present),
            dora=any(s.dora for s in present),
            ia3="output" if any(s.ia3 for s in present) else None,
            members=tuple((m, f[1]) for m, f in zip(members, features, strict=True)),
        )
    return out


def packed_layout(slots: Mapping[str, AdapterSlot]) -> dict[str, tuple[tuple[str, int], ...]]:
    """The layout of the packed slots among `slots`."""
    return {name: slot.members for name, slot in slots.items() if slot.members}


def graph_layout(model: nn.Module, graph_inputs: Iterable[str]) -> dict[str, tuple[tuple[str, int], ...]]:
    """The layout a base graph was exported with, read from its adapter input names: a packed
    module that has inputs but is not a module of `model` (phi3's qkv_proj is one) packs."""
    modules = {split_input(name)[0] for name in graph_inputs if split_input(name)[1]}
    layout = {}
    for packed in modules:
        suffix = next((p for p in PACKED_PROJECTIONS if packed.endswith("." + p)), None)
        if suffix is None or _linear_features(model, packed) is not None:
            continue
        prefix = packed[: -len(suffix)]
        members = tuple(prefix + m for m in PACKED_PROJECTIONS[suffix])
        features = [_linear_features(model, m) for m in members]
        if not all(features):
            raise ValueError(
                f"the graph has adapter inputs for {packed} but the model has no "
                f"{', '.join(m for m, f in zip(members, features, strict=True) if not f)}: "
                "is this the base the graph was exported from?"
            )
        layout[packed] = tuple((m, f[1]) for m, f in zip(members, features, strict=True))
    return layout


def pack_tensors(
    tensors: Mapping[str, np.ndarray], slots: Mapping[str, AdapterSlot], layout: Layout
) -> dict[str, np.ndarray]:
    """Per-module adapter tensors (as adapter_tensors reads them) as the packed graph's inputs.

    Args:
        tensors: input name "<module>.<suffix>" -> value, modules as PyTorch names them.
        slots: module -> the adapter's slot there (tells an input-side IA3 scale apart).
        layout: the graph's packed modules (packed_layout / graph_layout).
    """
    group_of = {m: packed for packed, members in layout.items() for m, _ in members}
    out: dict[str, np.ndarray] = {}
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # packed -> member -> suffix -> value
    for key, value in tensors.items():
        module, suffix = split_input(key)
        if module not in group_of:
            out[key] = value
            continue
        slot = slots.get(module)
        if suffix not in PACKABLE_SUFFIXES or (slot is not None and slot.ia3 == "input"):
            what = "input-side IA3" if suffix == "ia3_scale" else suffix
            raise ValueError(
                f"{key}: the graph packs {module} into {group_of[module]}, which cannot take "
                f"{what} for one of its modules; export this adapter together with the base "
                "(the group then stays unpacked)"
            )
        found.setdefault(group_of[module], {}).setdefault(module, {})[suffix] = np.asarray(value)
    for packed, by_member in found.items():
        out.update(_pack_group(packed, layout[packed], by_member))
    return out


def _pack_group(
    packed: str, members: tuple[tuple[str, int], ...], by_member: dict[str, dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    total = sum(size for _, size in members)
    offsets, start = {}, 0
    for module, size in members:
        offsets[module] = (start, size)
        start += size
    out = {}
    lora = [(m, t) for m, _ in members if "lora_A" in (t := by_member.get(m, {}))]
    if lora:
        a = np.concatenate([t["lora_A"] for _, t in lora], axis=1)  # (in, R)
        b = np.zeros((a.shape[1], total), a.dtype)  # (R, out): block diagonal
        row = 0
        for module, t in lora:
            rank = t["lora_A"].shape[1]
            col, size = offsets[module]
            if t["lora_B"].shape != (rank, size):
                raise ValueError(
                    f"{module}.lora_B has shape {t['lora_B'].shape}, expected {(rank, size)}"
                )
            b[row : row + rank, col : col + size] = t["lora_B"]
            row += rank
        out[f"{packed}.lora_A"], out[f"{packed}.lora_B"] = a, b
    for suffix in ("dora_scale", "ia3_scale"):
        scaled = [(m, t[suffix]) for m, _ in members if suffix in (t := by_member.get(m, {}))]
        if scaled:
            scale = np.ones(total, scaled[0][1].dtype)
            for module, value in scaled:
                col, size = offsets[module]
                if value.size != size:
                    raise ValueError(f"{module}.{suffix} has {value.size} values, expected {size}")
                scale[col : col + size] = value.reshape(-1)
            out[f"{packed}.{suffix}"] = scale
    return out


__all__ = [
    "PACKED_PROJECTIONS",
    "graph_layout",
    "pack_slots",
    "pack_tensors",
    "packed_layout",
]
