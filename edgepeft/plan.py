"""Will it fit, and how fast? Memory and decode speed of an export on a device, from shapes.

    MODEL (folder or config.json) ──json + CONFIG_DEFAULTS──► ModelShape (no weights read,
                                    no transformers: the bare install plans)
    DEVICE ──edgepeft.devices.load_profile──► DeviceProfile (budget, bandwidth, efficiency)
        │
        ▼  per weight format, as the fused exporter stores it (export/fused.py, weights.py)
    file bytes     decoder linears: int4/int8 codes + fp32 scale per block (MatMulNBits),
                   nf4/fp4 codes + fp32 absmax per 64 (MatMulBnb4), or fp16/fp32 matrices;
                   embeddings fp32 (fp16), or, tied and int4/int8, one quantized table that
                   lm_head and the lookup share; lm_head fp32 for nf4; norms, rotary tables
        ▼  as onnxruntime holds them (accelerator "cpu" or "cuda")
    resident       cpu: MatMulNBits packs codes, scales and per-block sums (file + 2 x
                   scales); the external data file is memory-mapped, so lookup tables cost
                   only the pages decoding touches (Linux faults 64 KiB around each row)
                   cuda: every initializer copied to device memory
    + KV cache (2 x layers x kv_heads x head_dim x capacity, shared past/present buffer
      grown in steps of 256 like edgepeft.runtime) + activations (a prefill chunk's
      logits and layer temporaries) + adapters (LoRA r on every linear, fp32, each loaded)
    + runtime (process, libraries, CUDA context) ─► peak vs budget ─► fits, margin
    decode tok/s = efficiency x bandwidth / bytes read per token (weights + KV + adapter)
    recipe: a shipped recipe (edgepeft/data/recipes/*.toml) for this accelerator, first in
            the device's format preference that fits, with the longest context that fits

`--train` switches to edgepeft.train.memory (the training planner) on the device's
torch_device. The memory model was checked against onnxruntime 1.31 on x86-64 Linux
(scripts/bench_plan.py measures it: RSS and tok/s against these predictions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgepeft.devices import DeviceProfile, format_size, load_profile
from edgepeft.export.weights import DEFAULT_QUANTIZATION, WeightQuantization, weight_quantization

FORMATS = ("int4", "int8", "nf4", "fp16", "fp32")
"""Columns of the plan; fp4 is the size of nf4."""
_NBITS = {"int4": 4, "int8": 8}
BNB4_BLOCK = 64
"""bitsandbytes' 4-bit block (what load_base quantizes with, and MatMulBnb4 reads)."""
ROTARY_CACHE_LIMIT = 32768
"""Positions in the fused graphs' cos/sin tables (fused.ROTARY_CACHE_LIMIT)."""
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
EXTERNAL_THRESHOLD, ALIGNMENT = 1024, 4096
"""export/onnx_graph.py: initializers this large go to model.onnx.data, at aligned offsets."""
DEFAULT_CONTEXT = 2048
DEFAULT_PREFILL = 512

# Decoder families of export/fused.py (_ARCHS): (per-head q/k norms, Gemma's four norms).
FUSED_ARCHS = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (False, False),
    "qwen3": (True, False),
    "phi3": (False, False),
    "gemma2": (False, True),
    "gemma3_text": (True, True),
}
_UNTIED = {"tie_word_embeddings": False}
CONFIG_DEFAULTS: dict[str, dict] = {
    "llama": {**_UNTIED, "max_position_embeddings": 2048},
    "mistral": {**_UNTIED, "max_position_embeddings": 131072, "num_key_value_heads": 8},
    "qwen2": {**_UNTIED, "max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {
        **_UNTIED, "max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128
    },
    "phi3": {**_UNTIED, "max_position_embeddings": 4096},
    "gemma": {"max_position_embeddings": 8192, "num_key_value_heads": 16, "head_dim": 256},
    "gemma2": {"max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256},
    "gemma3_text": {"max_position_embeddings": 131072, "num_key_value_heads": 4, "head_dim": 256},
    "gpt2": {"n_positions": 1024},
}
"""Per model type, what transformers' config class fills in for keys the plan reads when
config.json leaves them out (a config saves only what differs from them in some versions);
tests/test_plan.py checks each against transformers."""


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a decoder, read from its config."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    gated_mlp: bool
    qk_norm: bool
    gemma_norms: bool
    rotary_half: int
    """rotary_dim / 2: columns of each cos/sin table."""
    rotary_tables: int
    """cos/sin table pairs (Gemma 3: one per layer type)."""
    fused: bool
    """The fused exporter builds this model type (else the estimate is of that layout)."""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int, bool]]:
        """(out, in, bias) of one decoder layer's projections, packed as the fused graph packs."""
        return [(n, k, bias) for _, n, k, bias in self.named_linears()]

    def named_linears(self) -> list[tuple[str, int, int, bool]]:
        """`linears` with each projection's module name within a layer, as the fused graph
        names it (mixed precision picks bits by name)."""
        h, i = self.hidden, self.intermediate
        mlp_in = ("mlp.gate_up_proj", 2 * i) if self.gated_mlp else ("mlp.up_proj", i)
        return [
            ("self_attn.qkv_proj", self.q_width + 2 * self.kv_width, h, self.qkv_bias),
            ("self_attn.o_proj", h, self.q_width, self.o_bias),
            (mlp_in[0], mlp_in[1], h, self.mlp_bias),
            ("mlp.down_proj", h, i, self.mlp_bias),
        ]

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B of rank `rank` on every linear layer but lm_head, all layers."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        if self.model_type == "phi3":  # qkv_proj and gate_up_proj are single modules
            per_layer = (h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h)
            return rank * per_layer * self.layers
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + (2 if self.gated_mlp else 1) * (h + i)
        per_layer += i + h  # down_proj
        return rank * per_layer * self.layers

    @property
    def parameters(self) -> int:
        linear = sum(o * k for o, k, _ in self.linears()) * self.layers
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return linear + embed


def read_config(model: str | os.PathLike | dict) -> dict:
    """The config of a model folder, a config.json, a dict or an HF config, as a dict.

    Standard library only (the bare install has no transformers): a file is read as JSON,
    an HF config object through its `to_dict()`.
    """
    if hasattr(model, "to_dict"):
        return model.to_dict()
    if isinstance(model, dict):
        return dict(model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json at {model}; pass a model folder or its config.json "
            "(the weights are not needed to plan)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_config(model: str | os.PathLike | dict):
    """An HF config (transformers) from a model folder, a config.json or a dict."""
    from transformers import AutoConfig

    data = read_config(model)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{model}: config has no model_type; cannot tell the architecture")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"{model}: transformers does not know model_type {model_type!r}: {e}") from e


def _value(c: dict, keys: tuple[str, ...], where: str, default=None):
    """The first of `keys` that `c` holds (HF and GPT-2 names), else `default`; ValueError
    naming the config and the key when there is neither."""
    for key in keys:
        if c.get(key) is not None:
            return c[key]
    if default is None:
        raise ValueError(f"{where}: config has no {' or '.join(keys)}; cannot plan without it")
    return default


def _rotary_factor(c: dict) -> float:
    """partial_rotary_factor: a key of its own, or inside rope_parameters (transformers 5)."""
    nested = (c.get("rope_parameters") or {}).get("partial_rotary_factor")
    return float(c.get("partial_rotary_factor") or nested or 1.0)


def _gemma3_layer_types(c: dict, layers: int) -> list[str]:
    """Gemma 3's layer types; derived, as transformers does, when the config leaves them out."""
    if c.get("layer_types"):
        return list(c["layer_types"])
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]


def model_shape(model, name: str = "") -> ModelShape:
    """The shape of a model folder, a config.json, a dict, or an HF config object.

    Keys config.json leaves out take the model type's CONFIG_DEFAULTS (what transformers'
    config class would fill in); no transformers needed.
    """
    data = read_config(model)
    where = name or (str(model) if isinstance(model, (str, os.PathLike)) else "model")
    text = data.get("text_config") or data  # a multimodal config: its decoder's part
    model_type = text.get("model_type") or data.get("model_type")
    if not model_type:
        raise ValueError(f"{where}: config has no model_type; cannot tell the architecture")
    c = {**CONFIG_DEFAULTS.get(model_type, {}), **{k: v for k, v in text.items() if v is not None}}
    hidden = _value(c, ("hidden_size", "n_embd"), where)
    heads = _value(c, ("num_attention_heads", "n_head"), where)
    layers = _value(c, ("num_hidden_layers", "n_layer"), where)
    head_dim = c.get("head_dim") or hidden // heads
    qk_norm, gemma = FUSED_ARCHS.get(model_type, (False, False))
    attention_bias = bool(c.get("attention_bias", False))
    gpt2 = model_type == "gpt2"
    # Gemma 3 keeps one cos/sin table pair per layer type (sliding and full attention).
    types = _gemma3_layer_types(c, layers) if model_type == "gemma3_text" else []
    if not name and isinstance(model, (str, os.PathLike)):
        name = str(model)
    return ModelShape(
        name=name or data.get("_name_or_path") or model_type,
        model_type=model_type,
        hidden=hidden,
        intermediate=_value(c, ("intermediate_size", "n_inner"), where, 4 * hidden),
        layers=layers,
        heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab=_value(c, ("vocab_size",), where),
        # True where the type is not in CONFIG_DEFAULTS: transformers' base-class default.
        tied=bool(data.get("tie_word_embeddings", c.get("tie_word_embeddings", True))),
        max_positions=c.get("max_position_embeddings") or c.get("n_positions"),
        qkv_bias=model_type == "qwen2" or attention_bias or gpt2,
        o_bias=attention_bias or gpt2,
        mlp_bias=bool(c.get("mlp_bias", False)) or gpt2,
        gated_mlp=not gpt2 and "intermediate_size" in c,
        qk_norm=qk_norm,
        gemma_norms=gemma,
        rotary_half=int(head_dim * _rotary_factor(c)) // 2,
        rotary_tables=max(len(set(types)), 1),
        fused=model_type in FUSED_ARCHS,
    )


# ---------------------------------------------------------------- weights as exported


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


def _nbits_tensors(n: int, k: int, bits: int, block: int, quantization: WeightQuantization) -> list[int]:
    """[codes, scales(, zero points)] bytes of one (n, k) MatMulNBits weight, fp32 scales."""
    blocks = math.ceil(k / block)
    tensors = [n * blocks * (block * bits // 8), n * blocks * 4]
    zero_points = quantization.zero_point_bytes(n, blocks, bits, float_bytes=4)
    return tensors + ([zero_points] if zero_points else [])


def _tensors(
    n: int, k: int, fmt: str, block: int, bits: int, quantization: WeightQuantization
) -> list[int]:
    """Initializer sizes of one (out=n, in=k) weight in `fmt`, as the fused graph stores it:
    codes and scales (MatMulNBits, `bits` per code, zero points if any; MatMulBnb4) or one."""
    if fmt in _NBITS:
        return _nbits_tensors(n, k, bits, block, quantization)
    if fmt in ("nf4", "fp4"):
        absmax = 4 * math.ceil(n * k / BNB4_BLOCK)
        return [n * k // 2, absmax]
    return [n * k * (2 if fmt == "fp16" else 4)]


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
    quantized = fmt in _NBITS
    layers, layer_scales, small = [], 0, []
    for i in range(shape.layers):
        for module, n, k, has_bias in shape.named_linears():
            bits = quantization.bits(fmt, f"model.layers.{i}.{module}", shape.layers) if quantized else 0
            tensors = _tensors(n, k, fmt, block_size, bits, quantization)
            layers += tensors
            layer_scales += tensors[1] if quantized else 0
            small += [n * dtype] if has_bias and i == 0 else []
    parts = [Part("decoder linears", sum(layers), layer_scales, quantized, tensors=tuple(layers))]
    v, h = shape.vocab, shape.hidden
    if quantized:
        # The table takes uint8 zero points even when float ones are asked for (the lookup
        # op reads only those).
        table = replace(quantization, float_zero_points=False)
        tensors = _nbits_tensors(v, h, quantization.bits(fmt, "lm_head", shape.layers), block_size, table)
        # Tied: one quantized table, lm_head's, that the lookup also reads row by row.
        parts.append(Part("lm_head", sum(tensors), tensors[1], True,
                          lookup_rows=v if shape.tied else 0, tensors=tuple(tensors)))  # fmt: skip
        if not shape.tied:
            parts.append(Part("embeddings", v * h * dtype, lookup_rows=v, tensors=(v * h * dtype,)))
    elif shape.tied:  # lm_head multiplies with the embedding table itself
        parts.append(Part("embeddings (= lm_head)", v * h * dtype, tensors=(v * h * dtype,)))
    else:
        # nf4/fp4 keep lm_head in fp32, as load_base leaves it unquantized.
        head = v * h * (4 if fmt in ("nf4", "fp4") else dtype)
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


# ---------------------------------------------------------------- the plan


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


@dataclass(frozen=True)
class Recipe:
    """A shipped export recipe and what it needs."""

    name: str
    path: str
    weights: str
    block_size: int
    accuracy_level: int
    mode: str
    max_context: int | None
    providers: tuple[str, ...]
    int4_method: str = "search"
    mixed_precision: bool = True

    @property
    def quantization(self) -> WeightQuantization:
        return weight_quantization(self.int4_method, self.mixed_precision)

    @property
    def accelerator(self) -> str:
        cuda = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        return "cuda" if any(p in cuda for p in self.providers) else "cpu"


@dataclass(frozen=True)
class Recommendation:
    recipe: Recipe | None
    max_context: int
    """Longest context that fits with the recipe (capped by the model's and the recipe's)."""
    plan: FormatPlan | None
    """The recipe's plan at the requested context, or at max_context when that is shorter."""
    reason: str

    def to_dict(self) -> dict:
        return {
            "recipe": asdict(self.recipe) if self.recipe else None,
            "max_context": self.max_context,
            "plan": self.plan.to_dict() if self.plan else None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    model: ModelShape
    device: DeviceProfile
    context: int
    prefill: int
    adapters: int
    rank: int
    formats: dict[str, FormatPlan]
    recommendation: Recommendation
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "device": self.device.to_dict(),
            "accelerator": self.device.accelerator,
            "context": self.context,
            "prefill": self.prefill,
            "adapters": self.adapters,
            "rank": self.rank,
            "formats": {k: v.to_dict() for k, v in self.formats.items()},
            "recommendation": self.recommendation.to_dict(),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return render(self)


def _capacity(shape: ModelShape, context: int) -> int:
    """KV positions the runtime allocates for `context` (grown in KV_STEP steps, capped)."""
    limit = shape.max_positions or context
    return min(-(-context // KV_STEP) * KV_STEP, max(limit, context))


def _kv_position_bytes(shape: ModelShape, fmt: str) -> int:
    return 2 * shape.layers * shape.kv_width * (2 if fmt == "fp16" else 4)


def _activations(shape: ModelShape, tokens: int, fmt: str) -> int:
    """One forward over `tokens` new tokens, batch 1: fp32 logits (B, T, V), one layer's
    temporaries (norm outputs, q;k;v, attention output, gate;up and its activation) and the
    attention scores (heads, T, T) onnxruntime's CPU GroupQueryAttention materializes."""
    a = 2 if fmt == "fp16" else 4
    per_token = 4 * shape.vocab
    per_token += (4 * shape.hidden + shape.q_width + 2 * shape.kv_width + 3 * shape.intermediate) * a
    return tokens * per_token + shape.heads * tokens * tokens * 4


def _touched(table: int, rows: int, tokens: int) -> int:
    """Resident bytes of a memory-mapped table after `tokens` distinct row lookups."""
    return int(min(table, tokens * max(table / rows, FAULT_AROUND)))


def step_seconds(shape: ModelShape) -> float:
    """A decode step's fixed cost: ~12 nodes per fused decoder layer and ~20 around them."""
    return STEP_OVERHEAD_S + PER_NODE_S * (20 + 12 * shape.layers)


def decode_tok_s(shape: ModelShape, device: DeviceProfile, bytes_read: float) -> float:
    """Predicted tok/s of a step reading `bytes_read` bytes."""
    return 1 / (step_seconds(shape) + bytes_read / (device.efficiency * device.bandwidth))


def _resident(part: Part, accelerator: str, tokens: int) -> int:
    """Bytes the runtime holds for one part after decoding `tokens` tokens."""
    if accelerator == "cuda":
        return part.file_bytes  # every initializer is copied to device memory
    if part.quantized:
        # MatMulNBits' packed copy (codes, scales, a sum per block) + the mapped file's
        # scales, which stay resident; the mapped codes only where a lookup reads them.
        size = part.file_bytes + 2 * part.scales
        if part.lookup_rows:
            size += _touched(part.file_bytes - part.scales, part.lookup_rows, tokens)
        return size
    if part.lookup_rows:
        return _touched(part.file_bytes, part.lookup_rows, tokens)
    return part.file_bytes


def _largest_linear(
    shape: ModelShape, fmt: str, block_size: int, quantization: WeightQuantization
) -> int:
    """Bytes of the largest decoder weight as stored (its bits as the export picks them)."""
    sizes = [
        sum(_tensors(n, k, fmt, block_size, quantization.bits(fmt, f"model.layers.{i}.{m}", shape.layers),
                     quantization))
        for i in range(shape.layers)
        for m, n, k, _ in shape.named_linears()
    ]  # fmt: skip
    return max(sizes, default=0)


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
    resident = sum(_resident(p, accelerator, context) for p in parts)
    capacity = _capacity(shape, context)
    kv_position = _kv_position_bytes(shape, fmt)
    kv = kv_position * capacity
    activations = max(_activations(shape, min(prefill, context), fmt), _activations(shape, 1, fmt))
    adapter_bytes = shape.lora_parameters(rank) * 4
    adapter_total = adapter_bytes * adapters
    load_peak = 0
    if accelerator == "cpu":
        # The largest MatMulNBits weight: its mapped file pages and its packed copy at once.
        load_peak = max(
            [p.file_bytes for p in parts if p.quantized and p.name == "lm_head"]
            + [_largest_linear(shape, fmt, block_size, quantization)]
        ) if fmt in _NBITS else 0  # fmt: skip
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
        block_size=block_size if fmt in _NBITS else (BNB4_BLOCK if fmt in ("nf4", "fp4") else 0),
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


# ---------------------------------------------------------------- recipes


def shipped_recipes(folder: str | os.PathLike | None = None) -> list[Recipe]:
    """Every recipe in `folder` (default: the shipped ones, edgepeft.export.api.RECIPES_DIR),
    read with edgepeft.export.api.load_recipe's checks."""
    from edgepeft.export.recipes import RECIPES_DIR, load_recipe

    recipes = []
    for path in sorted(Path(folder or RECIPES_DIR).glob("*.toml")):
        data = load_recipe(path)
        recipes.append(
            Recipe(
                name=path.stem,
                path=str(path),
                weights=data.get("weights", "int4"),
                block_size=data.get("block_size", 32),
                accuracy_level=data.get("accuracy_level", 4),
                mode=data.get("mode", "merged"),
                max_context=data.get("max_context"),
                providers=tuple(data.get("providers", ["CPUExecutionProvider"])),
                int4_method=data.get("int4_method", DEFAULT_QUANTIZATION.method),
                mixed_precision=data.get("mixed_precision", DEFAULT_QUANTIZATION.mixed),
            )
        )
    return recipes


def _largest_context(fits, low: int, high: int) -> int:
    """Largest context in [low, high] with fits(context), monotone; 0 when none."""
    if high < low or not fits(low):
        return 0
    while high - low > 1:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return high if fits(high) else low


def recommend(
    shape: ModelShape,
    device: DeviceProfile,
    *,
    context: int,
    prefill: int,
    adapters: int,
    rank: int,
    recipes: list[Recipe] | None = None,
) -> Recommendation:
    """The shipped recipe for the device's accelerator, earliest in its format preference,
    that fits at `context`; else the one that fits the longest context."""
    recipes = shipped_recipes() if recipes is None else recipes
    usable = [
        r for r in recipes
        if r.accelerator == device.accelerator and r.weights in device.weight_formats
    ]  # fmt: skip
    usable.sort(key=lambda r: device.weight_formats.index(r.weights))
    if not usable:
        return Recommendation(None, 0, None, f"no shipped recipe for a {device.accelerator} device "
                              f"with weights {list(device.weight_formats)}")  # fmt: skip
    limit = min(x for x in (shape.max_positions, context * 64, 1 << 20) if x)
    best: tuple[int, Recipe] | None = None
    for recipe in usable:
        cap = min(limit, recipe.max_context or limit)

        def plan_at(length: int, recipe=recipe) -> FormatPlan:
            return plan_format(
                shape, device, recipe.weights, context=length, prefill=prefill,
                adapters=adapters, rank=rank, block_size=recipe.block_size,
                accelerator=recipe.accelerator, quantization=recipe.quantization,
            )  # fmt: skip

        longest = _largest_context(lambda n, plan_at=plan_at: plan_at(n).fits, 1, cap)
        if longest >= min(context, cap) and longest > 0:
            at = min(context, longest)
            return Recommendation(recipe, longest, plan_at(at), "fits at the requested context")
        if longest and (best is None or longest > best[0]):
            best = (longest, recipe)
    if best is None:
        return Recommendation(None, 0, None, "no shipped recipe fits, even at a context of 1")
    longest, recipe = best
    fitted = plan_format(
        shape, device, recipe.weights, context=longest, prefill=prefill, adapters=adapters,
        rank=rank, block_size=recipe.block_size, accelerator=recipe.accelerator,
        quantization=recipe.quantization,
    )  # fmt: skip
    return Recommendation(
        recipe, longest, fitted, f"the requested context {context} does not fit; {longest} does"
    )


def plan(
    model,
    device: str | os.PathLike | DeviceProfile,
    *,
    context: int | None = None,
    prefill: int = DEFAULT_PREFILL,
    adapters: int = 0,
    rank: int = 16,
    weights: str | None = None,
    block_size: int = 32,
) -> Plan:
    """Plan `model` (folder, config.json, dict or config) on `device` (profile name or path).

    Args:
        context: Tokens per sequence (default: 2048, or the model's limit if shorter).
        prefill: Tokens fed at once when reading a prompt (their logits are the largest
            activation).
        adapters: Separate-mode LoRA adapters loaded at once; rank: their r.
        weights: One format to plan (default: all of FORMATS).
    """
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    profile = load_profile(device)
    context = context or min(DEFAULT_CONTEXT, shape.max_positions or DEFAULT_CONTEXT)
    notes = []
    if shape.max_positions and context > shape.max_positions:
        raise ValueError(
            f"context {context} exceeds the model's {shape.max_positions} positions; "
            f"pass --context {shape.max_positions} or less"
        )
    if not shape.fused:
        notes.append(
            f"model_type {shape.model_type!r} has no fused graph: the generic exporter's "
            "layout differs, these figures are the fused layout's"
        )
    if profile.bandwidth_kind == "peak":
        notes.append(
            f"decode speed from the vendor's peak bandwidth x efficiency {profile.efficiency:g} "
            "(an estimate; `local` is measured and calibrated by scripts/bench_plan.py)"
        )
    formats = (weights,) if weights else FORMATS
    settings = dict(context=context, prefill=prefill, adapters=adapters, rank=rank)
    plans = {
        fmt: plan_format(shape, profile, fmt, block_size=block_size, **settings) for fmt in formats
    }
    return Plan(
        model=shape,
        device=profile,
        context=context,
        prefill=min(prefill, context),
        adapters=adapters,
        rank=rank,
        formats=plans,
        recommendation=recommend(shape, profile, **settings),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------- output


def _gb(n: float) -> str:
    return format_size(n).replace(" ", "")


def render(p: Plan) -> str:
    d, m = p.device, p.model
    place = "GPU memory" if d.accelerator == "cuda" and d.memory_kind == "vram" else "memory"
    lines = [
        f"plan: {m.name} ({m.model_type}, {m.parameters / 1e6:,.0f}M parameters) on {d.name}",
        f"  device: {d.description}",
        f"  budget {_gb(d.budget)} of {_gb(d.memory)} {place} ({_gb(d.reserved)} reserved); "
        f"{d.bandwidth / 1e9:.1f} GB/s {d.bandwidth_kind} x efficiency {d.efficiency:g}; "
        f"runs on {d.accelerator}",
        f"  context {p.context}, prefill {p.prefill} tokens, "
        + (f"{p.adapters} LoRA adapter(s) r={p.rank} (separate mode)" if p.adapters else "no adapters"),
        "",
    ]
    cols = list(p.formats.values())
    rows = [
        ("model file", lambda f: _gb(f.data_file_bytes)),
        ("weights in memory", lambda f: _gb(f.weights_resident)),
        (f"KV cache ({p.context})", lambda f: _gb(f.kv_cache)),
        ("activations", lambda f: _gb(f.activations)),
        ("adapters", lambda f: _gb(f.adapters)),
        ("runtime", lambda f: _gb(f.runtime)),
        ("peak", lambda f: _gb(f.total)),
        ("fits", lambda f: ("yes" if f.fits else "NO") + f" ({'+' if f.fits else '-'}{_gb(abs(f.margin))})"),
        ("decode tok/s", lambda f: f"{f.tok_s_start:,.1f}"),
        (f"  at {p.context}", lambda f: f"{f.tok_s_full:,.1f}"),
    ]
    width = max(len(label) for label, _ in rows)
    cells = [[fn(f) for f in cols] for _, fn in rows]
    col_w = [max(len(f.weights), *(len(r[i]) for r in cells)) for i, f in enumerate(cols)]
    lines.append(" " * (width + 2) + "  ".join(f.weights.rjust(w) for f, w in zip(cols, col_w, strict=True)))
    for (label, _), row in zip(rows, cells, strict=True):
        lines.append(f"{label:<{width}}  " + "  ".join(c.rjust(w) for c, w in zip(row, col_w, strict=True)))
    rec = p.recommendation
    lines.append("")
    if rec.recipe is None:
        lines.append(f"recommended: nothing ({rec.reason})")
    else:
        r = rec.recipe
        block = f", block {r.block_size}" if r.weights in _NBITS else ""
        lines.append(
            f"recommended: {r.name} ({r.weights}{block}, {r.mode}, max context "
            f"{rec.max_context}, providers "
            f"{', '.join(x.removesuffix('ExecutionProvider') for x in r.providers)}): {rec.reason}"
        )
        if p.adapters and r.mode != "separate":
            lines.append(
                f"  with --mode separate: the {p.adapters} adapter(s) switch per request on one "
                "base (the recipe's other settings stand)"
            )
        if rec.plan is not None:
            lines.append(
                f"  peak {_gb(rec.plan.total)} of {_gb(rec.plan.budget)}, "
                f"~{rec.plan.tok_s_start:,.1f} tok/s"
            )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- training


def plan_training(
    model,
    device: str | os.PathLike | DeviceProfile,
    *,
    seq_len: int,
    batch_size: int = 1,
    rank: int = 16,
    quant: str = "nf4",
    optimizer: str = "adamw",
    checkpointing: bool = False,
) -> dict:
    """The training planner (edgepeft.train.memory) on the device's torch_device and budget."""
    from edgepeft.config import LoraConfig
    from edgepeft.train.memory import estimate_memory, largest_fit

    profile = load_profile(device)
    config = model if hasattr(model, "to_dict") else load_config(model)
    args = dict(
        quant=quant,
        adapter_config=LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"),
        optimizer=optimizer,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        precision="auto",
        device=profile.torch_device,
    )
    estimate = estimate_memory(config, **args)
    fit = largest_fit(config, **args, max_memory=profile.budget)
    return {
        "device": profile.name,
        "torch_device": profile.torch_device,
        "budget": profile.budget,
        "settings": {k: v for k, v in args.items() if k != "adapter_config"} | {"rank": rank},
        "estimate": asdict(estimate),
        "fits": estimate.total <= profile.budget,
        "margin": profile.budget - estimate.total,
        "largest_batch_size": fit.batch_size,
        "largest_seq_len": fit.seq_len,
        "text": str(estimate),
    }


def render_training(result: dict, model: str) -> str:
    s = result["settings"]
    verdict = "fits" if result["fits"] else "does NOT fit"
    return "\n".join([
        f"training plan: {model} on {result['device']} ({result['torch_device']}, "
        f"budget {_gb(result['budget'])})",
        f"  LoRA r={s['rank']} on all linear layers over a {s['quant']} base, batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, {s['optimizer']}, checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}",
        "",
        result["text"],
        "",
        f"{verdict} ({'+' if result['fits'] else '-'}{_gb(abs(result['margin']))}); largest batch "
        f"at {s['seq_len']} tokens: {result['largest_batch_size']}, longest sequence at batch "
        f"{s['batch_size']}: {result['largest_seq_len']}",
    ])  # fmt: skip


# ---------------------------------------------------------------- CLI


def add_parser(commands) -> None:
    """`edgepeft plan --model MODEL --device PROFILE [...]`: will it fit, how fast."""
    parser = commands.add_parser(
        "plan",
        help="memory and decode speed of a model on a device profile; the recipe to use",
        description="Plan a model (a folder or just its config.json: no weights needed) on a "
        "device profile (a shipped or user profile's name, 'local' for this machine, or a "
        ".toml path): memory per weight format as the exporter stores it, KV cache, activations, adapters, "
        "runtime; predicted decode tok/s; whether it fits and the export recipe to use. "
        "--train plans a training run instead.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL", help="model folder or config.json")
    parser.add_argument("--device", required=True, metavar="PROFILE", help="profile name or .toml path")
    parser.add_argument("--context", type=int, metavar="L", help="tokens per sequence (default 2048)")
    parser.add_argument("--adapters", type=int, default=0, metavar="N", help="LoRA adapters loaded")
    parser.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    parser.add_argument("--weights", choices=FORMATS, help="plan one weight format only")
    parser.add_argument("--block-size", type=int, default=32, metavar="N", help="int4/int8 block")
    parser.add_argument(
        "--prefill", type=int, default=DEFAULT_PREFILL, metavar="N",
        help=f"prompt tokens per forward (default {DEFAULT_PREFILL})",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    train = parser.add_argument_group("training (--train)")
    train.add_argument("--train", action="store_true", help="plan training on the device instead")
    train.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    train.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int8", "none"))
    train.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "adamw8bit", "paged_adamw8bit")
    )
    train.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.train:
        shape = model_shape(args.model)
        seq_len = args.context or min(512, shape.max_positions or 512)
        result = plan_training(
            args.model, args.device, seq_len=seq_len, batch_size=args.batch, rank=args.rank,
            quant=args.quant, optimizer=args.optimizer, checkpointing=args.checkpointing,
        )  # fmt: skip
        print(json.dumps(result, indent=2) if args.json else render_training(result, args.model))
        return 0
    result = plan(
        args.model,
        args.device,
        context=args.context,
        prefill=args.prefill,
        adapters=args.adapters,
        rank=args.rank,
        weights=args.weights,
        block_size=args.block_size,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


__all__ = [
    "CONFIG_DEFAULTS",
    "FORMATS",
    "FormatPlan",
    "ModelShape",
    "Plan",
    "Recipe",
    "Recommendation",
    "add_parser",
    "data_file_bytes",
    "file_bytes",
    "model_shape",
    "plan",
    "plan_format",
    "plan_training",
    "read_config",
    "recommend",
    "shipped_recipes",
    "weight_parts",
]
