"""Fused decoder graphs: onnxruntime contrib ops, ~10 nodes per layer, KV cache in and out.

    input_ids (B,T) ─ Gather(embed_tokens) [─ Mul(√hidden): gemma] ─► h
                      (tied int4/int8: GatherBlockQuantized over lm_head's MatMulNBits weights)
    attention_mask (B,P+T) ─► seqlens_k = P+T-1 (every row), total_sequence_length = P+T,
                              attention_bias (B,1,T,P+T): 0 where mask=1, dtype min where 0
    for each layer i (names start with "model.layers.{i}."):
      (Skip)SimplifiedLayerNormalization(h, residual) ─► x, residual     input_layernorm
      linear(x, qkv_proj)       one MatMul(NBits) on packed [q;k;v] rows, or three
      [Split, Reshape ─ SimplifiedLayerNormalization ─ Reshape]         q_norm/k_norm: qwen3, gemma3
      GroupQueryAttention(q|qkv, k, v, past.{i}, seqlens_k, total, cos, sin, bias)
            rotary inside (do_rotary), causal, sliding window, softcap, scale
            [UniPELT, prefix_gates: bias_i = bias + Where(prefix columns, log σ(x · w_i + b_i))]
            ─► attn, present.{i}.key/.value (B, n_kv, P+T, head_dim)
      linear(attn, o_proj)   [SimplifiedLayerNormalization: post_attention_layernorm, gemma]
      SkipSimplifiedLayerNormalization ─► x, residual     post_attention / pre_feedforward norm
      linear(x, gate_up_proj) ─ Split ─ act(gate) * up, or gate/up as two linear
      linear(·, down_proj)     [SimplifiedLayerNormalization: post_feedforward_layernorm, gemma]
    SkipSimplifiedLayerNormalization(model.norm) ─ lm_head [─ tanh softcap: gemma2] ─► logits fp32

Every projection goes through `_Emitter.linear`, the one place that turns a weight into
initializers (`weights.py`) and a MatMul / MatMulNBits node. Projections named in
`lora_targets` (full module name or dotted suffix, as peft's target_modules) are never packed
with their siblings, so each keeps its own input and output tensor:

    x ──► _Emitter.linear(x, "model.layers.3.self_attn.q_proj", W) ──► y
           └─ extension point: a module in `adapter_branches` is emitted by its AdapterBranch
              (separate mode: LoRA/DoRA/IA3/bottleneck inputs as optional graph inputs with
              identity defaults, see adapter_slots.py), which calls back for the base matmul.
              A branch may be keyed by a packed name ("...self_attn.qkv_proj",
              "...mlp.gate_up_proj"): the siblings then stay packed and share one branch
              (packed_adapters.py), the fast path separate mode takes

A selective adapter (separate mode) changes base parameters rather than feeding a
projection: each parameter named in `tuned_parameters` (a norm's γ, a projection's bias,
named as PyTorch names it) becomes an optional graph input of that very name whose default
is the base's value, so the adapter file holds the parameter's tuned value (original + Δ):

    SimplifiedLayerNormalization(x, γ)   γ = input "model.layers.3.input_layernorm.weight"
    [gemma: Add(γ, 1), the (1 + w) gemma's norm multiplies by]
    MatMul(NBits)(x, W) + b              b = input "model.layers.3.self_attn.q_proj.bias"
                                         (that projection is then never packed)

A tuned γ is never the target of folded channel scales (they would change its value): its
group's scales stay explicit.

UniPELT's prefix gate (`prefix_gates=True`, only when a UniPELT adapter is exported, so other
graphs are unchanged): query t's scores on the prefix's cache columns get log g_t, g_t =
σ(x_t · w_i + b_i), x the attention's input (after its norm), as adapters/unipelt.py adds it
to the PyTorch mask. The prefix always seeds cache columns 0..N-1 (artifacts/kv_seed.py);
N is the length of the optional input `model.prefix_gate.columns`, so no runtime code knows it:

    Range(0, P+T) < Shape(model.prefix_gate.columns) ─► prefix columns (P+T,) bool
    x (B,T,H) ─ MatMul(model.layers.i.self_attn.prefix_gate.weight (H,)) ─ Add(.bias (1,))
      ─ z (B,T) ─► log σ(z) = -Softplus(-z) (fp32) ─ Unsqueeze ─► (B,1,T,1)
      ─ Where(prefix columns, ·, 0) ─► (B,1,T,P+T) ─ Add(attention_bias) ─► bias_i
    defaults: columns (0,) ─► no prefix column, bias_i = attention_bias + 0 (bit for bit)

Positions. Rows are left padded. GroupQueryAttention gets every row's full length (P+T), so
the cache layout is exactly concat(past, new) as Optimum and onnxruntime-genai feed it, and
padding is masked by attention_bias. Rotary then uses the column index as position, where
PyTorch's generate uses cumsum(mask) - 1: a row's queries and keys are shifted by the same
count of pads, and RoPE scores depend only on position differences, so logits agree while a
left-padded row's cached keys are rotated by that constant offset. Sliding windows count
columns in both. Limits: rotary caches hold min(max_position_embeddings, 32768) positions
(onnxruntime refuses longer inputs clearly); GroupQueryAttention takes more than one new
token over a non-empty past only at batch size 1 (chunked prefill).

Weights: "fp32", "fp16" (weights, activations and KV in fp16, logits cast to fp32), "int8" /
"int4" (MatMulNBits; by default int4 "search" with uint8 zero points and int8 where
`weights.mixed_bits` says, or plain symmetric RTN: `weights.WeightQuantization`; with
`activation_aware`, calibrated input-channel scales first, folded into the norms or a Mul:
channel_scales.py; norms and untied embeddings stay fp32, a tied table is
stored once, quantized, for lookup and lm_head; an int4 base, `load_base(quant="int4")`,
gives its own codes and channel scales instead, nothing rounded again: int4_codes.py),
"nf4" / "fp4" (MatMulBnb4 over bitsandbytes' own codes, fp32 activations; lm_head stays
fp32). See weights.py, bnb4.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edgepeft.architectures import DecoderShape
from edgepeft.base import dequantized_weight, is_linear_like
from edgepeft.export import bnb4, channel_scales, int4_codes
from edgepeft.export.adapter_slots import PREFIX_COLUMNS_INPUT, prefix_gate_inputs
from edgepeft.export.channel_scales import ChannelScales
from edgepeft.export.graph_info import WEIGHT_FORMATS
from edgepeft.export.onnx_graph import GraphBuilder
from edgepeft.export.weights import (
    BITS,
    DEFAULT_QUANTIZATION,
    PackedNBits,
    WeightQuantization,
    check_block_size,
    dequantize_packed,
    quantization_record,
)

if TYPE_CHECKING:  # only a type here: the stream imports the fold machinery, fused needs none
    from edgepeft.export.stream import LayerStream

log = logging.getLogger("edgepeft")

OPSETS = {"": 21, "com.microsoft": 1}
ROTARY_CACHE_LIMIT = 32768
# RoPE variants whose cos/sin depend only on the position (no sequence-length rescaling).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_MS = "com.microsoft"


@dataclass(frozen=True)
class _Arch:
    """What differs between the supported decoder families."""

    packed_checkpoint: bool = False
    """qkv_proj and gate_up_proj are single modules in the checkpoint (phi3)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before rotary (qwen3, gemma3)."""
    gemma: bool = False
    """RMSNorm scales by (1 + w), embeddings by √hidden, norms around attention and MLP."""


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch(),
    "mistral": _Arch(),
    "qwen2": _Arch(),
    "qwen3": _Arch(qk_norm=True),
    "phi3": _Arch(packed_checkpoint=True),
    "gemma2": _Arch(gemma=True),
    "gemma3_text": _Arch(gemma=True, qk_norm=True),
}
FUSED_MODEL_TYPES: frozenset[str] = frozenset(_ARCHS)

AdapterBranch = Callable[["_Emitter", str, str, torch.Tensor, "torch.Tensor | None"], str]
"""(emitter, x, module name, weight (out, in), bias) -> y: one projection with its adapter inputs."""
BlockBranch = Callable[["_Emitter", str, str], str]
"""(emitter, h, y) -> y': a branch beside a whole block (separate mode's parallel adapter on
"model.layers.i.mlp"): h is the block's input before its norm, y the block's output."""


@dataclass(frozen=True)
class GraphInfo:
    path: Path
    """model.onnx written (weights in model.onnx.data beside it, external data)."""
    num_nodes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str
    """"float32" or "float16"."""
    weights: str
    """"fp32" | "fp16" | "int8" | "int4" | "nf4" | "fp4"."""
    op_counts: dict[str, int]
    quantization: dict | None = None
    """int4/int8: `weights.quantization_record` (the recipe, which tensors are int8); else None."""


# ---------------------------------------------------------------- the one projection emitter


def _is_target(name: str, targets: frozenset[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class _Emitter:
    """Emits projections and norms in one weight format."""

    def __init__(
        self,
        builder: GraphBuilder,
        weights: str,
        block_size: int,
        accuracy_level: int,
        lora_targets: frozenset[str],
        gemma_norms: bool,
        quantization: WeightQuantization = DEFAULT_QUANTIZATION,
        num_layers: int = 0,
        accuracy_level_int8: int | None = None,
    ):
        self.b = builder
        self.gemma_norms = gemma_norms
        self.weights = weights
        self.dtype = np.float16 if weights == "fp16" else np.float32
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.accuracy_level_int8 = (
            accuracy_level if accuracy_level_int8 is None else accuracy_level_int8
        )
        """MatMulNBits' accuracy_level of the 8-bit nodes (mixed-precision tensors, the tied
        lm_head): onnxruntime's 8-bit kernel at fp32 compute (level 1) is ~60x slower than at
        level 4, its 4-bit one ~2.5x, so an exact-int4 graph may keep only the 4-bit nodes fp32."""
        self.lora_targets = lora_targets
        self.quantization = quantization
        self.num_layers = num_layers
        self.bits_of: dict[str, int] = {}
        """int4/int8: tensor -> the bits it was stored in (the manifest's record)."""
        self.bnb4: bnb4.Bnb4Weights | None = None
        """Set for weights "nf4" / "fp4": where each projection's 4-bit codes come from."""
        self.int4: int4_codes.Int4Codes | None = None
        """Set for weights "int4" of an int4 base: its own codes, not rounded again."""
        self.requantized: list[str] = []
        """int4 base: projections not held in its codes (a plain LoRA merged in), rounded
        here; lm_head's int8 table is not one (RTN gives its very codes again)."""
        self.adapter_branches: dict[str, AdapterBranch] = {}
        """module name -> emitter of its projection with separate-mode adapter inputs."""
        self.emitted_branches: set[str] = set()
        self.block_branches: dict[str, BlockBranch] = {}
        """block name ("model.layers.3.mlp") -> its BlockBranch (called by `_decoder_layer`)."""
        self.prefix_gates = False
        """Emit UniPELT's per-layer prefix gate inputs on the attention bias."""
        self.tuned: frozenset[str] = frozenset()
        """Parameters (full PyTorch names) emitted as optional inputs: a selective adapter's."""
        self.emitted_tuned: set[str] = set()
        self.channel_scales: ChannelScales | None = None
        """int4 with activation-aware scales: the calibrated s per group (channel_scales.py)."""
        self.column_scale: dict[str, np.ndarray] = {}
        """Folded groups: module -> s its weight columns are multiplied by when read."""
        self.row_divisor: dict[str, np.ndarray] = {}
        """Folded down groups: up_proj -> s its weight rows are divided by when read."""
        self.norm_divisor: dict[str, np.ndarray] = {}
        """Folded groups: RMSNorm -> s its γ is divided by."""
        self.input_scale: dict[str, tuple[str, np.ndarray]] = {}
        """Explicit groups: module (or packed name) -> (group key, s): the base matmul reads
        Mul(x, 1/s) and columns · s, while an adapter on the group reads x itself."""
        self._scaled_inputs: dict[tuple[str, str], str] = {}
        self.scales_skipped: str | None = None
        """Why an int4 graph asked for channel scales got none (the manifest says it)."""

    def use_channel_scales(
        self, scales: ChannelScales, num_layers: int, fold_rows: bool = True
    ) -> None:
        """Realize each calibrated group's s: folded where no adapter reads the group's
        input or output, else explicit (see channel_scales.py). Without `fold_rows` a down
        group stays explicit (an int4 base's up_proj codes are fixed)."""
        self.channel_scales = scales
        for i in range(num_layers):
            for group in channel_scales.layer_groups(i):
                s = scales.scales.get(group.key)
                if s is None:
                    continue
                touched = (*group.members, *group.packed)
                if not group.source_is_norm:
                    touched += (group.source,)
                tuned_norm = group.source_is_norm and f"{group.source}.weight" in self.tuned
                foldable = fold_rows or group.source_is_norm
                if self.packable(*touched) and foldable and not tuned_norm:
                    for member in group.members:
                        self.column_scale[member] = s
                    divisors = self.norm_divisor if group.source_is_norm else self.row_divisor
                    divisors[group.source] = s
                else:  # a norm-fed group's packed name is a base matmul too (packed_adapters)
                    readers = group.members + (group.packed if group.source_is_norm else ())
                    for name in readers:
                        self.input_scale[name] = (group.key, s)

    def rounding(self, group: channel_scales.ScaleGroup, name: str, w: np.ndarray) -> np.ndarray:
        """`channel_scales.Rounding`: a member as this graph will round it (packed bits too)."""
        unit = name
        if group.source_is_norm and self.packable(*group.members, *group.packed):
            unit = group.packed[0]
        bits = self.quantization.bits(self.weights, unit, self.num_layers)
        return dequantize_packed(self.quantization.quantize(w, bits, self.block_size))

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        """Module `name`'s fp32 (out, in) weight, with folded channel scales applied."""
        w = _weight(model, name)
        if name in self.column_scale or name in self.row_divisor:
            w = w.detach().to(torch.float32)
            if name in self.column_scale:
                w = w * torch.from_numpy(self.column_scale[name])
            if name in self.row_divisor:
                w = w / torch.from_numpy(self.row_divisor[name])[:, None]
        return w

    def _scaled_input(self, x: str, name: str) -> tuple[str, np.ndarray]:
        """Mul(x, 1/s) for an explicit group's base matmul, made once per input tensor."""
        key, s = self.input_scale[name]
        if (x, key) not in self._scaled_inputs:
            inverse = self.b.initializer(f"{key}.input_scale_inverse", (1 / s).astype(self.dtype))
            self._scaled_inputs[(x, key)] = self.b.node("Mul", [x, inverse], name=f"{key}/ScaleMul")
        return self._scaled_inputs[(x, key)], s

    def packable(self, *names: str) -> bool:
        """Sibling projections may share one MatMul only if no adapter needs one of them alone
        (an adapter branch, or a tuned bias of its own)."""
        return not any(_is_target(n, self.lora_targets) or f"{n}.bias" in self.tuned for n in names)

    def _tuned_input(self, parameter: str, value: np.ndarray) -> str:
        """The optional input a selective adapter sets, defaulting to the base's `value`."""
        self.emitted_tuned.add(parameter)
        return self.b.optional_input(parameter, value.astype(self.dtype), list(value.shape))

    def bias(self, name: str, bias: torch.Tensor) -> str:
        """Module `name`'s bias: an initializer, or an optional input where it is tuned."""
        if f"{name}.bias" in self.tuned:
            return self._tuned_input(f"{name}.bias", _numpy(bias))
        return self.b.initializer(f"{name}.bias", _numpy(bias).astype(self.dtype))

    def level(self, bits: int) -> int:
        """The accuracy_level of a MatMulNBits node storing `bits`-bit weights."""
        return self.accuracy_level_int8 if bits == 8 else self.accuracy_level

    def bits(self, name: str) -> int:
        """Bits of module `name`'s int4/int8 weight (`WeightQuantization.bits`)."""
        return self.quantization.bits(self.weights, name, self.num_layers)

    def quantized(self, name: str, w: np.ndarray, uint_zero_points: bool = False) -> PackedNBits:
        """Module `name`'s (out, in) fp32 weight as MatMulNBits initializer values."""
        bits = self.bits(name)
        self.bits_of[name] = bits
        recipe = self.quantization
        if uint_zero_points and recipe.float_zero_points:
            recipe = replace(recipe, float_zero_points=False)
        return recipe.quantize(w, bits, self.block_size)

    def nbits_initializers(self, name: str, packed: PackedNBits) -> list[str]:
        """[codes, scales] or [codes, scales, zero_points]: MatMulNBits' B, scales, zero_points."""
        names = [
            self.b.initializer(f"{name}.weight.q{packed.bits}", packed.codes),
            self.b.initializer(f"{name}.weight.scales", packed.scales.astype(self.dtype)),
        ]
        if packed.zero_points is not None:
            zero_points = packed.zero_points
            if np.issubdtype(zero_points.dtype, np.floating):  # float zeros: the scales' type
                zero_points = zero_points.astype(self.dtype)
            names.append(self.b.initializer(f"{name}.weight.zero_points", zero_points))
        return names

    def linear(
        self,
        x: str,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        branch: bool = True,
    ) -> str:
        """y = x @ weight^T + bias for the module `name`; weight is fp32 (out, in).

        Initializers: `<name>.weight` (in, out) for fp32/fp16, else `<name>.weight.q{bits}`,
        `<name>.weight.scales`; `<name>.bias`. This is where a LoRA branch attaches: a
        module in `adapter_branches` is emitted by its branch, which calls back here with
        branch=False for the base projection.
        """
        if branch and name in self.adapter_branches:
            self.emitted_branches.add(name)
            return self.adapter_branches[name](self, x, name, weight, bias)
        w = _numpy(weight)
        if name in self.input_scale:  # explicit channel scales: the base reads x / s
            x, s = self._scaled_input(x, name)
            w = w * s
        bias_init = self.bias(name, bias) if bias is not None else ""
        packed_4bit = self.bnb4.packed(name, weight) if self.bnb4 is not None else None
        if packed_4bit is not None:  # exact NF4/FP4: the base's own bitsandbytes codes
            return bnb4.emit_matmul(self.b, x, name, packed_4bit, bias_init)
        if self.weights in BITS:
            packed = self.int4.packed(name, weight) if self.int4 is not None else None
            if packed is None:
                packed = self.quantized(name, w)
                if self.int4 is not None and name != "lm_head":
                    self.requantized.append(name)
            else:  # an int4 base's own codes (int4_codes.py)
                self.bits_of[name] = packed.bits
            packed, correction = int4_codes.split_zero_points(packed)
            inputs = [x, *self.nbits_initializers(name, packed)]
            if bias_init:  # A, B, scales, zero_points, g_idx (unused), bias
                inputs += [""] * (5 - len(inputs)) + [bias_init]
            y = self.b.node(
                "MatMulNBits",
                inputs,
                name=f"{name}/MatMulNBits",
                domain=_MS,
                K=w.shape[1],
                N=w.shape[0],
                bits=packed.bits,
                block_size=self.block_size,
                accuracy_level=self.level(packed.bits),
            )
            if correction is not None:  # a merged QA-LoRA's fractional zero points
                y = self._block_correction(x, y, name, correction)
            return y
        y = self.b.node(
            "MatMul",
            [x, self.b.initializer(f"{name}.weight", w.T.astype(self.dtype))],
            name=f"{name}/MatMul",
        )
        if bias_init:
            y = self.b.node("Add", [y, bias_init], name=f"{name}/Add")
        return y

    def _block_correction(self, x: str, y: str, name: str, correction: np.ndarray) -> str:
        """y + (x summed per quantization block) @ C^T: what float zero points would add."""
        b = self.b
        n, k_blocks = correction.shape
        blocks = b.node(
            "Reshape",
            [x, b.initializer(f"{name}.blocks_shape", np.array([0, 0, k_blocks, -1], np.int64))],
            name=f"{name}/blocks/Reshape",
        )  # (B, T, k_blocks, block)
        sums = b.node(
            "ReduceSum",
            [blocks, b.initializer(f"{name}.blocks_axis", np.array([-1], np.int64))],
            name=f"{name}/blocks/ReduceSum",
            keepdims=0,
        )  # (B, T, k_blocks)
        shift = b.node(
            "MatMul",
            [sums, b.initializer(f"{name}.weight.zero_shift", correction.T.astype(self.dtype))],
            name=f"{name}/zero_shift/MatMul",
        )  # (B, T, N)
        return b.node("Add", [y, shift], name=f"{name}/zero_shift/Add")

    def gamma(self, name: str, norm: nn.Module) -> str:
        w = _numpy(norm.weight)
        if f"{name}.weight" in self.tuned:  # never folded (use_channel_scales)
            gamma = self._tuned_input(f"{name}.weight", w)
            if not self.gemma_norms:
                return gamma
            one = self.b.initializer(f"{name}.one", np.ones(1, self.dtype))
            return self.b.node("Add", [gamma, one], name=f"{name}/Add_one")
        if name in self.norm_divisor:  # folded channel scales (never gemma: not supported)
            w = w / self.norm_divisor[name]
        if self.gemma_norms:  # Gemma's RMSNorm multiplies by (1 + w), in fp32 as HF does
            return self.b.initializer(
                f"{name}.weight_plus_one", (np.float32(1) + w).astype(self.dtype)
            )
        return self.b.initializer(f"{name}.weight", w.astype(self.dtype))

    def norm(self, x: str, name: str, norm: nn.Module) -> str:
        return self.b.node(
            "SimplifiedLayerNormalization",
            [x, self.gamma(name, norm)],
            name=f"{name}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=_eps(norm),
            stash_type=1,
        )

    def add_norm(
        self, delta: str, residual: str | None, name: str, norm: nn.Module
    ) -> tuple[str, str]:
        """(norm(residual + delta), residual + delta); the first layer has no residual yet."""
        if residual is None:
            return self.norm(delta, name, norm), delta
        normed, _, _, summed = self.b.node(
            "SkipSimplifiedLayerNormalization",
            [delta, residual, self.gamma(name, norm)],
            name=f"{name}/SkipSimplifiedLayerNormalization",
            domain=_MS,
            epsilon=_eps(norm),
            output_names=[f"{name}/output_0", "", "", f"{name}/output_3"],
        )
        return normed, summed


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy, wherever and in whatever dtype the tensor lives."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    if not is_linear_like(module):
        raise TypeError(
            f"{name} is a {type(module).__name__}, expected a linear layer (nn.Linear or bitsandbytes); "
            "merge or remove adapters before exporting the base graph"
        )
    return dequantized_weight(module)


def _bias(model: nn.Module, name: str) -> torch.Tensor | None:
    return model.get_submodule(name).bias


# ---------------------------------------------------------------- model facts


def _dims(model: nn.Module) -> DecoderShape:
    return DecoderShape.from_config(model.config)


def _activation(config) -> tuple[str, str, dict]:
    """(op, domain, attributes) of the MLP activation."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act in ("silu", "swish"):
        return "QuickGelu", _MS, {"alpha": 1.0}  # x * sigmoid(1.0 * x) is SiLU
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return "FastGelu", _MS, {}  # the tanh approximation
    if act == "gelu":
        return "Gelu", "", {}
    raise NotImplementedError(
        f"MLP activation {act!r} has no fused export; supported: silu, gelu, gelu_pytorch_tanh. "
        "Use the generic exporter for this model."
    )


def _window(config, layer: int) -> int:
    """GroupQueryAttention's local_window_size (-1: full attention), as HF masks the layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return -1
    return int(window) if window else -1


def _rotary_caches(
    b: GraphBuilder, model: nn.Module, dtype, dims: DecoderShape
) -> dict[str | None, tuple[str, str]]:
    """cos/sin cache initializers (positions, rotary_dim / 2) per layer type (None: one for all).

    Read from the model's own rotary module (inv_freq, attention_scaling), computed as its
    forward computes them: cos(position * inv_freq) * attention_scaling in fp32.
    """
    rotary = model.model.rotary_emb
    rope_types = (
        rotary.rope_type if isinstance(rotary.rope_type, dict) else {None: rotary.rope_type}
    )
    length = min(int(model.config.max_position_embeddings), ROTARY_CACHE_LIMIT)
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    tables = {}
    for layer_type, rope_type in rope_types.items():
        if rope_type not in STATIC_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {rope_type!r} rescales with the sequence length; the fused export "
                f"supports {sorted(STATIC_ROPE_TYPES)}. Use the generic exporter for this model."
            )
        prefix = f"{layer_type}_" if layer_type is not None else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq").float().cpu()
        scaling = float(getattr(rotary, f"{prefix}attention_scaling"))
        half = inv_freq.numel()
        if half * 2 > dims.head_dim or (half * 2 < dims.head_dim and half % 8):
            raise NotImplementedError(
                f"rotary dim {half * 2} of head_dim {dims.head_dim}: GroupQueryAttention rotates "
                "a partial head only when rotary_dim / 2 is a multiple of 8. Use the generic exporter."
            )
        freqs = positions * inv_freq[None, :]  # (L, rotary_dim / 2)
        name = "model.rotary_emb" + (f".{layer_type}" if layer_type else "")
        tables[layer_type] = (
            b.initializer(f"{name}.cos_cache", (freqs.cos() * scaling).numpy().astype(dtype)),
            b.initializer(f"{name}.sin_cache", (freqs.sin() * scaling).numpy().astype(dtype)),
        )
    return tables


def _check(model: nn.Module, weights: str, accuracy_level: int) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        raise NotImplementedError(
            f"no fused graph for model_type {model_type!r}; fused: {sorted(FUSED_MODEL_TYPES)}. "
            "Use the generic exporter."
        )
    if weights not in WEIGHT_FORMATS + bnb4.BNB4_FORMATS:
        raise ValueError(
            f"weights must be one of {WEIGHT_FORMATS + bnb4.BNB4_FORMATS}, got {weights!r}"
        )
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level}")
    if getattr(model.config, "use_bidirectional_attention", False):
        raise NotImplementedError(f"{model_type} with bidirectional attention has no fused export")
    return model_type


def unsupported(model: nn.Module, weights: str, accuracy_level: int = 4) -> str | None:
    """Why export_fused would decline `model` (its NotImplementedError), else None.

    Reads only the config and the rotary tables, so a weightless streamed model can be
    checked before anything is built.
    """
    try:
        _check(model, weights, accuracy_level)
        _activation(model.config)
        _rotary_caches(GraphBuilder("probe"), model, np.float32, _dims(model))
    except NotImplementedError as e:
        return str(e)
    return None


# ---------------------------------------------------------------- graph


@dataclass(frozen=True)
class _Shared:
    """Graph tensors every layer's GroupQueryAttention reads."""

    seqlens_k: str
    """(B,) int32: P+T-1 for every row (padding is masked by `bias` instead)."""
    total: str
    """() int32: P+T."""
    bias: str
    """(B, 1, T, P+T): 0 where attention_mask is 1, the dtype's min where it is 0."""
    rotary: dict[str | None, tuple[str, str]]
    """cos/sin cache initializers per layer type; key None when all layers share one."""
    prefix_columns: str | None = None
    """(P+T,) bool, True on a UniPELT prefix's cache columns; None: no prefix gates."""

    def rotary_for(self, config, layer: int) -> tuple[str, str]:
        if None in self.rotary:
            return self.rotary[None]
        return self.rotary[config.layer_types[layer]]


def _attention_inputs(b: GraphBuilder, dtype) -> tuple[str, str, str]:
    """(seqlens_k (B,) int32, total_sequence_length () int32, attention_bias (B,1,T,P+T))."""
    name = "model.attn_mask"
    mask_shape = b.node("Shape", ["attention_mask"], name=f"{name}/Shape")  # [B, P+T]
    total64 = b.node(
        "Gather",
        [mask_shape, b.initializer(f"{name}.axis1", np.array(1, np.int64))],
        name=f"{name}/total/Gather",
    )
    total = b.node("Cast", [total64], name=f"{name}/total/Cast", to=6)  # int32 scalar
    batch = b.node("Shape", ["attention_mask"], name=f"{name}/batch/Shape", end=1)  # [B]
    last = b.node(
        "Sub",
        [total, b.initializer(f"{name}.one_i32", np.array(1, np.int32))],
        name=f"{name}/seqlens/Sub",
    )
    seqlens = b.node("Expand", [last, batch], name=f"{name}/seqlens/Expand")
    # bias = (mask - 1) * (-min): 0 where attended, the dtype's min where padded
    maskf = b.node(
        "Cast", ["attention_mask"], name=f"{name}/bias/Cast", to=10 if dtype == np.float16 else 1
    )
    minus_one = b.node(
        "Sub", [maskf, b.initializer(f"{name}.one", np.array(1, dtype))], name=f"{name}/bias/Sub"
    )
    bias = b.node(
        "Mul",
        [minus_one, b.initializer(f"{name}.neg_min", np.array(-np.finfo(dtype).min, dtype))],
        name=f"{name}/bias/Mul",
    )
    bias = b.node(
        "Unsqueeze",
        [bias, b.initializer(f"{name}.axes12", np.array([1, 2], np.int64))],
        name=f"{name}/bias/Unsqueeze",
    )  # (B, 1, 1, P+T)
    seq = b.node("Shape", ["input_ids"], name=f"{name}/seq/Shape", start=1)  # [T]
    ones = b.initializer(f"{name}.ones2", np.array([1, 1], np.int64))
    target = b.node(
        "Concat",
        [ones, seq, b.initializer(f"{name}.one_i64", np.array([1], np.int64))],
        name=f"{name}/bias/Concat",
        axis=0,
    )  # [1, 1, T, 1]
    bias = b.node("Expand", [bias, target], name=f"{name}/bias/Expand")  # (B, 1, T, P+T)
    return seqlens, total, bias


def _prefix_columns(b: GraphBuilder, dtype) -> str:
    """(P+T,) bool: column j < N, N the length of `model.prefix_gate.columns` ((0,) unfed)."""
    name = "model.prefix_gate"
    columns = b.optional_input(PREFIX_COLUMNS_INPUT, np.zeros(0, dtype), ["prefix_columns"])
    n = b.node("Shape", [columns], name=f"{name}/Shape")  # [N]
    total = b.node("Shape", ["attention_mask"], name=f"{name}/total/Shape", start=1, end=2)
    total = b.node(
        "Squeeze",
        [total, b.initializer(f"{name}.axis0", np.array([0], np.int64))],
        name=f"{name}/total/Squeeze",
    )  # () P+T
    index = b.node(
        "Range",
        [
            b.initializer(f"{name}.start", np.array(0, np.int64)),
            total,
            b.initializer(f"{name}.step", np.array(1, np.int64)),
        ],
        name=f"{name}/Range",
    )  # (P+T,)
    return b.node("Less", [index, n], name=f"{name}/Less")


def _prefix_gate_bias(e: _Emitter, x: str, p: str, shared: _Shared, hidden: int) -> str:
    """attention_bias + log σ(x · w + b) on the prefix columns (B, 1, T, P+T), for layer `p`."""
    b = e.b
    weight, bias = prefix_gate_inputs(p)
    weight = b.optional_input(weight, np.zeros(hidden, e.dtype), [hidden])
    bias = b.optional_input(bias, np.zeros(1, e.dtype), [1])
    z = b.node("MatMul", [x, weight], name=f"{p}/prefix_gate/MatMul")  # (B, T)
    z = b.node("Add", [z, bias], name=f"{p}/prefix_gate/Add")
    if e.dtype != np.float32:  # the log-sigmoid in fp32 (CPU has no fp16 Softplus)
        z = b.node("Cast", [z], name=f"{p}/prefix_gate/Cast", to=1)
    z = b.node("Neg", [z], name=f"{p}/prefix_gate/Neg")
    z = b.node("Softplus", [z], name=f"{p}/prefix_gate/Softplus")
    log_gate = b.node("Neg", [z], name=f"{p}/prefix_gate/Neg_log")  # log σ(z) = -softplus(-z)
    if e.dtype != np.float32:
        log_gate = b.node("Cast", [log_gate], name=f"{p}/prefix_gate/Cast_back", to=10)
    log_gate = b.node(
        "Unsqueeze",
        [log_gate, b.initializer(f"{p}.prefix_gate.axes13", np.array([1, 3], np.int64))],
        name=f"{p}/prefix_gate/Unsqueeze",
    )  # (B, 1, T, 1)
    zero = b.initializer(f"{p}.prefix_gate.zero", np.array(0, e.dtype))
    term = b.node(
        "Where", [shared.prefix_columns, log_gate, zero], name=f"{p}/prefix_gate/Where"
    )  # (B, 1, T, P+T)
    return b.node("Add", [shared.bias, term], name=f"{p}/prefix_gate/Add_bias")


def _qk_norm(e: _Emitter, x: str, name: str, norm: nn.Module, heads: int, head_dim: int) -> str:
    """Per-head RMSNorm: (B,T,heads*hd) ─► (B,T,heads,hd) ─ norm ─► (B,T,heads*hd)."""
    b = e.b
    split = b.node(
        "Reshape",
        [x, b.initializer(f"{name}.heads_shape", np.array([0, 0, heads, head_dim], np.int64))],
        name=f"{name}/Reshape",
    )
    normed = e.norm(split, name, norm)
    return b.node(
        "Reshape",
        [normed, b.initializer(f"{name}.flat_shape", np.array([0, 0, heads * head_dim], np.int64))],
        name=f"{name}/Reshape_back",
    )


def _attention(
    e: _Emitter, model: nn.Module, arch: _Arch, dims: DecoderShape, i: int, x: str, shared: _Shared
) -> str:
    b = e.b
    p = f"model.layers.{i}.self_attn"
    attn = model.get_submodule(p)
    q_size, kv_size = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    names = [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"]
    if arch.packed_checkpoint:
        qkv = e.linear(
            x, f"{p}.qkv_proj", _weight(model, f"{p}.qkv_proj"), _bias(model, f"{p}.qkv_proj")
        )
        q, k, v = qkv, "", ""
    elif e.packable(*names):
        biases = [_bias(model, n) for n in names]
        qkv = e.linear(
            x,
            f"{p}.qkv_proj",
            torch.cat([e.weight(model, n) for n in names]),
            torch.cat(biases) if biases[0] is not None else None,
        )
        q, k, v = qkv, "", ""
    else:
        q, k, v = (e.linear(x, n, e.weight(model, n), _bias(model, n)) for n in names)
    if arch.qk_norm:
        if not k:  # packed: split for the per-head norms
            q, k, v = b.node(
                "Split",
                [
                    q,
                    b.initializer(f"{p}.qkv_sizes", np.array([q_size, kv_size, kv_size], np.int64)),
                ],
                name=f"{p}.qkv_proj/Split",
                axis=-1,
                outputs=3,
            )
        q = _qk_norm(e, q, f"{p}.q_norm", attn.q_norm, dims.heads, dims.head_dim)
        k = _qk_norm(e, k, f"{p}.k_norm", attn.k_norm, dims.kv_heads, dims.head_dim)
    cos, sin = shared.rotary_for(model.config, i)
    bias = shared.bias
    if shared.prefix_columns is not None:
        bias = _prefix_gate_bias(e, x, p, shared, dims.hidden)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    out = b.node(
        "GroupQueryAttention",
        [
            q,
            k,
            v,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            shared.seqlens_k,
            shared.total,
            cos,
            sin,
            "",  # position_ids: GroupQueryAttention counts columns itself
            bias,
        ],
        name=f"{p}/GroupQueryAttention",
        domain=_MS,
        output_names=[f"{p}/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=dims.heads,
        kv_num_heads=dims.kv_heads,
        do_rotary=1,
        scale=float(attn.scaling),
        local_window_size=_window(model.config, i),
        **({"softcap": float(softcap)} if softcap else {}),
    )[0]
    return e.linear(out, f"{p}.o_proj", _weight(model, f"{p}.o_proj"), _bias(model, f"{p}.o_proj"))


def _mlp(e: _Emitter, model: nn.Module, arch: _Arch, i: int, x: str, activation) -> str:
    b = e.b
    p = f"model.layers.{i}.mlp"
    op, domain, attrs = activation
    if arch.packed_checkpoint or e.packable(f"{p}.gate_proj", f"{p}.up_proj"):
        if arch.packed_checkpoint:
            weight = _weight(model, f"{p}.gate_up_proj")
        else:
            weight = torch.cat([e.weight(model, f"{p}.gate_proj"), e.weight(model, f"{p}.up_proj")])
        gate_up = e.linear(x, f"{p}.gate_up_proj", weight)
        gate, up = b.node(
            "Split", [gate_up], name=f"{p}.gate_up_proj/Split", axis=-1, num_outputs=2, outputs=2
        )
    else:
        gate = e.linear(x, f"{p}.gate_proj", e.weight(model, f"{p}.gate_proj"))
        up = e.linear(x, f"{p}.up_proj", e.weight(model, f"{p}.up_proj"))
    act = b.node(op, [gate], name=f"{p}.act_fn/{op}", domain=domain, **attrs)
    hidden = b.node("Mul", [act, up], name=f"{p}/Mul")
    return e.linear(hidden, f"{p}.down_proj", e.weight(model, f"{p}.down_proj"))


@dataclass(frozen=True)
class _Table:
    """The embedding table as the graph stores it."""

    name: str
    """(V, H) table initializer, or lm_head's MatMulNBits codes (V, k_blocks, blob) it shares."""
    scales: str = ""
    """lm_head's MatMulNBits scales (V, k_blocks) when the table is shared quantized."""
    bits: int = 0
    zero_points: str = ""
    """lm_head's packed uint8 zero points when the shared table is asymmetric, else ""."""


def _shares_quantized_head(e: _Emitter, model: nn.Module) -> bool:
    """Tied embeddings exported int4/int8: one quantized table serves Gather and lm_head."""
    head = model.get_output_embeddings()
    return (
        head.weight is model.get_input_embeddings().weight
        and e.weights in BITS
        and e.bnb4 is None
        and not _is_target("lm_head", e.lora_targets)
    )


def _lm_head(e: _Emitter, model: nn.Module, hidden: str, table: _Table) -> str:
    if table.scales:  # tied int4/int8: the embedding lookup already stored these weights
        vocab, hidden_size = model.get_input_embeddings().weight.shape
        return e.b.node(
            "MatMulNBits",
            [hidden, table.name, table.scales, *([table.zero_points] if table.zero_points else [])],
            name="lm_head/MatMulNBits",
            domain=_MS,
            K=hidden_size,
            N=vocab,
            bits=table.bits,
            block_size=e.block_size,
            accuracy_level=e.level(table.bits),
        )
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    if tied and e.weights in ("fp32", "fp16", *bnb4.BNB4_FORMATS):  # nf4 keeps lm_head fp32
        # Reuse the (V, H) embedding table instead of storing its transpose a second time.
        return e.b.node(
            "FusedMatMul", [hidden, table.name], name="lm_head/FusedMatMul", domain=_MS, transB=1
        )
    return e.linear(hidden, "lm_head", _weight(model, "lm_head"))


def _quantized_lookup(e: _Emitter, weight: torch.Tensor) -> tuple[str, _Table]:
    """Tied int4/int8 embeddings: lm_head's MatMulNBits weights, read back row by row.

        lm_head.weight.q{bits} (V, k_blocks, blob) ─ Reshape (V, k_blocks*blob)
          ─ GatherBlockQuantized(input_ids, lm_head.weight.scales (V, k_blocks))
          ─► (B, T, k_blocks*block_size) [─ Slice: H not a multiple of block_size] ─► (B, T, H)

    The rows are exactly the dequantized int4/int8 rows lm_head multiplies with, stored
    once: both ops read the same zero points (packed uint8, the same layout in both ops),
    or the codes' default 2^(bits-1) when symmetric. Mixed precision stores this table
    int8 (symmetric RTN). GatherBlockQuantized takes uint8 zero points only, so a recipe
    with float zero points gives this table whole-code ones.
    """
    b = e.b
    vocab, hidden_size = weight.shape
    packed = e.quantized("lm_head", _numpy(weight), uint_zero_points=True)
    codes, scales, *zero_points = e.nbits_initializers("lm_head", packed)
    rows = b.node(
        "Reshape",
        [codes, b.initializer("model.embed_tokens.rows_shape", np.array([vocab, -1], np.int64))],
        name="model.embed_tokens/Reshape",
    )  # (V, k_blocks * blob)
    hidden = b.node(
        "GatherBlockQuantized",
        [rows, "input_ids", scales, *zero_points],
        name="model.embed_tokens/GatherBlockQuantized",
        domain=_MS,
        gather_axis=0,
        quantize_axis=1,
        block_size=e.block_size,
        bits=packed.bits,
    )  # (B, T, k_blocks * block_size)
    if hidden_size % e.block_size:  # rows are padded to whole blocks
        hidden = b.node(
            "Slice",
            [
                hidden,
                b.initializer("model.embed_tokens.slice_start", np.array([0], np.int64)),
                b.initializer("model.embed_tokens.slice_end", np.array([hidden_size], np.int64)),
                b.initializer("model.embed_tokens.slice_axis", np.array([-1], np.int64)),
            ],
            name="model.embed_tokens/Slice",
        )
    return hidden, _Table(codes, scales, packed.bits, *zero_points)


def _embed(e: _Emitter, model: nn.Module, arch: _Arch, dims: DecoderShape) -> tuple[str, _Table]:
    """(hidden states (B, T, H), the embedding table as stored)."""
    b = e.b
    weight = model.get_input_embeddings().weight
    if _shares_quantized_head(e, model):
        hidden, table = _quantized_lookup(e, weight)
    else:
        table = _Table(b.initializer("model.embed_tokens.weight", _numpy(weight).astype(e.dtype)))
        hidden = b.node("Gather", [table.name, "input_ids"], name="model.embed_tokens/Gather")
    # hidden: (B, T, H)
    if arch.gemma:  # HF multiplies by √hidden rounded to the weights' dtype
        scale = torch.tensor(dims.hidden**0.5, dtype=weight.dtype).item()
        scale = b.initializer("model.embed_tokens.embed_scale", np.array(scale, e.dtype))
        hidden = b.node("Mul", [hidden, scale], name="model.embed_tokens/Mul")
    return hidden, table


def _decoder_layer(
    e: _Emitter,
    model: nn.Module,
    arch: _Arch,
    dims: DecoderShape,
    i: int,
    hidden: str,
    residual: str | None,
    shared: _Shared,
    activation: tuple,
) -> tuple[str, str]:
    """One decoder layer; returns (its output delta, the residual stream) still to be added."""
    layer = model.model.layers[i]
    p = f"model.layers.{i}"
    x, residual = e.add_norm(hidden, residual, f"{p}.input_layernorm", layer.input_layernorm)
    attn = _attention(e, model, arch, dims, i, x, shared)
    if arch.gemma:  # sandwich norms: normalize the branch output before adding it
        attn = e.norm(attn, f"{p}.post_attention_layernorm", layer.post_attention_layernorm)
        x, residual = e.add_norm(
            attn, residual, f"{p}.pre_feedforward_layernorm", layer.pre_feedforward_layernorm
        )
    else:
        x, residual = e.add_norm(
            attn, residual, f"{p}.post_attention_layernorm", layer.post_attention_layernorm
        )
    hidden = _mlp(e, model, arch, i, x, activation)
    block = e.block_branches.get(f"{p}.mlp")
    if block is not None:  # a parallel adapter reads the FFN's input before its norm: residual
        e.emitted_branches.add(f"{p}.mlp")
        hidden = block(e, residual, hidden)
    if arch.gemma:
        hidden = e.norm(hidden, f"{p}.post_feedforward_layernorm", layer.post_feedforward_layernorm)
    return hidden, residual


def _logits(e: _Emitter, model: nn.Module, x: str, table: _Table) -> str:
    """lm_head, in fp32, soft-capped where the model says so; the tensor is named "logits"."""
    b = e.b
    logits = _lm_head(e, model, x, table)  # (B, T, V)
    if e.dtype != np.float32:
        logits = b.node("Cast", [logits], name="lm_head/Cast", to=1)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        cap = b.initializer("lm_head.final_logit_softcapping", np.array(softcap, np.float32))
        logits = b.node("Div", [logits, cap], name="lm_head/softcap/Div")
        logits = b.node("Tanh", [logits], name="lm_head/softcap/Tanh")
        logits = b.node("Mul", [logits, cap], name="lm_head/softcap/Mul")
    return b.rename(logits, "logits")


@torch.no_grad()
def export_fused(
    model: nn.Module,
    out_dir: Path,
    weights: str = "int4",
    *,
    block_size: int = 32,
    accuracy_level: int = 4,
    accuracy_level_int8: int | None = None,
    quantization: WeightQuantization = DEFAULT_QUANTIZATION,
    lora_targets=None,
    adapter_branches: Mapping[str, AdapterBranch] | None = None,
    block_branches: Mapping[str, BlockBranch] | None = None,
    prefix_gates: bool = False,
    tuned_parameters: Iterable[str] = (),
    optional_inputs: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    stream: LayerStream | None = None,
    calibration_ids: np.ndarray | None = None,
    channel_scales: ChannelScales | None = None,
) -> GraphInfo:
    """Write a fused onnxruntime decoder graph of `model` to out_dir/model.onnx (+ .data).

    Memory: initializers go to model.onnx.data as they are made (onnx_graph.py spooling).
    A model from `edgepeft.export.stream.skeleton` holds no weights: given its `stream`,
    each part is read from the checkpoint while it is emitted and dropped after, one layer
    at a time.

    Args:
        model: HF causal LM of a type in FUSED_MODEL_TYPES, possibly with bitsandbytes layers
            (read through their dequantized weights).
        out_dir: Folder for model.onnx and model.onnx.data (replaced atomically).
        weights: "fp32", "fp16", "int8" or "int4" (see weights.py).
        block_size: Input features per quantization block (int8 / int4).
        accuracy_level: MatMulNBits' compute type for activations: 0 or 1 keep fp32, 4 lets
            onnxruntime quantize activations to int8 per block (fastest on CPU).
        accuracy_level_int8: That of the 8-bit MatMulNBits nodes only (default:
            accuracy_level), recorded in the manifest's quantization entry.
        quantization: How int4/int8 weights are quantized (default: search, asymmetric,
            mixed int8/int4; `weights.RTN` for plain symmetric round-to-nearest).
        lora_targets: Module names (or dotted suffixes) that a separate-mode adapter will
            attach to; those projections are emitted alone rather than packed.
        adapter_branches: Module name (exact) -> AdapterBranch emitting that projection
            with its adapter inputs (separate mode, see separate.py); never packed.
        block_branches: Block name ("model.layers.i.mlp") -> BlockBranch adding a branch
            beside that block (separate mode's parallel adapters).
        prefix_gates: Give every attention layer UniPELT's prefix gate inputs (module
            docstring); identity when left unfed.
        tuned_parameters: Full names of the norm weights and projection biases a selective
            adapter sets (separate mode): each becomes an optional input of that name,
            defaulting to the base's value; one the graph does not hold raises.
        optional_inputs: Extra graph inputs, each defaulting to the array given.
        progress: Called with one line per decoder layer (default: the "edgepeft" logger
            at INFO level, or the stream's own progress callback).
        stream: The LayerStream `skeleton` returned with `model`, when `model` is one.
        calibration_ids: (1, T) token ids (`channel_scales.calibration_ids`) for the
            activation-aware channel scales of an int4 graph (`quantization.activation_aware`);
            None leaves the weights unscaled.
        channel_scales: Scales to apply instead of calibrating (any weight format: the
            transform is exact before rounding), e.g. those a training base was made with.

    Returns:
        GraphInfo describing the written graph.
    """
    model_type = _check(model, weights, accuracy_level)
    if accuracy_level_int8 is not None:
        _check(model, weights, accuracy_level_int8)
    if weights in BITS:
        check_block_size(block_size)
    arch = _ARCHS[model_type]
    dims = _dims(model)
    activation = _activation(model.config)
    say = progress or getattr(stream, "progress", None) or log.info
    out_dir = Path(out_dir)
    e = _Emitter(
        GraphBuilder(f"edgepeft-{model_type}-{weights}", spool_dir=out_dir),
        weights,
        block_size,
        accuracy_level,
        frozenset([lora_targets] if isinstance(lora_targets, str) else lora_targets or ())
        | frozenset(adapter_branches or ()),
        gemma_norms=arch.gemma,
        quantization=quantization,
        num_layers=dims.layers,
        accuracy_level_int8=accuracy_level_int8,
    )
    e.adapter_branches = dict(adapter_branches or {})
    e.block_branches = dict(block_branches or {})
    e.prefix_gates = prefix_gates
    e.tuned = frozenset(tuned_parameters)
    try:
        return _emit_graph(
            e,
            model,
            stream,
            out_dir,
            say,
            arch,
            dims,
            activation,
            optional_inputs,
            (calibration_ids, channel_scales),
        )
    finally:
        e.b.discard()  # spooled data of a graph that failed; nothing once saved


def _emit_graph(
    e: _Emitter,
    model: nn.Module,
    stream: LayerStream | None,
    out_dir: Path,
    say: Callable[[str], None],
    arch: _Arch,
    dims: DecoderShape,
    activation: tuple,
    optional_inputs: Mapping[str, np.ndarray] | None,
    scaling: tuple[np.ndarray | None, ChannelScales | None],
) -> GraphInfo:
    """export_fused's body: inputs, embedding, layers, head, outputs, save."""

    def holding(*prefixes: str):
        return stream.holding(*prefixes) if stream is not None else contextlib.nullcontext()

    model_type, weights = model.config.model_type, e.weights
    if weights in bnb4.BNB4_FORMATS:
        e.bnb4 = bnb4.Bnb4Weights(model, weights)
    if weights == "int4":
        e.int4 = int4_codes.Int4Codes.of(model, e.block_size, e.quantization)
    _channel_scales(e, model, holding, *scaling, say)
    b, dtype = e.b, e.dtype
    kv_shape = ["batch_size", dims.kv_heads, "past_sequence_length", dims.head_dim]
    b.input("input_ids", np.int64, ["batch_size", "sequence_length"])
    b.input("attention_mask", np.int64, ["batch_size", "total_sequence_length"])
    for i in range(dims.layers):
        b.input(f"past_key_values.{i}.key", dtype, kv_shape)
        b.input(f"past_key_values.{i}.value", dtype, kv_shape)
    for name, default in (optional_inputs or {}).items():
        b.optional_input(name, default, list(default.shape))

    rotary = _rotary_caches(b, model, dtype, dims)
    shared = _Shared(
        *_attention_inputs(b, dtype),
        rotary=rotary,
        prefix_columns=_prefix_columns(b, dtype) if e.prefix_gates else None,
    )
    with holding("model.embed_tokens"):
        hidden, table = _embed(e, model, arch, dims)
    residual = None
    for i in range(dims.layers):
        say(f"fused export: layer {i + 1}/{dims.layers}")
        with holding(f"model.layers.{i}"):
            hidden, residual = _decoder_layer(
                e, model, arch, dims, i, hidden, residual, shared, activation
            )
    with holding("model.norm", "lm_head"):
        x, _ = e.add_norm(hidden, residual, "model.norm", model.model.norm)
        _logits(e, model, x, table)
    unexposed = sorted((set(e.adapter_branches) | set(e.block_branches)) - e.emitted_branches)
    if unexposed:
        raise ValueError(
            f"an adapter targets layer {unexposed[0]} that the {model_type} graph does not "
            f"expose as a projection ({len(unexposed)} such layers: {unexposed[:4]}); "
            "export that adapter with mode='merged'"
        )
    untouched = sorted(e.tuned - e.emitted_tuned)
    if untouched:
        raise ValueError(
            f"a selective adapter tunes {untouched[0]}, which the {model_type} graph does not "
            f"hold as a norm weight or a projection bias ({len(untouched)} such parameters: "
            f"{untouched[:4]}); export that adapter with mode='merged'"
        )

    present_shape = ["batch_size", dims.kv_heads, "total_sequence_length", dims.head_dim]
    b.output("logits", np.float32, ["batch_size", "sequence_length", dims.vocab])
    for i in range(dims.layers):
        b.output(f"present.{i}.key", dtype, present_shape)
        b.output(f"present.{i}.value", dtype, present_shape)
    path = b.save(out_dir, OPSETS)
    return GraphInfo(
        path=path,
        num_nodes=len(b.nodes),
        num_layers=dims.layers,
        num_kv_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab,
        kv_dtype="float16" if dtype == np.float16 else "float32",
        weights=weights,
        op_counts=b.op_counts(),
        quantization=_quantization_record(e),
    )


def _channel_scales(
    e: _Emitter, model: nn.Module, holding, calibration_ids, given: ChannelScales | None, say
) -> None:
    """Activation-aware channel scales: the given ones, or calibrated for an int4 graph
    when the recipe asks for them. An int4 base brings its own (or none): never recalibrated."""
    if e.int4 is not None:
        if given is not None and given is not e.int4.channel_scales:
            raise ValueError(
                "channel_scales given, but the int4 base holds codes made with its own scales; "
                "export it without channel_scales"
            )
        if e.int4.channel_scales is None:
            e.scales_skipped = f"the int4 base has none ({e.int4.info.scales_skipped})"
            return
        e.use_channel_scales(e.int4.channel_scales, len(model.model.layers), fold_rows=False)
        return
    if given is not None:
        reason = channel_scales.unsupported(model)
        if reason is None and e.bnb4 is not None:
            reason = f"{e.weights} graphs keep bitsandbytes' own codes, which cannot be scaled"
        if reason is not None:
            raise ValueError(f"channel_scales given, but {reason}")
        e.use_channel_scales(given, len(model.model.layers))
        return
    if e.weights != "int4" or not e.quantization.activation_aware:
        return
    reason = channel_scales.unsupported(model)
    if reason is None and calibration_ids is None:
        reason = "no tokenizer for the calibration text"
    if reason is None and int(calibration_ids.max()) >= model.get_input_embeddings().num_embeddings:
        reason = "the tokenizer's ids exceed the model's vocabulary"
    if reason is not None:
        e.scales_skipped = reason
        say(f"int4 without activation-aware channel scales: {reason}")
        return
    scales = channel_scales.calibrate(
        model,
        calibration_ids,
        lambda name: _weight(model, name),
        e.rounding,
        holding=holding,
        progress=say,
    )
    e.use_channel_scales(scales, len(model.model.layers))


def _quantization_record(e: _Emitter) -> dict | None:
    """The manifest's `quantization` entry, with the channel scales applied (or why not)."""
    if not e.bits_of:
        return None
    record = quantization_record(e.quantization, e.bits_of)
    if e.accuracy_level_int8 != e.accuracy_level and 8 in e.bits_of.values():
        record["accuracy_level_int8"] = e.accuracy_level_int8  # criteria.py reads it too
    if e.int4 is not None:  # verify judges such a graph like fp32 (criteria.py "int4 exact")
        record["codes"] = "base"
        record["requantized"] = sorted(e.requantized)
    if e.channel_scales is not None:
        record["activation_scales"] = e.channel_scales.record()
    elif e.scales_skipped:
        record["activation_scales"] = {"skipped": e.scales_skipped}
    return record
