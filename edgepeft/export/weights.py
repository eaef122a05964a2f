"""Weight formats of the fused graphs: how one linear layer's weight becomes initializers.

    W (out, in) fp32, from edgepeft.base.dequantized_weight
      │
      ├─ "fp32" / "fp16"  ─► <module>.weight                 (in, out) = W^T, ONNX MatMul's B
      │
      └─ "int8" / "int4"  ─► quantize_nbits: blockwise along `in`, RTN or "search"
             <module>.weight.q8 | .q4     (out, k_blocks, block_size * bits / 8) uint8
             <module>.weight.scales       (out, k_blocks) in the activation dtype
             <module>.weight.zero_points  (out, ceil(k_blocks * bits / 8)) uint8, asymmetric only
                                          (or (out, k_blocks) float: float_zero_points)
                 ─► com.microsoft.MatMulNBits(x, Q, scales[, zero_points], bias)

The packing is com.microsoft.MatMulNBits' layout, and the rounding is the one onnxruntime's
own quantizer (`quantize_matmul_4bits` / `_8bits`, used by MatMulNBitsQuantizer's default
RTN algorithm) applies: the bytes are identical to MatMulNBitsQuantizer's (for an odd `in`
onnxruntime leaves an arbitrary code in the unused half of each row's last byte, ours is 0).


* symmetric (`RTN`, the exporters' format before `DEFAULT_QUANTIZATION`): per block, s = v_absmax_signed / -2^(bits-1)
  (the value of largest magnitude keeps its sign, so it lands exactly on code 0), codes
  q = clamp(round(v / s) + 2^(bits-1)); no zero-point tensor, MatMulNBits' default
  zero point 2^(bits-1) applies. One tensor less to read per block at decode time.
* asymmetric: the block range is widened to contain 0, s = (max - min) / (2^bits - 1),
  z = clamp(round(-min / s)), q = clamp(round(v / s + z)); zero points packed like codes.
* method="search" (either form): per block, RTN's grid and grids over a shrunk range are
  tried; for each, least squares refits scale and zero point to the rounded codes in
  closed form, and the best is alternated a few times (`search_blocks`). The error can be
  weighted per input feature (`importance`, e.g. activation energy). With
  float_zero_points the zero points are float32 (N, k_blocks), unpacked, the type
  MatMulNBits also takes (in the scales' dtype): any offset, not only a whole code.
* mixed precision is per tensor: `mixed_bits` names the tensors worth int8 in an int4 export.
* `WeightQuantization` is the recipe the exporters take (fused, generic, separate,
  streamed): the default is search + asymmetric uint8 zero points + mixed (int8 tensors
  stay symmetric RTN), `RTN` the plain format.

`round` is half away from zero (C's roundf), as onnxruntime's kernels do. Weights are
W ≈ (q - z) * s; `dequantize_nbits` reconstructs that fp32 matrix for tests and checks.

Exact NF4 / FP4 (bitsandbytes' own codes and absmax, no requantization) goes through
com.microsoft.MatMulBnb4 instead: formats "nf4" / "fp4", in bnb4.py (`Bnb4Weights`,
`emit_matmul`), used by fused._Emitter.linear.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from edgepeft.artifacts.graph_io import PACKED_PROJECTIONS
from edgepeft.vocab import NBITS

BITS = NBITS
"""The MatMulNBits formats and their bits per code (the old name of vocab.NBITS)."""
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
    """(N, ceil(k_blocks * bits / 8)) uint8, or (N, k_blocks) float32 (float_zero_points),
    or None for symmetric (implicit 2^(bits-1))."""
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


def pack_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """Codes (..., count) in [0, 2^bits - 1] as MatMulNBits packs them along the last axis:
    uint8, lowest bits first (4-bit codes two to a byte, the first in the low half)."""
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


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`pack_codes` undone: the first `count` codes along the last axis, uint8."""
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


METHODS = ("rtn", "search")
"""quantize_nbits' ways of choosing each block's scale and zero point (see `search_blocks`)."""
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
"""Fractions of a block's range tried as the first grid: shrinking it clips the rare large
weights of a heavy-tailed block and rounds the many small ones more finely."""
SEARCH_ITERATIONS = 3
"""Alternations (re-round the codes, refit scale and zero) after the best first grid."""


def quantize_nbits(
    weight: np.ndarray,
    bits: int,
    block_size: int = 32,
    *,
    symmetric: bool = True,
    method: str = "rtn",
    float_zero_points: bool = False,
    importance: np.ndarray | None = None,
) -> PackedNBits:
    """Quantize a (out, in) fp32 weight blockwise along `in` for MatMulNBits.

    Args:
        weight: (out_features, in_features) float weight, as torch's nn.Linear holds it.
        bits: 4 or 8.
        block_size: Input features sharing one scale (a power of two >= 16); `in` is
            zero-padded to whole blocks.
        symmetric: Implicit zero point 2^(bits-1) (True) or stored zero points (False).
        method: "rtn" (onnxruntime's round-to-nearest, byte for byte) or "search" (scale
            and zero point fitted to each block's squared error, `search_blocks`).
        float_zero_points: Store asymmetric zero points as float32 (N, k_blocks), in the
            scales' dtype, instead of packed uint codes: any real offset, not only a whole
            code. Needs symmetric=False.
        importance: (in_features,) non-negative weight of each input feature in the error
            "search" minimises (e.g. the mean square of its activations); default all 1.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check_block_size(block_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if float_zero_points and symmetric:
        raise ValueError("float_zero_points needs symmetric=False: symmetric has no zero points")
    weight = np.asarray(weight, dtype=np.float32)
    if importance is not None and np.shape(importance) != (weight.shape[1],):
        raise ValueError(
            f"importance must have one value per input feature, shape ({weight.shape[1]},), "
            f"got {np.shape(importance)}"
        )
    if weight.shape[0] > ROWS_PER_CHUNK:  # rows are independent: same bytes, less memory
        parts = [
            quantize_nbits(
                weight[i : i + ROWS_PER_CHUNK],
                bits,
                block_size,
                symmetric=symmetric,
                method=method,
                float_zero_points=float_zero_points,
                importance=importance,
            )
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
    if method == "rtn":
        scales, zeros = rtn_parameters(blocks, bits, symmetric)
        with np.errstate(divide="ignore"):
            inverse = np.where(scales != 0, np.float32(1) / scales, np.float32(0))
        inverse = inverse.astype(np.float32)
        codes = np.clip(_round_half_away(blocks * inverse[..., None] + zeros[..., None]), 0, qmax)
    else:
        column_weights = np.zeros(k_blocks * block_size, dtype=np.float32)  # padding: 0
        column_weights[:k] = 1 if importance is None else importance
        scales, zeros, codes = search_blocks(
            blocks,
            column_weights.reshape(k_blocks, block_size),
            bits,
            symmetric=symmetric,
            integer_zeros=not float_zero_points,
        )
    codes.reshape(n, -1)[:, k:] = 0  # padding past `in`: code 0, as onnxruntime leaves it
    if symmetric:
        zero_points = None
    elif float_zero_points:
        zero_points = zeros.astype(np.float32)
    else:
        zero_points = pack_codes(zeros.astype(np.uint8), bits)
    return PackedNBits(
        codes=pack_codes(codes, bits),
        scales=scales,
        zero_points=zero_points,
        bits=bits,
        block_size=block_size,
        in_features=k,
    )


def rtn_parameters(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's round-to-nearest (scale, zero point) of each (N, k_blocks, block) block."""
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
    return scales.astype(np.float32), zeros.astype(np.float32)


def search_blocks(
    blocks: np.ndarray,
    column_weights: np.ndarray,
    bits: int,
    *,
    symmetric: bool,
    integer_zeros: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, zero point and codes of each block, fitted to its weighted squared error.

    Each block starts from RTN's grid and from grids over a shrunk range (SEARCH_RATIOS);
    each grid rounds the codes, then least squares refits the block's scale and zero
    point to those codes in closed form (for `integer_zeros` the zero is rounded to a
    whole code and the scale refitted). The best grid is alternated SEARCH_ITERATIONS
    times (re-round, refit). A block only ever moves to a lower error, so no block ends
    worse than RTN's.

    Args:
        blocks: (N, k_blocks, block_size) weights.
        column_weights: (k_blocks, block_size) non-negative weight of each input feature
            in the error (0 on padding).
        bits: 4 or 8.
        symmetric: Keep the zero point at 2^(bits-1) and fit the scale only.
        integer_zeros: Zero points are whole codes in [0, 2^bits - 1] (uint storage);
            otherwise any float.

    Returns:
        (N, k_blocks) float32 scales, (N, k_blocks) float32 zero points, and the
        (N, k_blocks, block_size) float32 codes in [0, 2^bits - 1].
    """
    fit = _BlockFit(blocks, column_weights, bits, symmetric, integer_zeros)
    scales, zeros = rtn_parameters(blocks, bits, symmetric)
    best = fit.candidate(scales, zeros)
    if symmetric:
        where = np.abs(blocks).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(blocks, where, axis=-1)[..., 0]
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    half = 1 << (bits - 1)
    for ratio in SEARCH_RATIOS:
        if symmetric:  # the largest weight on code 0 (RTN's end: -2^(bits-1)) or on the top
            zeros = np.full(signed_max.shape, half, dtype=np.float32)
            for end in (-half, half - 1):
                best = best.better(fit.candidate(signed_max * np.float32(ratio / end), zeros))
        else:  # the range shrunk about its middle
            scales = (high - low) * np.float32(ratio / fit.qmax)
            with np.errstate(divide="ignore", invalid="ignore"):
                start = (high + low) / 2 - scales * np.float32(fit.qmax / 2)
                zeros = np.where(scales != 0, -start / scales, 0).astype(np.float32)
            best = best.better(fit.candidate(scales, zeros))
    for _ in range(SEARCH_ITERATIONS):
        best = best.better(fit.candidate(best.scales, best.zeros))
    return best.scales, best.zeros, best.codes


@dataclass(frozen=True)
class _Grid:
    """Codes and the (scale, zero) that reconstruct them, with their per-block error."""

    codes: np.ndarray  # (N, k_blocks, block_size)
    scales: np.ndarray  # (N, k_blocks)
    zeros: np.ndarray  # (N, k_blocks)
    error: np.ndarray  # (N, k_blocks) float64

    def better(self, other: _Grid) -> _Grid:
        """Blockwise, whichever of the two has the lower error (written into self's arrays:
        the search owns them, and copying in place keeps a pass over the codes cheap)."""
        take = other.error < self.error
        if other.codes is not self.codes:
            np.copyto(self.codes, other.codes, where=take[..., None])
        for mine, theirs in [(self.scales, other.scales), (self.zeros, other.zeros)]:
            np.copyto(mine, theirs, where=take)
        np.copyto(self.error, other.error, where=take)
        return self


class _BlockFit:
    """Rounds blocks to a grid and refits the grid to the codes, in closed form.

    The error of codes q under (s, z) is sum h (x - s (q - z))^2, expanded into sums over
    the block (S0 = sum h, S1 = sum h q, S2 = sum h q^2, Sx = sum h x, Sqx = sum h q x,
    Sxx = sum h x^2) so that a refit costs no pass over the weights.
    """

    def __init__(
        self,
        blocks: np.ndarray,
        column_weights: np.ndarray,
        bits: int,
        symmetric: bool,
        integer_zeros: bool,
    ):
        self.blocks = blocks  # (N, k_blocks, block_size)
        self.h = column_weights[None]  # (1, k_blocks, block_size)
        self.hx = self.h * blocks
        self.s0 = column_weights.sum(axis=-1, dtype=np.float64)[None]  # (1, k_blocks)
        self.sx = self.hx.sum(axis=-1, dtype=np.float64)
        self.sxx = (self.hx * blocks).sum(axis=-1, dtype=np.float64)
        self.qmax = (1 << bits) - 1
        self.symmetric = symmetric
        self.integer_zeros = integer_zeros

    def candidate(self, scales: np.ndarray, zeros: np.ndarray) -> _Grid:
        """Round to the grid (scales, zeros), then keep the better of it and its refit."""
        if self.integer_zeros:
            zeros = np.clip(np.rint(zeros), 0, self.qmax).astype(np.float32)
        with np.errstate(divide="ignore"):
            inverse = np.where(scales != 0, np.float32(1) / scales, np.float32(0))
        codes = self.blocks * inverse[..., None].astype(np.float32)  # (N, k_blocks, block)
        codes += zeros[..., None]
        np.clip(np.rint(codes, out=codes), 0, self.qmax, out=codes)
        # Per-block dot products as batched matmuls: much faster than product-then-sum.
        s1 = (codes[..., None, :] @ self.h[0][..., None])[..., 0, 0].astype(np.float64)
        s2 = np.einsum("nkb,nkb->nk", codes * self.h, codes).astype(np.float64)
        sqx = np.einsum("nkb,nkb->nk", self.hx, codes).astype(np.float64)
        sums = (s1, s2, sqx)
        rounded = _Grid(codes, scales.copy(), zeros.copy(), self.error(scales, zeros, *sums))
        scales, zeros = self.refit(scales, zeros, *sums)
        return rounded.better(_Grid(codes, scales, zeros, self.error(scales, zeros, *sums)))

    def error(self, scales, zeros, s1, s2, sqx) -> np.ndarray:
        s, z = scales.astype(np.float64), zeros.astype(np.float64)
        cross = sqx - z * self.sx  # sum h (q - z) x
        square = s2 - 2 * z * s1 + z * z * self.s0  # sum h (q - z)^2
        return self.sxx - 2 * s * cross + s * s * square

    def refit(self, scales, zeros, s1, s2, sqx) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares (scale, zero) for fixed codes; blocks it cannot fit keep theirs."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if not self.symmetric:  # x ~ s q + m: a line through the block's (q, x) points
                det = self.s0 * s2 - s1 * s1
                s = (self.s0 * sqx - s1 * self.sx) / det
                z = (s * s1 - self.sx) / (s * self.s0)  # -m / s
                if self.integer_zeros:
                    z = np.clip(np.rint(z), 0, self.qmax)
            else:
                z = zeros.astype(np.float64)
            if self.symmetric or self.integer_zeros:  # the scale alone, for that zero
                s = (sqx - z * self.sx) / (s2 - 2 * z * s1 + z * z * self.s0)
            ok = np.isfinite(s) & np.isfinite(z) & (s != 0)
        return (
            np.where(ok, s, scales).astype(np.float32),
            np.where(ok, z, zeros).astype(np.float32),
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
    q = unpack_codes(codes, bits, block_size).astype(np.float32)  # (N, k_blocks, block_size)
    if zero_points is None:
        zeros = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.float32)
    elif np.issubdtype(zero_points.dtype, np.floating):  # (N, k_blocks), not packed
        zeros = zero_points.astype(np.float32)
    else:
        zeros = unpack_codes(zero_points, bits, k_blocks).astype(np.float32)
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


def mixed_bits(module: str, num_layers: int) -> int:
    """Bits a mixed-precision int4 export gives one weight, in the spirit of llama.cpp's k-quants.

    int8 for the tensors whose rounding moves a real model's output most (measured on
    SmolLM2-135M by scripts/measure_int4.py --sensitivity: the tied embedding / lm_head
    table, then down_proj, then v_proj, by far the most per weight), int4 for the rest:
    the table, every v_proj (3% of the weights), and down_proj in the first and last
    eighth of the layers and every third between (llama.cpp's `use_more_bits`).

    Args:
        module: Parameter or module name, e.g. "model.layers.3.mlp.down_proj.weight".
        num_layers: The model's number of decoder layers.
    """
    if "embed_tokens" in module or "lm_head" in module:
        return 8
    layer = re.search(r"layers\.(\d+)\.", module)
    if layer is None:
        return 4
    i = int(layer[1])
    edge = i < num_layers // 8 or i >= num_layers - num_layers // 8
    if "v_proj" in module or ("down_proj" in module and (edge or i % 3 == 2)):
        return 8
    return 4


@dataclass(frozen=True)
class WeightQuantization:
    """How an "int4" / "int8" export turns each weight into MatMulNBits initializers.

    The int4 default is the best setting scripts/measure_int4.py measured on SmolLM2-135M
    (off-grid copy, 512 tokens): perplexity +14.8% over fp32 at 6.39 bits per weight,
    against +51.5% for plain symmetric RTN. `RTN` is the exporter's old format, byte for
    byte. The block size is the export's own `block_size` option.
    """

    method: str = "search"
    """int4 tensors: "search" (fitted scale and zero point, `search_blocks`) or "rtn"."""
    symmetric: bool = False
    """int4 tensors: implicit zero point 8 (no zero-point input) or stored uint8 zero points."""
    mixed: bool = True
    """In an int4 export, the tensors `mixed_bits` names are stored int8 instead."""
    float_zero_points: bool = False
    """int4 asymmetric only: float32 zero points (measured: not worth the extra bytes)."""
    activation_aware: bool = True
    """int4 fused graphs: calibrated input-channel scales before rounding (AWQ;
    export/channel_scales.py), folded into the norms where no adapter reads them."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"int4 method must be one of {METHODS}, got {self.method!r}")
        if self.float_zero_points and self.symmetric:
            raise ValueError(
                "float_zero_points needs symmetric=False: symmetric has no zero points"
            )

    def bits(self, weights: str, module: str, num_layers: int) -> int:
        """The bits of module `module`'s weight in a `weights` ("int4" / "int8") export.

        A packed q|k|v or gate|up weight takes the most of its members' (one MatMulNBits
        has one `bits`): packing stays as in every other format, so merged and separate
        graphs keep one structure, at the cost of storing q and k in int8 beside a
        mixed-precision v_proj.
        """
        if weights != "int4" or not self.mixed:
            return BITS[weights]
        packed = next((p for p in PACKED_PROJECTIONS if module.endswith("." + p)), None)
        if packed is None:
            return mixed_bits(module, num_layers)
        prefix = module[: -len(packed)]
        return max(mixed_bits(prefix + m, num_layers) for m in PACKED_PROJECTIONS[packed])

    def has_zero_points(self, bits: int) -> bool:
        """Whether a tensor of `bits` carries a zero-point initializer (int8 never does)."""
        return bits == 4 and not self.symmetric

    def zero_point_bytes(
        self, out_features: int, k_blocks: int, bits: int, float_bytes: int
    ) -> int:
        """Bytes of one weight's zero points: packed uint8, or one float (`float_bytes`,
        the activation dtype's) per block."""
        if not self.has_zero_points(bits):
            return 0
        if self.float_zero_points:
            return out_features * k_blocks * float_bytes
        return out_features * -(-k_blocks * bits // 8)

    def quantize(self, weight: np.ndarray, bits: int, block_size: int) -> PackedNBits:
        """(out, in) fp32 -> PackedNBits; int8 stays symmetric RTN (as measured: no gain)."""
        if bits == 8:
            return quantize_nbits(weight, 8, block_size, symmetric=True)
        return quantize_nbits(
            weight,
            4,
            block_size,
            symmetric=self.symmetric,
            method=self.method,
            float_zero_points=self.float_zero_points,
        )

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_QUANTIZATION = WeightQuantization()
"""search, asymmetric uint8 zero points, mixed int8/int4: `edgepeft export`'s default."""
RTN = WeightQuantization(method="rtn", symmetric=True, mixed=False, activation_aware=False)
"""Plain symmetric round-to-nearest int4 everywhere: the exporter's format before the default."""


def weight_quantization(
    method: str = "search", mixed: bool = True, activation_aware: bool = True
) -> WeightQuantization:
    """The recipe for the export options int4_method ("search": asymmetric, "rtn":
    symmetric, the old format byte for byte, so never channel-scaled), mixed_precision and
    activation_aware."""
    if method not in METHODS:
        raise ValueError(f"int4_method must be one of {METHODS}, got {method!r}")
    return WeightQuantization(
        method=method,
        symmetric=method == "rtn",
        mixed=mixed,
        activation_aware=activation_aware and method != "rtn",
    )


def quantization_record(recipe: WeightQuantization, bits: dict[str, int]) -> dict:
    """The manifest's `quantization` entry: the recipe, the tensors stored int8 and the
    count stored int4 (`bits`: tensor name -> bits, as the exporter quantized them)."""
    return {
        **recipe.to_dict(),
        "int8_tensors": sorted(name for name, b in bits.items() if b == 8),
        "int4_tensors": sum(b == 4 for b in bits.values()),
    }
