"""A frozen base held in the exporter's own int4 codes, so the device computes what was trained.

    HF checkpoint, fp32 on CPU (whatever the device and compute dtype: one set of codes)
      │ channel_scales.calibrate(model, the shipped text, the export's own rounding)
      │     per group of linears sharing an input (q|k|v, gate|up, down): s, or none (AWQ)
      ▼
    each decoder linear W (out, in) ─ columns · s ─ DEFAULT_QUANTIZATION.quantize(bits) ─► Int4Linear
        codes        (N, k_blocks, block_size * bits / 8) uint8   MatMulNBits' B, byte for byte
                     (a frozen parameter, as bitsandbytes holds codes; the rest buffers)
        scales       (N, k_blocks) fp32
        zero_points  (N, ceil(k_blocks * bits / 8)) uint8          4-bit asymmetric; else None
        input_scale  (K,) fp32: the group's s, or None
        bits         `stored_bits`: a q|k|v or gate|up member takes its packed unit's bits,
                     as the default fused graph (siblings packed) stores it
      the fp32 weight is dropped as each layer is replaced
    forward(x) = (x * (1/s)) @ dequant(codes)^T + bias       dequant = (q - z) * scale per block
        the "explicit" realization of channel_scales.py: an adapter wrapping the layer reads
        the unscaled x, exactly as a separate-mode graph feeds its adapter inputs
    the (tied) lm_head: kept fp32, its values set to the export's int8 table (symmetric RTN
        is idempotent on its own grid, so the export writes those very codes again)

The export (export/int4_codes.py) writes these buffers as the graph's initializers and the
model's `edgepeft_int4` record (`Int4Base`) gives it the channel scales to apply. Only
`DEFAULT_QUANTIZATION` at `BLOCK_SIZE` is built here: it is the export default, so a plain
`export(weights="int4")` reuses the codes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgepeft.artifacts.graph_io import PACKED_PROJECTIONS
from edgepeft.export import channel_scales
from edgepeft.export.channel_scales import ChannelScales, ScaleGroup
from edgepeft.export.weights import (
    DEFAULT_QUANTIZATION,
    PackedNBits,
    WeightQuantization,
    dequantize_packed,
)

log = logging.getLogger("edgepeft")

BLOCK_SIZE = 32
"""Input features per scale: the export's default `block_size`."""
RECIPE = DEFAULT_QUANTIZATION
"""The int4 recipe the base is quantized with: the export's default, so exports reuse it."""
METADATA_KEY = "edgepeft_base_int4"
"""Adapter safetensors metadata: the int4 base's recipe and codes hash (JSON, `record`)."""


def stored_bits(name: str, num_layers: int, recipe: WeightQuantization = RECIPE) -> int:
    """Bits of linear `name` in the int4 base: its packed unit's (q|k|v, gate|up) where the
    fused graph packs it, else its own (`WeightQuantization.bits`)."""
    for packed, members in PACKED_PROJECTIONS.items():
        for member in members:
            if name.endswith("." + member):
                return recipe.bits("int4", name[: -len(member)] + packed, num_layers)
    return recipe.bits("int4", name, num_layers)


class _DequantMatmul(torch.autograd.Function):
    """x @ dequant(codes)^T that saves no weight for backward: it is decoded again there,
    so training holds one layer's fp32 weight at a time, never the whole base in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.code_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.code_weight().to(grad.dtype)  # (N, K)
        return grad @ weight, None


class Int4Linear(nn.Module):
    """A frozen linear layer stored as MatMulNBits codes (see the module docstring).

    The codes are a frozen uint8 parameter, as bitsandbytes' Params4bit holds its codes
    (adapters find a base layer's device through its parameters); scales, zero points and
    s are buffers, the bias a frozen parameter. Nothing here takes gradients (an integer
    tensor cannot), and the fp32 state stays fp32 whatever dtype the model is cast to.
    """

    def __init__(
        self,
        packed: PackedNBits,
        bias: torch.Tensor | None = None,
        input_scale: np.ndarray | None = None,
    ):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.bits = packed.bits
        self.block_size = packed.block_size
        codes = torch.from_numpy(np.ascontiguousarray(packed.codes))
        self.codes = nn.Parameter(codes, requires_grad=False)  # (N, k_blocks, blob) uint8
        self.register_buffer("scales", torch.from_numpy(packed.scales.astype(np.float32)))
        zero_points = packed.zero_points
        if zero_points is not None and np.issubdtype(zero_points.dtype, np.floating):
            if packed.bits != 4 or zero_points.shape != packed.scales.shape:
                raise ValueError(
                    "Int4Linear's float zero points are 4-bit only, one per block "
                    f"{packed.scales.shape}; got {zero_points.shape} at {packed.bits} bits"
                )
            zero_points = zero_points.astype(np.float32)  # a merged QA-LoRA (with_weight)
        self.register_buffer(
            "zero_points", None if zero_points is None else torch.from_numpy(zero_points.copy())
        )
        self.register_buffer(
            "input_scale",
            None if input_scale is None else torch.from_numpy(input_scale.astype(np.float32)),
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        input_scale: np.ndarray | None = None,
        recipe: WeightQuantization = RECIPE,
        block_size: int = BLOCK_SIZE,
    ) -> Int4Linear:
        """The layer computing x @ weight^T + bias from codes of weight · input_scale."""
        w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
        if input_scale is not None:
            w = w * input_scale  # columns · s: the rounding sees the scaled weight
        return cls(recipe.quantize(w, bits, block_size), bias, input_scale)

    def packed(self) -> PackedNBits:
        """The buffers as MatMulNBits initializer values (copies, on the CPU)."""
        return PackedNBits(
            codes=self.codes.cpu().numpy().copy(),
            scales=self.scales.cpu().numpy().copy(),
            zero_points=None if self.zero_points is None else self.zero_points.cpu().numpy().copy(),
            bits=self.bits,
            block_size=self.block_size,
            in_features=self.in_features,
        )

    def _unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        """(..., bytes) uint8 -> (..., count) codes, lowest bits first (weights.pack_codes)."""
        if self.bits == 8:
            return packed[..., :count]
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # low nibble first
        return codes.reshape(*packed.shape[:-1], -1)[..., :count]

    def code_weight(self) -> torch.Tensor:
        """dequant(codes): the (N, K) fp32 matrix MatMulNBits multiplies with (x / s)."""
        n, k_blocks, _ = self.codes.shape
        weight = self._unpack(self.codes, self.block_size).to(torch.float32)  # (N, kb, bs)
        if self.zero_points is None:
            weight -= float(1 << (self.bits - 1))
        elif self.zero_points.is_floating_point():  # (N, k_blocks), not packed
            weight -= self.zero_points[..., None]
        else:
            weight -= self._unpack(self.zero_points, k_blocks).to(torch.float32)[..., None]
        weight *= self.scales[..., None]
        return weight.reshape(n, -1)[:, : self.in_features]

    def with_weight(self, weight: torch.Tensor) -> Int4Linear:
        """A new layer computing with effective weight `weight` (out, in) from the same codes
        and scales: weight · s - dequant(codes) must be constant within each block (a QA-LoRA
        update, adapters/qalora.py), and goes into float zero points z' = z - c / scale.

        Raises:
            ValueError: the change varies within a block, or the layer is 8-bit / symmetric
                (onnxruntime's CPU MatMulNBits takes float zero points for 4-bit only).
        """
        n, k_blocks = self.scales.shape
        target = weight.detach().to(device=self.scales.device, dtype=torch.float64)
        if self.input_scale is not None:
            target = target * self.input_scale.double()  # back into the codes' space
        if tuple(target.shape) != (self.out_features, self.in_features):
            shape = (n, self.in_features)
            raise ValueError(f"weight {tuple(target.shape)} is not this layer's {shape}")
        if self.in_features != k_blocks * self.block_size:
            raise ValueError(
                f"in_features {self.in_features}: not whole blocks of {self.block_size}"
            )
        delta = (target - self.code_weight().double()).reshape(n, k_blocks, self.block_size)
        c = delta.mean(-1)  # (N, k_blocks)
        spread = float((delta - c[..., None]).abs().max())
        if spread > 1e-5 * max(float(target.abs().max()), 1e-30):
            raise ValueError(
                f"the change varies within blocks of {self.block_size} (by up to {spread:.2e}): "
                "only an update constant per block (QA-LoRA) folds into the int4 zero points"
            )
        if float(c.abs().max()) == 0.0:
            return self
        if self.bits != 4 or self.zero_points is None:
            raise ValueError(
                f"this layer is stored {self.bits}-bit without zero points; onnxruntime's CPU "
                "MatMulNBits takes float zero points for 4-bit weights only"
            )
        scales = self.scales.double()
        if bool(((scales == 0) & (c != 0)).any()):
            raise ValueError("a block with scale 0 (all-zero weights) would need a change")
        if self.zero_points.is_floating_point():
            zeros = self.zero_points.double()
        else:
            zeros = self._unpack(self.zero_points, k_blocks).double()
        shift = torch.where(scales == 0, torch.zeros_like(c), c / scales.where(scales != 0, 1.0))
        packed = self.packed()
        packed = PackedNBits(
            codes=packed.codes,
            scales=packed.scales,
            zero_points=(zeros - shift).to(torch.float32).cpu().numpy(),
            bits=packed.bits,
            block_size=packed.block_size,
            in_features=packed.in_features,
        )
        scale = None if self.input_scale is None else self.input_scale.cpu().numpy()
        new = Int4Linear(packed, self.bias, scale).to(self.scales.device)
        return new.train(self.training)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) fp32 weight, dequant(codes) / s by column: a new tensor,
        for code that reads a layer's weight (merges, exports, dtype and device queries).
        Tagged quant_type "int4", as bitsandbytes tags its 4-bit weights."""
        weight = self.code_weight()
        if self.input_scale is not None:
            weight = weight * (1 / self.input_scale)
        weight.quant_type = "int4"
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * (1 / self.input_scale).to(x.dtype)
        y = (
            _DequantMatmul.apply(x, self)
            if x.requires_grad
            else F.linear(x, self.code_weight().to(x.dtype))
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        # model.to(bfloat16) / .half() cast floating buffers; scales and s must stay fp32
        # (they are the export's initializers): keep them, and follow only the device move.
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for key, old in kept.items():
            if self._buffers[key].dtype != torch.float32:
                self._buffers[key] = old.to(self._buffers[key].device)
        return self

    def extra_repr(self) -> str:
        scaled = ", channel-scaled" if self.input_scale is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, block_size={self.block_size}{scaled}"
        )


@dataclass(frozen=True)
class Int4Base:
    """How an int4 base was made: `model.edgepeft_int4`, read by the export and metadata."""

    recipe: WeightQuantization
    block_size: int
    channel_scales: ChannelScales | None
    """The calibrated scales the layers hold (None: none calibrated, see `scales_skipped`)."""
    scales_skipped: str | None = None


# ---------------------------------------------------------------- making the base


def _rounding(num_layers: int, recipe: WeightQuantization, block_size: int):
    """`channel_scales.Rounding` of the base: each member at its stored bits."""

    def rounding(group: ScaleGroup, name: str, w: np.ndarray) -> np.ndarray:
        bits = stored_bits(name, num_layers, recipe)
        return dequantize_packed(recipe.quantize(w, bits, block_size))

    return rounding


def calibrate_scales(
    model: nn.Module,
    tokenizer,
    weight_of,
    *,
    recipe: WeightQuantization = RECIPE,
    block_size: int = BLOCK_SIZE,
) -> tuple[ChannelScales | None, str | None]:
    """(the channel scales of `model`'s fp32 weights, or None and why), as an int4 export
    of that model would calibrate them (same text, same rounding)."""
    reason = channel_scales.unsupported(model) if recipe.activation_aware else "not asked for"
    ids = None
    if reason is None:
        ids = channel_scales.calibration_ids(tokenizer)
        if ids is None:
            reason = "no tokenizer for the calibration text"
        elif int(ids.max()) >= model.get_input_embeddings().num_embeddings:
            reason = "the tokenizer's ids exceed the model's vocabulary"
    if reason is not None:
        log.info("int4 base without activation-aware channel scales: %s", reason)
        return None, reason
    num_layers = len(model.model.layers)
    scales = channel_scales.calibrate(
        model,
        ids,
        weight_of,
        _rounding(num_layers, recipe, block_size),
        progress=lambda line: log.debug("int4 base: %s", line),
    )
    return scales, None


def member_scale(scales: ChannelScales | None, name: str) -> np.ndarray | None:
    """The s of the group whose member `name` is, or None."""
    if scales is None:
        return None
    layer = name.split(".layers.", 1)
    if len(layer) != 2 or not layer[1].split(".", 1)[0].isdigit():
        return None
    for group in channel_scales.layer_groups(int(layer[1].split(".", 1)[0])):
        if name in group.members:
            return scales.scales.get(group.key)
    return None


@torch.no_grad()
def round_table(weight: nn.Parameter, num_layers: int, recipe: WeightQuantization = RECIPE):
    """Set lm_head's (tied: the embedding's) fp32 values to those the int4 export stores."""
    bits = recipe.bits("int4", "lm_head", num_layers)
    if bits != 8:
        raise ValueError(
            "the int4 base keeps lm_head as the export's int8 table; a recipe storing it int4 "
            "(mixed=False) is not reproducible this way"
        )
    packed = recipe.quantize(weight.detach().float().cpu().numpy(), 8, BLOCK_SIZE)
    weight.copy_(torch.from_numpy(dequantize_packed(packed)).to(weight.dtype))


# ---------------------------------------------------------------- reading the base


def int4_layers(model: nn.Module) -> list[tuple[str, Int4Linear]]:
    """(name without adapter wrappers' ".base_layer", layer) of every Int4Linear, sorted."""
    found = {
        name.replace(".base_layer", ""): m
        for name, m in model.named_modules()
        if isinstance(m, Int4Linear)
    }
    return sorted(found.items())


def codes_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) over every Int4Linear's name, codes, scales, zero points, s."""
    h = hashlib.sha256()
    for name, layer in int4_layers(model):
        h.update(f"{name}:{layer.bits}:{layer.block_size}".encode())
        for tensor in (layer.codes, layer.scales, layer.zero_points, layer.input_scale):
            if tensor is not None:
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def record(model: nn.Module) -> dict:
    """The adapter metadata's int4 base entry: recipe, block size, scaled or not, codes hash."""
    info: Int4Base | None = getattr(model, "edgepeft_int4", None)
    recipe = info.recipe if info is not None else RECIPE
    return {
        "block_size": info.block_size if info is not None else BLOCK_SIZE,
        "method": recipe.method,
        "symmetric": recipe.symmetric,
        "mixed": recipe.mixed,
        "float_zero_points": recipe.float_zero_points,
        "activation_aware": bool(info is not None and info.channel_scales is not None),
        "codes_sha256": codes_hash(model),
    }


def metadata(model: nn.Module) -> dict[str, str]:
    """{METADATA_KEY: JSON record} for an int4 base, {} for any other."""
    if not int4_layers(model):
        return {}
    return {METADATA_KEY: json.dumps(record(model), sort_keys=True)}


def mismatch(saved: dict, model: nn.Module, quant: str) -> str | None:
    """Why an adapter whose safetensors metadata is `saved` was not trained over `model`'s
    int4 codes (base quantized `quant`), or None: it was, or it was not trained over int4."""
    if saved.get("edgepeft_base_quant") != "int4":
        return None
    recorded = json.loads(saved.get(METADATA_KEY) or "{}")
    described = (
        f"int4 (block {recorded.get('block_size')}, {recorded.get('method')}, mixed "
        f"{recorded.get('mixed')}, activation-aware {recorded.get('activation_aware')}; "
        f"codes {recorded.get('codes_sha256')})"
    )
    if quant != "int4":
        return f"it was trained over an {described} base; this base is quantized {quant!r}"
    found = record(model)
    if recorded and recorded != found:
        return (
            f"it was trained over an {described} base; this int4 base holds other codes "
            f"(block {found['block_size']}, {found['method']}, activation-aware "
            f"{found['activation_aware']}; codes {found['codes_sha256']})"
        )
    return None


def channel_scales_of(model: nn.Module) -> ChannelScales | None:
    """The channel scales the int4 base's layers hold (`Int4Base.channel_scales`)."""
    info: Int4Base | None = getattr(model, "edgepeft_int4", None)
    return None if info is None else info.channel_scales


def estimate_bytes(model: nn.Module, compute_bytes: int, skip_modules=("lm_head",)) -> int:
    """Bytes `load_base(quant="int4")` holds for the unquantized (meta) `model`.

    Every linear outside `skip_modules` as Int4Linear buffers at its `stored_bits`, with a
    channel scale counted for every member of a llama-style group (an upper bound: groups
    whose calibration chose alpha 0 hold none); the rest in `compute_bytes`.
    """
    num_layers = model.config.get_text_config().num_hidden_layers
    quantized = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not any(name == s or name.endswith("." + s) for s in skip_modules)
    }
    weights = {id(m.weight) for m in quantized.values()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in weights:
            seen.add(id(p))
            total += p.numel() * compute_bytes
    scaled = channel_scales.unsupported(model) is None
    for name, m in quantized.items():
        bits = stored_bits(name, num_layers)
        k_blocks = -(-m.in_features // BLOCK_SIZE)
        n = m.out_features
        total += n * k_blocks * BLOCK_SIZE * bits // 8 + n * k_blocks * 4  # codes, scales
        total += RECIPE.zero_point_bytes(n, k_blocks, bits, 4)
        if scaled and ".layers." in name and not name.endswith(("o_proj", "lm_head")):
            total += m.in_features * 4
    total += sum(
        b.numel() * (compute_bytes if b.is_floating_point() else b.element_size())
        for b in model.buffers()
    )
    return total


__all__ = [
    "BLOCK_SIZE",
    "METADATA_KEY",
    "RECIPE",
    "Int4Base",
    "Int4Linear",
    "calibrate_scales",
    "channel_scales_of",
    "codes_hash",
    "estimate_bytes",
    "int4_layers",
    "member_scale",
    "metadata",
    "mismatch",
    "record",
    "round_table",
    "stored_bits",
]
