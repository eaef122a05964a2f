"""Exact NF4 / FP4 weights: bitsandbytes' own codes and absmax, run by com.microsoft.MatMulBnb4.

    bnb Linear4bit                                     graph initializers
      weight.data      (N*K/2, 1) uint8  ─ flatten ─►  <module>.weight.bnb4    (N*K/2,) uint8
      quant_state      absmax (N*K/bs,)               <module>.weight.absmax  (N*K/bs,) fp32
                       [double quant: uint8 absmax ─ dequantize_blockwise(state2) + offset ─► fp32]
          ─► com.microsoft.MatMulBnb4(x, codes, absmax; K, N, block_size, quant_type) [─ Add(bias)]

    any other linear (merged, unquantized, int8) ─ bnb.functional.quantize_4bit ─► same layout

Both sides use one layout, checked numerically against `dequantize_4bit` and the layer's
forward: the (N, K) = (out, in) weight flattened row-major, two codes per byte with the
even flat index in the high nibble, one absmax per `block_size` consecutive flat values,
value = codebook[code] * absmax. Sibling projections packed into one MatMul (q;k;v,
gate;up) concatenate exactly, because every part holds whole blocks (K % block_size == 0).

Exactness. A layer quantized with the export's format contributes its stored codes: the
graph computes what the trained base computes (~1e-6 per layer, fp32 summation order only).
Any other weight is quantized here with bitsandbytes: a merged LoRA (merged + "nf4" is *not*
exact to the trained base, the merged weight is rounded again), an unquantized base, or a
base of the other 4-bit type. `PackedBnb4.exact` says which one a layer is.

Limits: onnxruntime's CPU kernel takes fp32 activations and block sizes 16..256 (bnb's
4-bit default is 64); K must be a multiple of the block size (real models' widths are;
bitsandbytes' CPU kernel itself dequantizes other widths inconsistently with its format).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepeft.base import bitsandbytes, canonical_4bit, dequantized_weight
from edgepeft.vocab import BNB4_FORMATS

QUANT_TYPE_ATTR = {"fp4": 0, "nf4": 1}
"""MatMulBnb4's quant_type attribute."""
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 64
"""bitsandbytes' 4-bit default, used when a weight has no codes of its own."""
_MS = "com.microsoft"
# Sibling projections the fused builder packs into one MatMul, when the model has them apart.
_PACKED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class PackedBnb4:
    """One (out, in) weight in bitsandbytes 4-bit format, as MatMulBnb4 reads it."""

    codes: np.ndarray
    """(N*K/2,) uint8: the (N, K) weight flattened row-major, even index in the high nibble."""
    absmax: np.ndarray
    """(N*K/block_size,) float32: one scale per block of consecutive flat values."""
    quant_type: str
    """"nf4" or "fp4"."""
    block_size: int
    shape: tuple[int, int]
    """(N, K) = (out_features, in_features)."""
    exact: bool
    """The codes are the base layer's own (True), or were quantized at export (False)."""


def _check_shape(name: str, shape: tuple[int, int], block_size: int) -> None:
    if block_size not in ORT_BLOCK_SIZES:
        raise ValueError(
            f"{name}: bitsandbytes block size {block_size}; onnxruntime's MatMulBnb4 takes "
            f"{ORT_BLOCK_SIZES}. Load the base with a supported block size or export with "
            "weights='int4'"
        )
    if shape[1] % block_size:
        raise ValueError(
            f"{name}: in_features {shape[1]} is not a multiple of the 4-bit block size "
            f"{block_size}; exact NF4/FP4 export needs whole blocks per row. Export with "
            "weights='int4' instead"
        )


def from_layer(module: nn.Module, name: str = "") -> PackedBnb4:
    """The stored codes and the fp32 absmax of a bitsandbytes Linear4bit, nothing rounded.

    Read through `edgepeft.base.canonical_4bit`, so a layer bnb has repacked for its
    AVX512-BF16 CPU kernel gives the standard layout; the layer itself is not touched.
    """
    bnb = bitsandbytes()
    if not isinstance(module, bnb.nn.Linear4bit):
        raise TypeError(f"{name or 'module'} is a {type(module).__name__}, expected a bnb Linear4bit")
    codes, state = canonical_4bit(module.weight)
    absmax = state.absmax
    if state.nested:  # double quantization: absmax is itself 8-bit blockwise, plus an offset
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    shape = (int(state.shape[0]), int(state.shape[1]))
    _check_shape(name or "layer", shape, state.blocksize)
    return PackedBnb4(
        codes=codes.detach().cpu().reshape(-1).numpy().copy(),
        absmax=absmax.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy().copy(),
        quant_type=state.quant_type,
        block_size=int(state.blocksize),
        shape=shape,
        exact=True,
    )


def quantize_bnb4(
    weight: torch.Tensor, quant_type: str, block_size: int = DEFAULT_BLOCK_SIZE, name: str = ""
) -> PackedBnb4:
    """Quantize an fp32 (out, in) weight with bitsandbytes (as `load_base` would, no double quant)."""
    if quant_type not in BNB4_FORMATS:
        raise ValueError(f"quant_type must be one of {BNB4_FORMATS}, got {quant_type!r}")
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    _check_shape(name or "weight", shape, block_size)
    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    codes, state = bitsandbytes().functional.quantize_4bit(
        w, blocksize=block_size, compress_statistics=False, quant_type=quant_type
    )
    return PackedBnb4(
        codes=codes.reshape(-1).numpy().copy(),
        absmax=state.absmax.float().reshape(-1).numpy().copy(),
        quant_type=quant_type,
        block_size=block_size,
        shape=shape,
        exact=False,
    )


def concat(parts: list[PackedBnb4]) -> PackedBnb4:
    """Stack weights along `out` (q;k;v): whole blocks per part, so codes and absmax just join."""
    first = parts[0]
    for part in parts[1:]:
        if (part.quant_type, part.block_size, part.shape[1]) != (
            first.quant_type,
            first.block_size,
            first.shape[1],
        ):
            raise ValueError(
                "cannot pack 4-bit weights of different formats into one MatMulBnb4: "
                f"{[(p.quant_type, p.block_size, p.shape) for p in parts]}"
            )
    return PackedBnb4(
        codes=np.concatenate([p.codes for p in parts]),
        absmax=np.concatenate([p.absmax for p in parts]),
        quant_type=first.quant_type,
        block_size=first.block_size,
        shape=(sum(p.shape[0] for p in parts), first.shape[1]),
        exact=all(p.exact for p in parts),
    )


def codebook(quant_type: str) -> np.ndarray:
    """bitsandbytes' 16 code values (fp32) of "nf4" or "fp4"."""
    return bitsandbytes().functional.get_4bit_type(quant_type, device="cpu").float().numpy()


def dequantize_bnb4(packed: PackedBnb4) -> np.ndarray:
    """The (out, in) fp32 weight MatMulBnb4 computes with (its decoding, done in numpy)."""
    high, low = packed.codes >> 4, packed.codes & 0xF
    flat = np.stack([high, low], axis=-1).reshape(-1)  # even flat index from the high nibble
    values = codebook(packed.quant_type)[flat].reshape(-1, packed.block_size)  # (blocks, bs)
    return (values * packed.absmax[:, None]).reshape(packed.shape)


def emit_matmul(builder, x: str, name: str, packed: PackedBnb4, bias: str = "") -> str:
    """y = x @ W^T (+ bias) through MatMulBnb4; initializers `<name>.weight.bnb4` / `.absmax`."""
    n, k = packed.shape
    y = builder.node(
        "MatMulBnb4",
        [
            x,
            builder.initializer(f"{name}.weight.bnb4", packed.codes),
            builder.initializer(f"{name}.weight.absmax", packed.absmax.astype(np.float32)),
        ],
        name=f"{name}/MatMulBnb4",
        domain=_MS,
        K=k,
        N=n,
        block_size=packed.block_size,
        quant_type=QUANT_TYPE_ATTR[packed.quant_type],
    )
    if bias:
        y = builder.node("Add", [y, bias], name=f"{name}/Add")
    return y


class Bnb4Weights:
    """Finds, per projection the fused builder emits, the 4-bit weight to store.

    A bnb Linear4bit of the requested type gives its own codes; every other linear layer
    is quantized with bitsandbytes, at the block size of the base's own 4-bit layers
    (so packed siblings agree), except those `load_base` keeps in full precision
    (`skip_modules`, lm_head by default), which stay fp32: `packed` returns None.
    """

    def __init__(
        self, model: nn.Module, quant_type: str, skip_modules: tuple[str, ...] = ("lm_head",)
    ):
        if quant_type not in BNB4_FORMATS:
            raise ValueError(f"quant_type must be one of {BNB4_FORMATS}, got {quant_type!r}")
        bnb = bitsandbytes()
        self.model = model
        self.quant_type = quant_type
        self.skip_modules = skip_modules
        own = [
            m.weight.quant_state.blocksize
            for m in model.modules()
            if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == quant_type
        ]
        self.block_size = int(own[0]) if own else DEFAULT_BLOCK_SIZE

    def _modules(self, name: str) -> list[tuple[str, nn.Module]]:
        try:
            return [(name, self.model.get_submodule(name))]
        except AttributeError:
            parent, _, packed = name.rpartition(".")
            if packed not in _PACKED_PARTS:
                raise
            return [(f"{parent}.{p}", self.model.get_submodule(f"{parent}.{p}")) for p in _PACKED_PARTS[packed]]

    def packed(self, name: str, weight: torch.Tensor) -> PackedBnb4 | None:
        """The 4-bit form of projection `name` whose fp32 (out, in) weight is `weight`.

        `name` is a module of the model, or a packed "<...>.qkv_proj" / "gate_up_proj"
        whose parts are (then `weight` is their concatenation, in that order).
        """
        bnb = bitsandbytes()
        if any(name == s or name.endswith("." + s) for s in self.skip_modules):
            module = self.model.get_submodule(name)
            if not isinstance(module, bnb.nn.Linear4bit):
                return None
        parts = []
        for part_name, module in self._modules(name):
            stored = getattr(getattr(module, "weight", None), "quant_state", None)
            if isinstance(module, bnb.nn.Linear4bit) and stored.quant_type == self.quant_type:
                parts.append(from_layer(module, part_name))
            else:  # merged, unquantized, int8 or the other 4-bit type: quantize it now
                parts.append(
                    quantize_bnb4(
                        dequantized_weight(module), self.quant_type, self.block_size, part_name
                    )
                )
        packed = parts[0] if len(parts) == 1 else concat(parts)
        if packed.shape != tuple(weight.shape):
            raise ValueError(
                f"{name}: the 4-bit weight is {packed.shape}, the projection {tuple(weight.shape)}"
            )
        return packed


__all__ = [
    "BNB4_FORMATS",
    "Bnb4Weights",
    "PackedBnb4",
    "concat",
    "dequantize_bnb4",
    "emit_matmul",
    "from_layer",
    "quantize_bnb4",
]
