"""QA-LoRA (Xu et al., 2023, arXiv 2309.14717): LoRA on a group-pooled input, so B A merges
exactly into an int4 base's zero points.

    x (..., in) ──► base_layer: (x · 1/s) @ dequant(codes)^T            (int4_base.Int4Linear)
    │
    └─► u = x · 1/s   (the input the codes see; u = x over any other base)
          ─ mean over each group of g features, × in/g   (HF peft's scaling) ─► (..., in/g)
          ─► A (r × in/g) ─► B (out × r) ─► × alpha/r ─► + y

    In the codes' space the update is ΔW[n, k] = (B A)[n, k // g] · alpha/r · (in/g) / g:
    constant over each block of g = block_size inputs, so dequant w = (q - z) · scale + c
    gives z' = z - c / scale, float zero points of the same codes and scales
    (Int4Linear.with_weight; merge(quant="int4")). `expand_a` writes the same update as a
    plain (r × in) A acting on x.

Over an int4 base the group must be the base's block size and the layer 4-bit with zero
points: onnxruntime's CPU MatMulNBits refuses float zero points on 8-bit weights
(matmul_nbits.cc, ORT 1.32), so the int4 base's mixed-precision int8 tensors (v_proj, some
down_proj, and q|k|v packed beside v) cannot take a QA-LoRA update.

HF peft reads the same folder (use_qalora, qalora_group_size, lora_A r × in/g) only over
GPTQ layers, the one base it implements QA-LoRA for; over any other layer peft builds an
r × in lora_A and refuses the saved one.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepeft.base import Int4Linear, linear_features


def check(base: nn.Module, group: int, where: str) -> None:
    """Refuse a layer QA-LoRA with groups of `group` cannot adapt exactly, naming `where`."""
    in_features, _ = linear_features(base)
    if in_features % group:
        raise ValueError(
            f"QA-LoRA on {where}: in_features {in_features} is not a multiple of "
            f"qalora_group_size {group} (HF peft refuses it too)"
        )
    if not isinstance(base, Int4Linear):
        return
    if group != base.block_size:
        raise ValueError(
            f"QA-LoRA on {where}: qalora_group_size {group} is not the int4 base's block size "
            f"{base.block_size}; the update folds into the zero points only when each pooled "
            f"group is one quantization block: use qalora_group_size={base.block_size}"
        )
    if base.bits != 4 or base.zero_points is None:
        raise ValueError(
            f"QA-LoRA on {where}: the int4 base stores this layer {base.bits}-bit without zero "
            "points (mixed precision), and onnxruntime's CPU MatMulNBits takes float zero points "
            "for 4-bit weights only, so its update could not be merged exactly. Leave it out "
            "(target_modules / exclude_modules), e.g. target o_proj, gate_proj, up_proj"
        )


def _inverse_scale(base: nn.Module) -> torch.Tensor | None:
    """1/s of an int4 base layer with channel scales, else None."""
    scale = getattr(base, "input_scale", None) if isinstance(base, Int4Linear) else None
    return None if scale is None else 1 / scale


def pool(x: torch.Tensor, base: nn.Module, group: int) -> torch.Tensor:
    """(..., in) -> (..., in/group): the codes' input averaged per group, × in/group (peft)."""
    inverse = _inverse_scale(base)
    if inverse is not None:
        x = x * inverse.to(x.dtype)
    pooled = x.reshape(*x.shape[:-1], -1, group).mean(-1)  # (..., in/group)
    return pooled * pooled.shape[-1]


def expand_a(a: torch.Tensor, base: nn.Module, group: int) -> torch.Tensor:
    """The (r, in) A that computes `pool` then `a` (r, in/group) as one matmul on x."""
    groups = a.shape[1]
    full = a.repeat_interleave(group, dim=1) * (groups / group)  # (r, in)
    inverse = _inverse_scale(base)
    return full if inverse is None else full * inverse.to(full.device, full.dtype)


__all__ = ["check", "expand_a", "pool"]
