"""Memory and decode speed of one weight format on one device: `plan_format`.

    [Part] (weights.py) ──as onnxruntime holds them (accelerator "cpu" or "cuda")──►
    resident       cpu: MatMulNBits packs codes, scales and per-block sums (file + 2 x
                   scales); the external data file is memory-mapped, so lookup tables cost
                   only the pages decoding touches (Linux faults 64 KiB around each row)
                   cuda: every initializer copied to device memory
    + KV cache (2 x layers x kv_heads x head_dim x capacity, shared past/present buffer
      grown in steps of 256 like edgepeft.runtime) + activations (a prefill chunk's
      logits and layer temporaries) + adapters (LoRA r on every linear, fp32, each loaded)
    + runtime (process, libraries, CUDA context) ─► peak vs budget ─► fits, margin
    decode tok/s = efficiency x bandwidth / bytes read per token (weights + KV + adapter)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgepeft.devices import DeviceProfile
from edgepeft.export.weights import DEFAULT_QUANTIZATION, WeightQuantization
from edgepeft.plan.shape import ModelShape
from edgepeft.plan.weights import (
    BNB4_BLOCK,
    Part,
    data_file_bytes,
    decoder_weight_bytes,
    weight_parts,
)
from edgepeft.vocab import BNB4_FORMATS, NBITS

KV_STEP = 256
"""edgepeft.runtime grows KV buffers in steps of this many positions (kv_cache.CAPACITY_STEP)."""
FAULT_AROUND = 64 * 1024
"""Bytes Linux maps around a page fault in a file mapping (fault_around_bytes): each table
row a lookup reads makes this much of the table resident."""
STEP_OVERHEAD_S = 100e-6
PER_NODE_S = 2e-6
"""Fixed cost of one decode step (a Python call into onnxruntime, IO binding) and per graph
node (kernel launch, thread-pool hand-off): what makes a tiny model slower than its bytes say.
Rough figures from the 2-core x86 machine; the bandwidth term dominates models of 50M+."""
DEFAULT_CONTEXT = 2048
DEFAULT_PREFILL = 512


@dataclass(frozen=True)
class FormatPlan:
    """Memory and speed of one weight format on one device (bytes; tok/s)."""

    weights: str
    block_size: int
    file_bytes: int
    """Initializer bytes; model.onnx.data adds alignment (data_file_bytes)."""
    data_file_bytes: int
    weights_resident: int
    """What the runtime holds for the weights (see the module docstring)."""
    kv_cache: int
    activations: int
    adapters: int
    runtime: int
    load_peak: int
    """Transient while loading: onnxruntime packs a weight while its file pages are mapped."""
    total: int
    """Peak: runtime + weights + adapters + max(KV + activations, loading transient)."""
    budget: int
    bytes_per_token: int
    """Bytes one decode step reads at an empty cache (weights, one adapter)."""
    kv_bytes_per_position: int
    tok_s_start: float
    tok_s_full: float
    """Decode tok/s at the first and at the last position of the context."""

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def margin(self) -> int:
        return self.budget - self.total

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "margin": self.margin}


def kv_capacity(shape: ModelShape, context: int) -> int:
    """KV positions the runtime allocates for `context` (grown in KV_STEP steps, capped)."""
    limit = shape.max_positions or context
    return min(-(-context // KV_STEP) * KV_STEP, max(limit, context))


def kv_position_bytes(shape: ModelShape, fmt: str) -> int:
    """KV cache bytes of one position: keys and values of every layer (fp16 or fp32)."""
    return 2 * shape.layers * shape.kv_width * (2 if fmt == "fp16" else 4)


def activation_bytes(shape: ModelShape, tokens: int, fmt: str) -> int:
    """One forward over `tokens` new tokens, batch 1: fp32 logits (B, T, V), one layer's
    temporaries (norm outputs, q;k;v, attention output, gate;up and its activation) and the
    attention scores (heads, T, T) onnxruntime's CPU GroupQueryAttention materializes."""
    a = 2 if fmt == "fp16" else 4
    per_token = 4 * shape.vocab
    per_token += (4 * shape.hidden + shape.q_width + 2 * shape.kv_width + 3 * shape.intermediate) * a
    return tokens * per_token + shape.heads * tokens * tokens * 4


def touched_bytes(table: int, rows: int, tokens: int) -> int:
    """Resident bytes of a memory-mapped table after `tokens` distinct row lookups."""
    return int(min(table, tokens * max(table / rows, FAULT_AROUND)))


def step_seconds(shape: ModelShape) -> float:
    """A decode step's fixed cost: ~12 nodes per fused decoder layer and ~20 around them."""
    return STEP_OVERHEAD_S + PER_NODE_S * (20 + 12 * shape.layers)


def decode_tok_s(shape: ModelShape, device: DeviceProfile, bytes_read: float) -> float:
    """Predicted tok/s of a step reading `bytes_read` bytes."""
    return 1 / (step_seconds(shape) + bytes_read / (device.efficiency * device.bandwidth))


def resident_bytes(part: Part, accelerator: str, tokens: int) -> int:
    """Bytes the runtime holds for one part after decoding `tokens` tokens."""
    if accelerator == "cuda":
        return part.file_bytes  # every initializer is copied to device memory
    if part.quantized:
        # MatMulNBits' packed copy (codes, scales, a sum per block) + the mapped file's
        # scales, which stay resident; the mapped codes only where a lookup reads them.
        size = part.file_bytes + 2 * part.scales
        if part.lookup_rows:
            size += touched_bytes(part.file_bytes - part.scales, part.lookup_rows, tokens)
        return size
    if part.lookup_rows:
        return touched_bytes(part.file_bytes, part.lookup_rows, tokens)
    return part.file_bytes


def largest_linear_bytes(
    shape: ModelShape, fmt: str, block_size: int, quantization: WeightQuantization
) -> int:
    """Bytes of the largest decoder weight as stored (its bits as the export picks them)."""
    sizes = decoder_weight_bytes(shape, fmt, block_size, quantization)
    return max((sum(tensors) for tensors in sizes), default=0)


def plan_format(
    shape: ModelShape,
    device: DeviceProfile,
    fmt: str,
    *,
    context: int = DEFAULT_CONTEXT,
    prefill: int = DEFAULT_PREFILL,
    adapters: int = 0,
    rank: int = 16,
    block_size: int = 32,
    accelerator: str | None = None,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
) -> FormatPlan:
    """Memory and decode speed of `shape` exported with weights `fmt` on `device`
    (int4/int8 quantized by `quantization`, the export's default unless given)."""
    if context < 1 or prefill < 1 or adapters < 0 or rank < 1:
        raise ValueError(
            f"context ({context}), prefill ({prefill}) and rank ({rank}) must be >= 1, "
            f"adapters ({adapters}) >= 0"
        )
    accelerator = accelerator or device.accelerator
    parts = weight_parts(shape, fmt, block_size, quantization)
    resident = sum(resident_bytes(p, accelerator, context) for p in parts)
    capacity = kv_capacity(shape, context)
    kv_position = kv_position_bytes(shape, fmt)
    kv = kv_position * capacity
    activations = max(
        activation_bytes(shape, min(prefill, context), fmt), activation_bytes(shape, 1, fmt)
    )
    adapter_bytes = shape.lora_parameters(rank) * 4
    adapter_total = adapter_bytes * adapters
    load_peak = 0
    if accelerator == "cpu":
        # The largest MatMulNBits weight: its mapped file pages and its packed copy at once.
        load_peak = max(
            [p.file_bytes for p in parts if p.quantized and p.name == "lm_head"]
            + [largest_linear_bytes(shape, fmt, block_size, quantization)]
        ) if fmt in NBITS else 0  # fmt: skip
    total = device.runtime_overhead + resident + adapter_total + max(kv + activations, load_peak)
    # One decode step reads every weight it multiplies with (packed, as held), one embedding
    # row, the active adapter, and the cache up to its position.
    read = 0
    for p in parts:
        if not p.read_per_token:
            continue
        if p.lookup_rows and not p.quantized:
            read += p.file_bytes // p.lookup_rows
        else:
            read += p.file_bytes + (p.scales if p.quantized and accelerator == "cpu" else 0)
    read += adapter_bytes if adapters else 0
    speed = device.efficiency * device.bandwidth
    fixed = step_seconds(shape)
    return FormatPlan(
        weights=fmt,
        block_size=block_size if fmt in NBITS else (BNB4_BLOCK if fmt in BNB4_FORMATS else 0),
        file_bytes=sum(p.file_bytes for p in parts),
        data_file_bytes=data_file_bytes(shape, fmt, block_size, quantization),
        weights_resident=resident,
        kv_cache=kv,
        activations=activations,
        adapters=adapter_total,
        runtime=device.runtime_overhead,
        load_peak=load_peak,
        total=total,
        budget=device.budget,
        bytes_per_token=read,
        kv_bytes_per_position=kv_position,
        tok_s_start=1 / (fixed + (read + kv_position * min(prefill, context)) / speed),
        tok_s_full=1 / (fixed + (read + kv_position * context) / speed),
    )


__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_PREFILL",
    "KV_STEP",
    "FormatPlan",
    "activation_bytes",
    "decode_tok_s",
    "kv_capacity",
    "kv_position_bytes",
    "largest_linear_bytes",
    "plan_format",
    "resident_bytes",
    "step_seconds",
    "touched_bytes",
]
