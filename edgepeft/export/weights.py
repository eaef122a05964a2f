"""Weight formats of the fused graphs: how one linear layer's weight becomes initializers.

    W (out, in) fp32, from edgepeft.base.dequantized_weight
      │
      ├─ "fp32" / "fp16"  ─► <module>.weight                 (in, out) = W^T, ONNX MatMul's B
      │
      └─ "int8" / "int4"  ─► quantize_nbits: round-to-nearest, blockwise along `in`
             <module>.weight.q8 | .q4     (out, k_blocks, block_size * bits / 8) uint8
             <module>.weight.scales       (out, k_blocks) in the activation dtype
             <module>.weight.zero_points  (out, ceil(k_blocks * bits / 8)) uint8, asymmetric only
                 ─► com.microsoft.MatMulNBits(x, Q, scales[, zero_points], bias)

The packing is com.microsoft.MatMulNBits' layout, and the rounding is the one onnxruntime's
own quantizer (`quantize_matmul_4bits` / `_8bits`, used by MatMulNBitsQuantizer's default
RTN algorithm) applies: the bytes are identical to MatMulNBitsQuantizer's (for an odd `in`
onnxruntime leaves an arbitrary code in the unused half of each row's last byte, ours is 0).


* symmetric (the fused exporter's choice): per block, s = v_absmax_signed / -2^(bits-1)
  (the value of largest magnitude keeps its sign, so it lands exactly on code 0), codes
  q = clamp(round(v / s) + 2^(bits-1)); no zero-point tensor, MatMulNBits' default
  zero point 2^(bits-1) applies. One tensor less to read per block at decode time.
* asymmetric: the block range is widened to contain 0, s = (max - min) / (2^bits - 1),
  z = clamp(round(-min / s)), q = clamp(round(v / s + z)); zero points packed like codes.

`round` is half away from zero (C's roundf), as onnxruntime's kernels do. Weights are
W ≈ (q - z) * s; `dequantize_nbits` reconstructs that fp32 matrix for tests and checks.

Exact NF4 / FP4 (bitsandbytes' own codes and absmax, no requantization) goes through
com.microsoft.MatMulBnb4 instead: formats "nf4" / "fp4", in bnb4.py (`Bnb4Weights`,
`emit_matmul`), used by fused._Emitter.linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int8": 8, "int4": 4}
ROWS_PER_CHUNK = 2048
"""Rows quantized at once: bounds the fp32 temporaries of a (vocab, hidden) head to a slice."""


@dataclass(frozen=True)
class PackedNBits:
    """One weight quantized for MatMulNBits."""

    codes: np.ndarray
    """(N, k_blocks, block_size * bits / 8) uint8: codes of one block, low bits first."""
    scales: np.ndarray
    """(N, k_blocks) float32."""
    zero_points: np.ndarray | None
    """(N, ceil(k_blocks * bits / 8)) uint8, or None for symmetric (implicit 2^(bits-1))."""
    bits: int
    block_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf, exactly: ties go away from zero (numpy's round goes to even)."""
    whole = np.trunc(x)
    return whole + np.sign(x) * (np.abs(x - whole) >= 0.5)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis into bytes, lowest bits first."""
    per_byte = 8 // bits
    if values.shape[-1] % per_byte:
        # Fill odd tails the way onnxruntime does for zero points: the unused half byte is 8.
        pad = per_byte - values.shape[-1] % per_byte
        filler = np.full(values.shape[:-1] + (pad,), 1 << (bits - 1), dtype=values.dtype)
        values = np.concatenate([values, filler], axis=-1)
    values = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    packed = np.zeros(values.shape[:-1], dtype=np.uint8)
    for k in range(per_byte):
        packed |= values[..., k] << (k * bits)
    return packed


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    values = np.stack([(packed >> (k * bits)) & mask for k in range(per_byte)], axis=-1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two >= 16 (MatMulNBits' rule), got {block_size}; "
            "use 32 (default), 64 or 128"
        )


def quantize_nbits(
    weight: np.ndarray, bits: int, block_size: int = 32, *, symmetric: bool = True
) -> PackedNBits:
    """Quantize a (out, in) fp32 weight blockwise along `in` for MatMulNBits.

    Args:
        weight: (out_features, in_features) float weight, as torch's nn.Linear holds it.
        bits: 4 or 8.
        block_size: Input features sharing one scale (a power of two >= 16); `in` is
            zero-padded to whole blocks.
        symmetric: Implicit zero point 2^(bits-1) (True) or stored zero points (False).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check_block_size(block_size)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.shape[0] > ROWS_PER_CHUNK:  # rows are independent: same bytes, less memory
        parts = [
            quantize_nbits(weight[i : i + ROWS_PER_CHUNK], bits, block_size, symmetric=symmetric)
            for i in range(0, weight.shape[0], ROWS_PER_CHUNK)
        ]
        return PackedNBits(
            codes=np.concatenate([p.codes for p in parts]),
            scales=np.concatenate([p.scales for p in parts]),
            zero_points=None if symmetric else np.concatenate([p.zero_points for p in parts]),
            bits=bits,
            block_size=block_size,
            in_features=weight.shape[1],
        )
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, k_blocks, block_size)  # (N, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        where = np.abs(blocks).argmax(axis=-1)[..., None]
        scales = np.take_along_axis(blocks, where, axis=-1)[..., 0] / np.float32(-(1 << (bits - 1)))
        zeros = np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        low = np.minimum(blocks.min(axis=-1), 0)
        high = np.maximum(blocks.max(axis=-1), 0)
        scales = (high - low) / np.float32(qmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            zeros = np.where(scales != 0, np.clip(_round_half_away(-low / scales), 0, qmax), 0)
    scales = scales.astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
    codes = np.clip(_round_half_away(blocks * inverse[..., None] + zeros[..., None]), 0, qmax)
    codes.reshape(n, -1)[:, k:] = 0  # padding past `in`: code 0, as onnxruntime leaves it
    return PackedNBits(
        codes=_pack(codes, bits),
        scales=scales,
        zero_points=None if symmetric else _pack(zeros.astype(np.uint8), bits),
        bits=bits,
        block_size=block_size,
        in_features=k,
    )


def dequantize_nbits(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    in_features: int,
) -> np.ndarray:
    """The (out, in) fp32 weight a set of MatMulNBits initializers represents."""
    n, k_blocks, _ = codes.shape
    q = _unpack(codes, bits, block_size).astype(np.float32)  # (N, k_blocks, block_size)
    if zero_points is None:
        zeros = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.float32)
    else:
        zeros = _unpack(zero_points, bits, k_blocks).astype(np.float32)
    weight = (q - zeros[..., None]) * np.asarray(scales, dtype=np.float32)[..., None]
    return weight.reshape(n, k_blocks * block_size)[:, :in_features]


def dequantize_packed(packed: PackedNBits) -> np.ndarray:
    return dequantize_nbits(
        packed.codes,
        packed.scales,
        packed.zero_points,
        packed.bits,
        packed.block_size,
        packed.in_features,
    )
