"""An int4 export of an int4 base: the graph stores the codes the base was trained with.

    load_base(quant="int4"): Int4Linear per decoder linear (int4_base.py)
      codes / scales / zero_points buffers ─ Int4Codes.packed(name) ─► PackedNBits
      packed q|k|v, gate|up: the members' buffers stacked along N (each holds the packed
      unit's bits, whole blocks per row, so they join exactly)
          ─► fused._Emitter.linear ─► <name>.weight.q{bits} / .scales / .zero_points
              ─► MatMulNBits(x or Mul(x, 1/s), ...)         nothing rounded again
    the base's channel scales (Int4Base.channel_scales) replace calibration: norm-fed groups
    fold into the norm (the codes stay), the down group always stays explicit (folding it
    would divide up_proj's rows, whose codes are fixed)

A projection whose layers are not all Int4Linear (a merged layer, lm_head) is quantized as
in any int4 export. The export's recipe and block size must be the base's.

A merged QA-LoRA holds float zero points z' = z - c/s (adapters/qalora.py). onnxruntime's
CPU MatMulNBits does not prepack a weight with float zero points and dequantizes all of it
on every call (ORT 1.32: ~10x slower decode on SmolLM2-135M), so the graph keeps whole
zero points and adds the rest per block, exactly (`split_zero_points`):

    s (q - z') = s (q - ẑ) + s (ẑ - z'),    ẑ = clip(round(z'), 0, 15)
    y = MatMulNBits(x, q, s, ẑ)  +  ReduceSum_block(x) (.., k_blocks) @ C^T,  C = s (ẑ - z')
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgepeft.artifacts.graph_io import PACKED_PROJECTIONS
from edgepeft.export.channel_scales import ChannelScales
from edgepeft.export.weights import PackedNBits, WeightQuantization, pack_codes, unpack_codes
from edgepeft.int4_base import Int4Base, Int4Linear


def concat(parts: list[PackedNBits], name: str) -> PackedNBits:
    """Stack weights along `out` (q;k;v): rows are independent, so the arrays just join."""
    first = parts[0]
    layouts = {(p.bits, p.block_size, p.in_features, p.zero_points is None) for p in parts}
    if len(layouts) > 1:
        raise ValueError(f"{name}: the int4 base's parts differ in layout {sorted(layouts)}")
    zeros = [p.zero_points for p in parts]
    if first.zero_points is not None and any(np.issubdtype(z.dtype, np.floating) for z in zeros):
        # A merged QA-LoRA member holds float zero points: the unit takes them all as float
        # (whole codes are exact in float), one MatMulNBits having one zero-point type.
        zeros = [_float_zero_points(p) for p in parts]
    return PackedNBits(
        codes=np.concatenate([p.codes for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=None if first.zero_points is None else np.concatenate(zeros),
        bits=first.bits,
        block_size=first.block_size,
        in_features=first.in_features,
    )


def _float_zero_points(packed: PackedNBits) -> np.ndarray:
    """(N, k_blocks) float32 zero points of `packed` (packed uint8 ones unpacked)."""
    zeros = packed.zero_points
    if np.issubdtype(zeros.dtype, np.floating):
        return zeros.astype(np.float32)
    return unpack_codes(zeros, packed.bits, packed.scales.shape[1]).astype(np.float32)


def split_zero_points(packed: PackedNBits) -> tuple[PackedNBits, np.ndarray | None]:
    """(packed with whole uint8 zero points, C (N, k_blocks) float32 or None): the weight
    s (q - z') of float zero points z' as s (q - ẑ) plus C = s (ẑ - z') per block."""
    zeros = packed.zero_points
    if zeros is None or not np.issubdtype(zeros.dtype, np.floating):
        return packed, None
    exact = zeros.astype(np.float64)
    whole = np.clip(np.rint(exact), 0, (1 << packed.bits) - 1)
    correction = (packed.scales.astype(np.float64) * (whole - exact)).astype(np.float32)
    uint = PackedNBits(
        codes=packed.codes,
        scales=packed.scales,
        zero_points=pack_codes(whole.astype(np.uint8), packed.bits),
        bits=packed.bits,
        block_size=packed.block_size,
        in_features=packed.in_features,
    )
    return uint, correction


def _core(recipe: WeightQuantization) -> tuple:
    return (recipe.method, recipe.symmetric, recipe.mixed, recipe.float_zero_points)


class Int4Codes:
    """Finds, per projection the fused builder emits, the int4 base's own codes."""

    def __init__(self, model: nn.Module, info: Int4Base):
        self.model = model
        self.info = info

    @classmethod
    def of(cls, model: nn.Module, block_size: int, recipe: WeightQuantization) -> Int4Codes | None:
        """The codes of an int4 base (`load_base(quant="int4")`), or None for any other model.

        Raises:
            ValueError: the export's block size or recipe is not the one the base holds.
        """
        info: Int4Base | None = getattr(model, "edgepeft_int4", None)
        if info is None or not any(isinstance(m, Int4Linear) for m in model.modules()):
            return None
        if block_size != info.block_size or _core(recipe) != _core(info.recipe):
            raise ValueError(
                f"the base holds int4 codes in blocks of {info.block_size} ({info.recipe}); "
                f"this export asks for blocks of {block_size} ({recipe}). Export with the "
                "base's settings (the defaults) to reuse its codes, or load the base with "
                "quant='none' to quantize afresh"
            )
        return cls(model, info)

    @property
    def channel_scales(self) -> ChannelScales | None:
        return self.info.channel_scales

    def _layers(self, name: str) -> list[nn.Module]:
        try:
            return [self.model.get_submodule(name)]
        except AttributeError:
            for key, members in PACKED_PROJECTIONS.items():
                if name.endswith("." + key):  # a packed unit the checkpoint holds apart
                    head = name[: -len(key)]
                    return [self.model.get_submodule(head + m) for m in members]
            raise

    def packed(self, name: str, weight: torch.Tensor) -> PackedNBits | None:
        """Projection `name`'s codes as the base holds them, or None (not all Int4Linear).

        `name` is a module of the model or a packed "<...>.qkv_proj" / ".gate_up_proj" whose
        members are (`weight`, their concatenation, only checks the shape).
        """
        layers = [_innermost(m) for m in self._layers(name)]
        if not all(isinstance(m, Int4Linear) for m in layers):
            return None
        parts = [m.packed() for m in layers]
        packed = parts[0] if len(parts) == 1 else concat(parts, name)
        shape = (packed.out_features, packed.in_features)
        if shape != tuple(weight.shape):
            raise ValueError(
                f"{name}: the int4 base's codes are {shape}, the projection {tuple(weight.shape)}"
            )
        return packed


def _innermost(module: nn.Module) -> nn.Module:
    """The base layer under adapter wrappers (a merged export's model may still hold some)."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


__all__ = ["Int4Codes", "concat"]
