"""What a base model is and what each adapter method would cost on it, from shapes alone.

    HF folder / hub id ──load_base(quant="none", cpu)──► model
        │ config            model_type, sizes, heads
        │ linear layers     (name, in, out), grouped by suffix
        ▼
    architectures.py defaults ──► per-method target modules
        ▼
    analytic counts   LoRA r·(in+out) per target, IA3 in|out, prompts N·d, ...
    memory estimate   quantized linears: codes + absmax / row scales; the rest in compute dtype
        ▼
    InspectReport  (str() for `edgepeft inspect`, to_dict() for JSON)

No adapter is instantiated: counts come from module shapes and the config, so the
report works for every method whether or not its implementation is loaded. The
tests check each count against `edgepeft.count_parameters` for registered methods.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from edgepeft.adapters.p_tuning import encoder_parameter_count
from edgepeft.adapters.targets import select_modules, suffix_match
from edgepeft.architectures import Architecture, DecoderShape, architecture_of
from edgepeft.base import fingerprint, is_linear_like, linear_features, load_base
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
    UniPELTConfig,
    config_to_dict,
)
from edgepeft.settings import format_size

FP32_BYTES = 4

# The layers load_base keeps unquantized by default; read from its signature so the
# estimate follows the loader if that default ever changes.
_SKIP_MODULES: tuple[str, ...] = inspect.signature(load_base).parameters["skip_modules"].default

# bitsandbytes 4-bit storage (see bitsandbytes.functional.quantize_4bit).
_BLOCK_4BIT = 64
"""Weights per absmax block."""
_CODE_4BIT = 16
"""fp32 entries of the 4-bit code table kept with every layer."""
_BLOCK_NESTED = 256
"""absmax values per block of the second (double) quantization."""
_CODE_NESTED = 256
"""fp32 entries of the 8-bit code table of the nested quantization, per layer."""

METHOD_ROWS: tuple[tuple[str, Any], ...] = (
    ("LoRA r=4", LoraConfig(r=4)),
    ("LoRA r=8", LoraConfig(r=8)),
    ("LoRA r=16", LoraConfig(r=16)),
    ("LoRA r=64", LoraConfig(r=64)),
    ("LoRA r=4 all-linear", LoraConfig(r=4, target_modules="all-linear")),
    ("LoRA r=8 all-linear", LoraConfig(r=8, target_modules="all-linear")),
    ("LoRA r=16 all-linear", LoraConfig(r=16, target_modules="all-linear")),
    ("LoRA r=64 all-linear", LoraConfig(r=64, target_modules="all-linear")),
    ("DoRA r=8", LoraConfig(r=8, use_dora=True)),
    ("IA3", IA3Config()),
    ("prompt tuning 20 tokens", PromptTuningConfig(num_virtual_tokens=20)),
    ("prefix tuning 20 tokens", PrefixTuningConfig(num_virtual_tokens=20)),
    ("bottleneck pfeiffer rf=16", BottleneckConfig(style="pfeiffer", reduction_factor=16)),
    ("bottleneck houlsby rf=16", BottleneckConfig(style="houlsby", reduction_factor=16)),
    ("BitFit", SelectiveConfig.bitfit()),
)
"""The report's method table: (label, the config it stands for, with default targets)."""


@dataclass(frozen=True)
class LinearGroup:
    """Quantizable linear layers sharing a name suffix (and shape) across decoder layers."""

    suffix: str
    count: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class MethodCost:
    label: str
    peft_type: str
    config: dict
    """The config as `config_to_dict` writes it (targets still None = architecture default)."""
    trainable_params: int | None
    """None when the method needs architecture defaults edgepeft does not have."""
    file_bytes: int | None
    """Tensor bytes of the saved adapter in fp32 (the safetensors header adds ~100 B per tensor)."""
    note: str = ""


@dataclass(frozen=True)
class BaseMemory:
    """The base's weights in memory under one quantization (not a training step's peak:
    that is `edgepeft.train.memory.MemoryEstimate`)."""

    quant: str
    double_quant: bool
    bytes_fp32_compute: int
    """Unquantized parts (embeddings, norms, lm_head, biases) in fp32, as load_base does on CPU."""
    bytes_bf16_compute: int
    """The same with bf16 compute, load_base's default on a bf16-capable GPU."""


MemoryEstimate = BaseMemory
"""The old name of `BaseMemory`."""


@dataclass(frozen=True)
class InspectReport:
    name_or_path: str
    model_type: str
    architecture: str
    fingerprint: str
    parameters: int
    hidden_size: int
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    quantizable_linears: int
    linear_groups: tuple[LinearGroup, ...]
    default_targets: tuple[tuple[str, str], ...]
    """(what, value) pairs from architectures.py; empty when the model type is not in it."""
    methods: tuple[MethodCost, ...]
    memory: tuple[BaseMemory, ...]

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        out = asdict(self)
        out["default_targets"] = dict(self.default_targets)
        return out

    def __str__(self) -> str:
        lines = [
            f"{self.name_or_path}",
            f"  {self.architecture} (model_type {self.model_type}), fingerprint {self.fingerprint}",
            f"  {_count(self.parameters)} parameters; hidden {self.hidden_size}, "
            f"{self.layers} layers, {self.attention_heads} heads / {self.kv_heads} kv heads "
            f"(head_dim {self.head_dim}), vocab {self.vocab_size}"
            + (", tied embeddings" if self.tied_embeddings else ""),
            "",
            f"quantizable linear layers: {self.quantizable_linears}",
        ]
        width = max((len(g.suffix) for g in self.linear_groups), default=0)
        lines += [
            f"  {g.suffix:<{width}} x {g.count}   ({g.in_features} -> {g.out_features})"
            for g in self.linear_groups
        ]
        lines += ["", "default targets:"]
        if self.default_targets:
            width = max(len(k) for k, _ in self.default_targets)
            lines += [f"  {k:<{width}}  {v}" for k, v in self.default_targets]
        else:
            lines.append(f"  none: {self.model_type!r} is not in edgepeft's table; name targets")
        lines += ["", "adapter cost (trainable params, fp32 adapter file):"]
        width = max(len(m.label) for m in self.methods)
        for m in self.methods:
            if m.trainable_params is None:
                cost = "n/a"
            else:
                share = 100 * m.trainable_params / self.parameters
                cost = f"{m.trainable_params:>11,}  {share:7.3f}%  {_size(m.file_bytes):>10}"
            lines.append(f"  {m.label:<{width}}  {cost}" + (f"  ({m.note})" if m.note else ""))
        lines += ["", "base weights in memory (estimated from shapes):"]
        lines.append(f"  {'quant':<16}  {'fp32 compute':>12}  {'bf16 compute':>12}")
        for e in self.memory:
            label = e.quant + (" +double-quant" if e.double_quant else "")
            lines.append(
                f"  {label:<16}  {_size(e.bytes_fp32_compute):>12}  {_size(e.bytes_bf16_compute):>12}"
            )
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else format_size(nbytes, decimals=1)


# ---------------------------------------------------------------- model facts


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters already yields a tied tensor once, under its first name.
    return list(model.named_parameters())


def _linear_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear-like layer, lm_head included."""
    return [(n, *linear_features(m)) for n, m in model.named_modules() if is_linear_like(m)]


def _skipped(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in _SKIP_MODULES)


def _group_suffix(name: str, layers_pattern: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (names outside the layer list stay)."""
    match = re.search(rf"(?:^|\.){re.escape(layers_pattern)}\.\d+\.(.+)$", name)
    return match.group(1) if match else name


def _group_linears(
    linears: list[tuple[str, int, int]], layers_pattern: str
) -> tuple[LinearGroup, ...]:
    groups: dict[tuple[str, int, int], int] = {}
    for name, in_f, out_f in linears:
        key = (_group_suffix(name, layers_pattern), in_f, out_f)
        groups[key] = groups.get(key, 0) + 1
    return tuple(LinearGroup(s, n, i, o) for (s, i, o), n in groups.items())


# ---------------------------------------------------------------- adapter counts


def _lora_cost(model: nn.Module, config: LoraConfig, arch: Architecture | None) -> int:
    targets = config.target_modules
    if targets is None:
        targets = arch.lora_targets
    features = {n: (i, o) for n, i, o in _linear_layers(model)}
    total = 0
    for name in select_modules(model, targets, what="inspect"):
        in_f, out_f = features[name]
        total += config.r * (in_f + out_f)  # A (r, in) + B (out, r)
        if config.use_dora:
            total += out_f  # magnitude, one per output channel
    return total


def _ia3_cost(model: nn.Module, arch: Architecture) -> int:
    features = {n: (i, o) for n, i, o in _linear_layers(model)}
    total = 0
    for name in select_modules(model, arch.ia3_targets, what="inspect"):
        in_f, out_f = features[name]
        feedforward = any(suffix_match(name, f) for f in arch.ia3_feedforward)
        total += in_f if feedforward else out_f  # input or output rescaled
    return total


def _prefix_cost(config, num_virtual_tokens: int) -> int:
    # One key and one value prefix per layer, at the KV width (peft's GQA rule).
    dims = DecoderShape.from_config(config)
    return num_virtual_tokens * dims.layers * 2 * dims.kv_heads * dims.head_dim


def _bottleneck_cost(model: nn.Module, config: BottleneckConfig, arch: Architecture) -> int:
    outputs = (
        (arch.ffn_output,)
        if config.style == "pfeiffer"
        else (
            arch.attention_output,
            arch.ffn_output,
        )
    )
    features = {n: (i, o) for n, i, o in _linear_layers(model)}
    total = 0
    for name in select_modules(model, outputs, what="inspect"):
        hidden = features[name][1]
        width = hidden // config.reduction_factor
        total += hidden * width + width + width * hidden + hidden  # down and up, with biases
    return total


def _parallel_cost(model: nn.Module, config) -> int:
    """A parallel adapter (ParallelAdapterConfig, MAM's FFN part): down and up with biases."""
    dims = DecoderShape.from_config(model.config)
    width = dims.hidden // config.reduction_factor
    return dims.layers * (2 * dims.hidden * width + width + dims.hidden)


def _mam_cost(model: nn.Module, config: MAMConfig) -> int:
    """What trains: the prefix's embedding and MLP (N * L*2*kv_dim once saved) and the
    parallel adapter."""
    dims = DecoderShape.from_config(model.config)
    kv, hidden, n = dims.kv_heads * dims.head_dim, config.prefix_bottleneck, config.num_virtual_tokens
    out = dims.layers * 2 * kv
    prefix = n * kv + kv * hidden + hidden + hidden * out + out
    return prefix + _parallel_cost(model, config)


def _unipelt_cost(model: nn.Module, config: UniPELTConfig, arch: Architecture) -> int:
    """What trains: MAM's prefix (embedding and MLP) with one gate (hidden + 1) per layer,
    gated LoRA r·(in+out) + in + 1 per target, and a gated bottleneck per layer."""
    dims = DecoderShape.from_config(model.config)
    kv = dims.kv_heads * dims.head_dim
    width, n = config.prefix_bottleneck, config.num_virtual_tokens
    out = dims.layers * 2 * kv
    prefix = n * kv + kv * width + width + width * out + out + dims.layers * (dims.hidden + 1)
    features = {name: (i, o) for name, i, o in _linear_layers(model)}
    lora = 0
    for name in select_modules(model, config.lora_targets or arch.lora_targets, what="inspect"):
        in_f, out_f = features[name]
        lora += config.r * (in_f + out_f) + in_f + 1  # A, B and the gate
    bottleneck = 0
    for name in select_modules(model, (arch.ffn_output,), what="inspect"):
        hidden = features[name][1]
        w = hidden // config.reduction_factor
        bottleneck += 2 * hidden * w + w + hidden + hidden + 1  # down, up, the gate
    return prefix + lora + bottleneck


def _selective_cost(model: nn.Module, config: SelectiveConfig) -> int:
    return sum(
        p.numel()
        for n, p in _unique_parameters(model)
        if any(re.search(pattern, n) for pattern in config.patterns)
    )


def adapter_cost(model: nn.Module, config) -> int | None:
    """Trainable parameters `config` would add to `model`, from shapes; None without defaults.

    Args:
        model: An unadapted base (any quantization; shapes are read, not weights).
        config: One of the adapter configs; targets None means the architecture default.
    """
    arch = architecture_of(model.config.model_type)
    if isinstance(config, LoraConfig):
        if config.target_modules is None and arch is None:
            return None
        return _lora_cost(model, config, arch)
    if isinstance(config, IA3Config):
        return None if arch is None else _ia3_cost(model, arch)
    if isinstance(config, PromptTuningConfig):
        return config.num_virtual_tokens * model.get_input_embeddings().embedding_dim
    if isinstance(config, PromptEncoderConfig):  # the encoder while it trains; N*d once saved
        return encoder_parameter_count(config, model.get_input_embeddings().embedding_dim)
    if isinstance(config, PrefixTuningConfig):
        return _prefix_cost(model.config, config.num_virtual_tokens)
    if isinstance(config, BottleneckConfig):
        return None if arch is None else _bottleneck_cost(model, config, arch)
    if isinstance(config, ParallelAdapterConfig):
        return _parallel_cost(model, config)
    if isinstance(config, MAMConfig):
        return _mam_cost(model, config)
    if isinstance(config, UniPELTConfig):
        return None if arch is None else _unipelt_cost(model, config, arch)
    if isinstance(config, SelectiveConfig):
        return _selective_cost(model, config)
    raise TypeError(f"no cost model for {type(config).__name__}")


def _method_costs(model: nn.Module) -> tuple[MethodCost, ...]:
    rows = []
    for label, config in METHOD_ROWS:
        count = adapter_cost(model, config)
        note = ""
        if count is None:
            note = "no architecture defaults; name target modules"
        elif count == 0:
            note = "the base has no such parameters"
        rows.append(
            MethodCost(
                label=label,
                peft_type=config.peft_type,
                config=config_to_dict(config),
                trainable_params=count,
                file_bytes=None if count is None else count * FP32_BYTES,
                note=note,
            )
        )
    return tuple(rows)


def _default_targets(arch: Architecture | None) -> tuple[tuple[str, str], ...]:
    if arch is None:
        return ()
    return (
        ("LoRA / DoRA targets", ", ".join(arch.lora_targets)),
        ("IA3 targets", ", ".join(arch.ia3_targets)),
        ("IA3 feedforward", ", ".join(arch.ia3_feedforward)),
        ("bottleneck pfeiffer", f"after {arch.ffn_output}"),
        ("bottleneck houlsby", f"after {arch.attention_output} and {arch.ffn_output}"),
    )


# ---------------------------------------------------------------- memory


def _quantized_weight_bytes(in_f: int, out_f: int, quant: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized (out, in) weight, statistics included."""
    n = in_f * out_f
    if quant == "int8":
        return n + FP32_BYTES * out_f  # int8 codes + one fp32 absmax scale per row
    blocks = math.ceil(n / _BLOCK_4BIT)
    nbytes = math.ceil(n / 2) + FP32_BYTES * _CODE_4BIT  # two codes per byte
    if double_quant:
        # absmax stored as uint8 codes, themselves scaled per 256 blocks, + offset and code table.
        nested = math.ceil(blocks / _BLOCK_NESTED)
        return nbytes + blocks + FP32_BYTES * (nested + 1 + _CODE_NESTED)
    return nbytes + FP32_BYTES * blocks


def estimate_base_bytes(
    model: nn.Module, quant: str, double_quant: bool = True, compute_bytes: int = FP32_BYTES
) -> int:
    """Bytes of the base's weights once `load_base(quant=...)` has quantized it.

    Linear layers other than load_base's skip_modules hold quantized weights; their
    biases, every other parameter and floating buffers take `compute_bytes` each.

    Args:
        model: The unquantized base (quantized layers would report packed sizes).
    """
    quantized = {}
    if quant != "none":
        quantized = {
            name: module
            for name, module in model.named_modules()
            if is_linear_like(module) and not _skipped(name)
        }
    weights = {id(m.weight) for m in quantized.values()}
    total = sum(
        p.numel() * compute_bytes for _, p in _unique_parameters(model) if id(p) not in weights
    )
    for module in quantized.values():
        in_f, out_f = linear_features(module)
        total += _quantized_weight_bytes(in_f, out_f, quant, double_quant)
    # Buffers (rotary frequencies, scales) follow the compute dtype when floating.
    total += sum(
        b.numel() * (compute_bytes if b.is_floating_point() else b.element_size())
        for b in model.buffers()
    )
    return total


def _memory(model: nn.Module) -> tuple[BaseMemory, ...]:
    settings = (("nf4", True), ("nf4", False), ("int8", False), ("none", False))
    return tuple(
        BaseMemory(
            quant=q,
            double_quant=dq,
            bytes_fp32_compute=estimate_base_bytes(model, q, dq, FP32_BYTES),
            bytes_bf16_compute=estimate_base_bytes(model, q, dq, 2),
        )
        for q, dq in settings
    )


# ---------------------------------------------------------------- entry point


def inspect_loaded(model: nn.Module, name_or_path: str = "") -> InspectReport:
    """The report for an already loaded, unadapted and unquantized base.

    Quantized layers pack their codes, so parameter counts and the memory estimate
    need the unquantized model.
    """
    config = model.config
    dims = DecoderShape.from_config(config)
    arch = architecture_of(config.model_type)
    layers_pattern = arch.layers_pattern if arch else "layers"
    quantizable = [(n, i, o) for n, i, o in _linear_layers(model) if not _skipped(n)]
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    info = getattr(model, "edgepeft_base", None)
    return InspectReport(
        name_or_path=name_or_path or (info.name_or_path if info else ""),
        model_type=config.model_type,
        architecture=type(model).__name__,
        fingerprint=fingerprint(model),
        parameters=sum(p.numel() for _, p in _unique_parameters(model)),
        hidden_size=dims.hidden,
        layers=dims.layers,
        attention_heads=dims.heads,
        kv_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab,
        tied_embeddings=output_emb is not None and output_emb.weight is input_emb.weight,
        quantizable_linears=len(quantizable),
        linear_groups=_group_linears(quantizable, layers_pattern),
        default_targets=_default_targets(arch),
        methods=_method_costs(model),
        memory=_memory(model),
    )


def inspect_model(name_or_path: str | os.PathLike) -> InspectReport:
    """Load a base unquantized on CPU and report its shape, defaults and adapter costs.

    Args:
        name_or_path: Local HF model folder (safetensors) or hub id.
    """
    model, _ = load_base(name_or_path, quant="none", device="cpu")
    return inspect_loaded(model, str(name_or_path))
