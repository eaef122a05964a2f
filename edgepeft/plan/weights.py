"""The export's initializers in bytes, per weight format, as export/fused.py stores them.

    ModelShape, weight format ──weight_parts──► [Part]
        decoder linears   int4/int8 codes + fp32 scale per block (+ zero points) (MatMulNBits),
                          nf4/fp4 codes + fp32 absmax per 64 (MatMulBnb4), or fp16/fp32
        lm_head           quantized with int4/int8 (tied: the one table the lookup shares);
                          fp32 for nf4/fp4, as load_base leaves it
        embeddings        fp32 (fp16), read row by row
        norms, biases, rotary tables
    [Part] ──file_bytes──► initializer bytes; ──data_file_bytes──► model.onnx.data (aligned)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgepeft.export.weights import DEFAULT_QUANTIZATION, WeightQuantization
from edgepeft.plan.shape import ModelShape
from edgepeft.vocab import BNB4_FORMATS, NBITS

FORMATS = ("int4", "int8", "nf4", "fp16", "fp32")
"""Columns of the plan; fp4 is the size of nf4."""
BNB4_BLOCK = 64
"""bitsandbytes' 4-bit block (what load_base quantizes with, and MatMulBnb4 reads)."""
ROTARY_CACHE_LIMIT = 32768
"""Positions in the fused graphs' cos/sin tables (fused.ROTARY_CACHE_LIMIT)."""
EXTERNAL_THRESHOLD, ALIGNMENT = 1024, 4096
"""export/onnx_graph.py: initializers this large go to model.onnx.data, at aligned offsets."""


@dataclass(frozen=True)
class Part:
    """One group of initializers of the exported graph."""

    name: str
    file_bytes: int
    scales: int = 0
    """Bytes of MatMulNBits scales in it (onnxruntime packs a per-block sum beside each)."""
    quantized: bool = False
    """MatMulNBits weights (packed at load on CPU)."""
    lookup_rows: int = 0
    """> 0: a table read row by row (embedding lookup) of this many rows; 0: read whole."""
    read_per_token: bool = True
    tensors: tuple[int, ...] = ()
    """Bytes of each initializer in it (for the data file's alignment)."""


def nbits_tensor_bytes(
    n: int, k: int, bits: int, block: int, quantization: WeightQuantization
) -> list[int]:
    """[codes, scales(, zero points)] bytes of one (n, k) MatMulNBits weight, fp32 scales."""
    blocks = math.ceil(k / block)
    tensors = [n * blocks * (block * bits // 8), n * blocks * 4]
    zero_points = quantization.zero_point_bytes(n, blocks, bits, float_bytes=4)
    return tensors + ([zero_points] if zero_points else [])


def tensor_bytes(
    n: int, k: int, fmt: str, block: int, bits: int, quantization: WeightQuantization
) -> list[int]:
    """Initializer sizes of one (out=n, in=k) weight in `fmt`, as the fused graph stores it:
    codes and scales (MatMulNBits, `bits` per code, zero points if any; MatMulBnb4) or one."""
    if fmt in NBITS:
        return nbits_tensor_bytes(n, k, bits, block, quantization)
    if fmt in BNB4_FORMATS:
        absmax = 4 * math.ceil(n * k / BNB4_BLOCK)
        return [n * k // 2, absmax]
    return [n * k * (2 if fmt == "fp16" else 4)]


def decoder_weight_bytes(
    shape: ModelShape, fmt: str, block_size: int, quantization: WeightQuantization
) -> list[list[int]]:
    """Initializer sizes of every decoder weight, layer by layer, each in the bits the export
    gives it (mixed precision picks them by module name)."""
    quantized = fmt in NBITS
    return [
        tensor_bytes(
            n, k, fmt, block_size,
            quantization.bits(fmt, f"model.layers.{i}.{module}", shape.layers) if quantized else 0,
            quantization,
        )
        for i in range(shape.layers)
        for module, n, k, _ in shape.named_linears()
    ]  # fmt: skip


def weight_parts(
    shape: ModelShape,
    fmt: str,
    block_size: int = 32,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
) -> list[Part]:
    """The export's initializers by group, in bytes, for weights `fmt` (see export/fused.py);
    int4/int8 weights quantized by `quantization` (the export's int4_method and
    mixed_precision: the bits of each tensor and whether it has zero points)."""
    if fmt not in (*FORMATS, "fp4"):
        raise ValueError(f"weights must be one of {FORMATS + ('fp4',)}, got {fmt!r}")
    dtype = 2 if fmt == "fp16" else 4  # activations, norms, biases, embeddings
    quantized = fmt in NBITS
    weights = decoder_weight_bytes(shape, fmt, block_size, quantization)
    layers = [size for tensors in weights for size in tensors]
    layer_scales = sum(tensors[1] for tensors in weights) if quantized else 0
    small = [n * dtype for _, n, _, has_bias in shape.named_linears() if has_bias]
    parts = [Part("decoder linears", sum(layers), layer_scales, quantized, tensors=tuple(layers))]
    v, h = shape.vocab, shape.hidden
    if quantized:
        # The table takes uint8 zero points even when float ones are asked for (the lookup
        # op reads only those).
        table = replace(quantization, float_zero_points=False)
        bits = quantization.bits(fmt, "lm_head", shape.layers)
        tensors = nbits_tensor_bytes(v, h, bits, block_size, table)
        # Tied: one quantized table, lm_head's, that the lookup also reads row by row.
        parts.append(Part("lm_head", sum(tensors), tensors[1], True,
                          lookup_rows=v if shape.tied else 0, tensors=tuple(tensors)))  # fmt: skip
        if not shape.tied:
            parts.append(Part("embeddings", v * h * dtype, lookup_rows=v, tensors=(v * h * dtype,)))
    elif shape.tied:  # lm_head multiplies with the embedding table itself
        parts.append(Part("embeddings (= lm_head)", v * h * dtype, tensors=(v * h * dtype,)))
    else:
        # nf4/fp4 keep lm_head in fp32, as load_base leaves it unquantized.
        head = v * h * (4 if fmt in BNB4_FORMATS else dtype)
        parts.append(Part("lm_head", head, tensors=(head,)))
        parts.append(Part("embeddings", v * h * dtype, lookup_rows=v, tensors=(v * h * dtype,)))
    norms = [h * dtype] * ((4 if shape.gemma_norms else 2) * shape.layers + 1)
    norms += [shape.head_dim * dtype] * (2 * shape.layers if shape.qk_norm else 0)
    positions = min(shape.max_positions or ROTARY_CACHE_LIMIT, ROTARY_CACHE_LIMIT)
    rotary = [positions * shape.rotary_half * dtype] * (2 * shape.rotary_tables)
    rest = norms + rotary + small * shape.layers
    parts.append(Part("norms, biases, rotary tables", sum(rest), read_per_token=False,
                      tensors=tuple(rest)))  # fmt: skip
    return parts


def file_bytes(
    shape: ModelShape,
    fmt: str,
    block_size: int = 32,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
) -> int:
    """Bytes of the export's initializers (model.onnx.data, with the few kept in model.onnx)."""
    return sum(p.file_bytes for p in weight_parts(shape, fmt, block_size, quantization))


def data_file_bytes(
    shape: ModelShape,
    fmt: str,
    block_size: int = 32,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
) -> int:
    """Size of model.onnx.data: initializers of EXTERNAL_THRESHOLD bytes or more, each at an
    ALIGNMENT-aligned offset (export/onnx_graph.py); the last one's padding is counted too."""
    sizes = [t for p in weight_parts(shape, fmt, block_size, quantization) for t in p.tensors]
    return sum(-(-t // ALIGNMENT) * ALIGNMENT for t in sizes if t >= EXTERNAL_THRESHOLD)


__all__ = [
    "ALIGNMENT",
    "BNB4_BLOCK",
    "EXTERNAL_THRESHOLD",
    "FORMATS",
    "ROTARY_CACHE_LIMIT",
    "Part",
    "data_file_bytes",
    "decoder_weight_bytes",
    "file_bytes",
    "nbits_tensor_bytes",
    "tensor_bytes",
    "weight_parts",
]
