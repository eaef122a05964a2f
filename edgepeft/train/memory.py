"""Will a training step fit? Peak memory from shapes, before any weight is loaded.

    model config ──meta model (free)──► base bytes per quant   (inspect_model.estimate_base_bytes,
        │                                  int4: int4_base.estimate_bytes)
        │                               trainable params        (adapter_cost, or all for full FT)
        ▼
    per token, per decoder layer:       what autograd saves for backward (see _layer_saved)
        ▼
    peak = weights + adapter + optimizer state            (live all step)
         + max( saved activations + loss peak             backward starts
                activations | grads + one layer's work    backward runs through the layers
                grads + optimizer temporaries )           optimizer step
        ▼
    MemoryEstimate ──check_fits / largest_fit──► "fits" or the largest batch / length that does

The activation model follows a Llama-style decoder (RMSNorm, rotary attention through
SDPA's flash kernels, gated MLP) as transformers 5 runs it in training, with
`use_cache=False`. It counts what autograd keeps: a frozen linear keeps only its
weight, so over a frozen base only the inputs of adapted layers are saved; the loss
is edgepeft.train's (`loss.token_loss_sum`). Numbers were checked against `measure_peak`
on CPU, on tiny models (tests/test_train_memory.py) and on SmolLM2-135M
(tests/test_train_memory_real.py, scripts/bench_train.py --real); other
architectures and adapter methods other than LoRA/DoRA and full fine-tuning use the
same model and are estimates.

`measure_peak(fn)`, the meter that checks these numbers, is train/meter.py (its names
are importable from here too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from edgepeft import int4_base
from edgepeft.adapters import method_for
from edgepeft.adapters.targets import pattern_value, select_configured
from edgepeft.architectures import DecoderShape
from edgepeft.base import is_linear_like, linear_features
from edgepeft.config import LoraConfig
from edgepeft.inspect_model import adapter_cost, estimate_base_bytes
from edgepeft.settings import format_size, parse_size
from edgepeft.train.meter import TensorPeak, live_tensor_bytes, measure_peak, process_overhead

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
ADAPTER_BYTES = FP32
"""edgepeft creates adapter parameters in fp32 whatever the base's compute dtype."""

_BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit state for tensors smaller than this (min_8bit_size)."""
_BNB_BLOCK = 256
"""Values per fp32 absmax in bitsandbytes' blockwise 8-bit optimizer state."""
_CUDA_WORKSPACE = 32 * 2**20
"""cuBLAS workspace PyTorch allocates through its caching allocator (CUBLAS_WORKSPACE_CONFIG
default on Hopper); not measured here, no CUDA device was available."""

# Where a linear layer of a Llama-style decoder layer takes its input from: layers
# sharing an input save it once. Names are the last part of the module path.
_INPUT_ROLES = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
    "c_attn": "attn_in", "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in", "c_fc": "mlp_in", "down_proj": "mlp_hidden",
}  # fmt: skip


class MemoryPlanError(RuntimeError):
    """A training configuration does not fit in the memory given."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step (forward, backward, optimizer step), in bytes.

    The components are sizes, not a sum: activations are freed before the optimizer
    step, so `total` is the persistent part plus the largest of the three phases.
    """

    base_weights: int
    """Frozen base as loaded (quantized linears + the rest in compute dtype); all weights
    for full fine-tuning."""
    adapter_weights: int
    gradients: int
    """One gradient per trainable parameter, in its dtype."""
    optimizer_state: int
    activations: int
    """Tensors autograd saves for backward; with checkpointing the layer inputs plus one
    layer recomputed."""
    logits: int
    """The loss's peak in backward: fp32 log-softmax and the (B, T, V) gradients of it and
    of the logits (the logits themselves are freed once the loss has its log-softmax)."""
    overhead: int
    """Short-lived buffers at the peak: gradients inside one layer's backward, a
    dequantized 4/8-bit weight, optimizer temporaries, CUDA workspace."""
    total: int
    """Peak bytes."""
    phase: str = ""
    """Which phase sets the peak: "backward start", "layer backward" or "optimizer step"."""

    def __str__(self) -> str:
        rows = [
            ("base weights", self.base_weights),
            ("adapter weights", self.adapter_weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("logits + loss", self.logits),
            ("work buffers", self.overhead),
        ]
        lines = [f"  {label:<16} {format_bytes(n):>10}" for label, n in rows]
        lines.append(f"  {'peak':<16} {format_bytes(self.total):>10}  (at {self.phase})")
        return "training memory (estimated):\n" + "\n".join(lines)


class Fit(NamedTuple):
    """Largest settings that fit; 0 when even 1 does not."""

    batch_size: int
    """At the given sequence length."""
    seq_len: int
    """At the given batch size."""


def format_bytes(n: int) -> str:
    """"1.50 GiB", "3.00 MiB", "12 B" (`edgepeft.settings.format_size`)."""
    return format_size(n)


# ---------------------------------------------------------------- parse


def parse_memory(value: str | int) -> int:
    """Bytes from 8GB (10^9), 8GiB / 8G (2^30), 512MiB, 1.5 GiB or a plain int.

    Raises:
        ValueError: not a size, or not positive.
    """
    nbytes = parse_size(value, "memory size")
    if nbytes == 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return nbytes


# ---------------------------------------------------------------- model facts


def _meta_model(config) -> nn.Module:
    """The model `config` describes, with no storage: shapes without cost."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _lora_saved(meta: nn.Module, config: LoraConfig, compute_bytes: int, cuda: bool) -> int:
    """Bytes per token, summed over all layers, that LoRA's layers make autograd keep."""
    config = method_for(config).resolve(meta, config)
    shared: dict[tuple[str, str], int] = {}  # (layer path, role) -> input width
    total = 0
    for name in select_configured(meta, config, what="memory estimate"):
        in_f, out_f = linear_features(meta.get_submodule(name))
        r = pattern_value(name, dict(config.rank_pattern), config.r)
        layer_path, _, leaf = name.rpartition(".")
        role = _INPUT_ROLES.get(leaf)
        total += r * ADAPTER_BYTES  # A's output, kept for B's gradient
        if config.use_dora:
            total += 2 * out_f * ADAPTER_BYTES  # W x and B A x, kept for the magnitude's gradient
        if config.dropout > 0:
            # A's own (dropped) input and dropout's mask: bool on CUDA, a float noise
            # tensor on CPU.
            total += in_f * (ADAPTER_BYTES + (1 if cuda else ADAPTER_BYTES))
        elif role is None or compute_bytes != ADAPTER_BYTES:
            # Unknown layers keep their own input; so do layers that cast it to the
            # adapter's fp32 (a copy when the base computes in bf16).
            total += in_f * ADAPTER_BYTES
        else:
            # Layers reading one tensor (q, k, v read the norm's output) keep it once.
            shared[(layer_path.rsplit(".", 1)[0], role)] = in_f
    return total + sum(shared.values()) * compute_bytes


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class _Plan:
    """Everything that does not depend on batch size or sequence length."""

    shape: DecoderShape
    compute_bytes: int
    full: bool
    adapter_saved: int
    """Bytes per token over all layers that the adapter makes autograd keep."""
    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer_state: int
    optimizer_work: int
    dequant_buffer: int
    device_work: int


def _precision_bytes(precision: str, device: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        # load_base's default: fp32 on CPU, bf16 on CUDA.
        return 2 if torch.device(device).type == "cuda" else FP32
    return _DTYPE_BYTES[precision]


def _optimizer_bytes(sizes: list[int], param_bytes: int, optimizer: str) -> int:
    if optimizer == "adamw":
        return sum(2 * n * param_bytes for n in sizes)  # exp_avg and exp_avg_sq
    total = 0
    for n in sizes:
        if n < _BNB_MIN_8BIT_SIZE:
            total += 2 * n * FP32
        else:  # two uint8 states, each with one fp32 absmax per block
            total += 2 * (n + FP32 * math.ceil(n / _BNB_BLOCK))
    return total


def _optimizer_work(sizes: list[int], param_bytes: int, optimizer: str, device: str) -> int:
    """Temporaries of one optimizer step."""
    if optimizer != "adamw" or not sizes:
        return 0  # bitsandbytes updates in one fused kernel
    if torch.device(device).type == "cuda":
        return sum(sizes) * param_bytes  # foreach AdamW: sqrt(exp_avg_sq) of every tensor
    # CPU runs AdamW tensor by tensor: sqrt(v) and its scaled copy of the largest tensor.
    return 2 * max(sizes) * param_bytes


def _plan(model_config, quant, adapter_config, optimizer, precision, device, double_quant) -> _Plan:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    config = getattr(model_config, "config", model_config)
    compute_bytes = _precision_bytes(precision, device)
    meta = _meta_model(config)
    shape = DecoderShape.from_config(config)
    full = adapter_config is None
    if full and quant != "none":
        raise ValueError(
            f"full fine-tuning (adapter_config=None) trains every weight, but quant={quant!r} "
            "freezes the base in 4/8 bits; use quant='none' or pass an adapter config"
        )
    if quant == "int4":
        base = int4_base.estimate_bytes(meta, compute_bytes)
    else:
        base = estimate_base_bytes(meta, quant, double_quant, compute_bytes)
    if full:
        sizes = [p.numel() for p in meta.parameters()]
        param_bytes, adapter, adapter_saved = compute_bytes, 0, 0
    else:
        count = adapter_cost(meta, adapter_config)
        if count is None:
            raise ValueError(
                f"no architecture defaults for {config.model_type!r}: name target_modules in "
                f"the {type(adapter_config).__name__} to estimate its memory"
            )
        sizes, param_bytes = [count], ADAPTER_BYTES
        adapter = count * ADAPTER_BYTES
        adapter_saved = 0
        if isinstance(adapter_config, LoraConfig):
            adapter_saved = _lora_saved(
                meta, adapter_config, compute_bytes, torch.device(device).type == "cuda"
            )
    dequant = 0
    if quant != "none":
        # bitsandbytes dequantizes one weight at a time, in forward and again in backward;
        # Int4Linear too, through its uint8 codes unpacked and an fp32 matrix (+ a cast).
        per_weight = compute_bytes
        if quant == "int4":
            per_weight = 1 + FP32 + (compute_bytes if compute_bytes != FP32 else 0)
        dequant = max(
            (m.weight.numel() for n, m in meta.named_modules()
             if is_linear_like(m) and not n.endswith("lm_head")),
            default=0,
        ) * per_weight  # fmt: skip
    return _Plan(
        shape=shape,
        compute_bytes=compute_bytes,
        full=full,
        adapter_saved=adapter_saved,
        base_weights=base,
        adapter_weights=adapter,
        gradients=sum(sizes) * param_bytes,
        optimizer_state=_optimizer_bytes(sizes, param_bytes, optimizer),
        optimizer_work=_optimizer_work(sizes, param_bytes, optimizer, device),
        dequant_buffer=dequant,
        device_work=_CUDA_WORKSPACE if torch.device(device).type == "cuda" else 0,
    )


def _layer_saved(plan: _Plan, padding: bool) -> int:
    """Bytes one decoder layer saves for backward, per token (adapters: a layer's share).

    RMSNorm keeps its input in fp32 and 1/rms; attention keeps rotated q and k, v, its
    output and the fp32 log-sum-exp (flash kernels: no T x T matrix); the gated MLP
    keeps gate, act(gate) and up. A frozen linear keeps nothing per token (only its
    weight), so a layer's input is kept only when a trainable layer reads it. With a
    padding mask transformers repeats k and v to every query head (and SDPA keeps the
    mask as floats: see `_estimate`).
    """
    s, sh = plan.compute_bytes, plan.shape
    attn_width = sh.heads * sh.head_dim
    kv_width = attn_width if padding else sh.kv_heads * sh.head_dim
    norms = 2 * (FP32 * sh.hidden + FP32)
    attention = (2 * attn_width + 2 * kv_width) * s + sh.heads * FP32
    mlp = (3 if sh.gated_mlp else 2) * sh.intermediate * s
    if plan.full:
        # Every linear's input, and each norm's normalized input for its weight's gradient.
        inputs = (2 * sh.hidden + attn_width + sh.intermediate + 2 * sh.hidden) * s
    else:
        inputs = math.ceil(plan.adapter_saved / max(sh.layers, 1))
    return norms + attention + mlp + inputs


def _final_saved(plan: _Plan) -> int:
    """Per token: the final norm's input (and, when trained, the head's input)."""
    extra = 2 * plan.shape.hidden * plan.compute_bytes if plan.full else 0
    return FP32 * plan.shape.hidden + FP32 + extra


def _estimate(
    plan: _Plan, batch_size: int, seq_len: int, checkpointing: bool, padding: bool
) -> MemoryEstimate:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    sh, s = plan.shape, plan.compute_bytes
    tokens = batch_size * seq_len
    layer = _layer_saved(plan, padding) * tokens
    if padding:
        layer += batch_size * seq_len * seq_len * s  # SDPA's float copy of the (B, 1, T, T) mask
    final = _final_saved(plan) * tokens
    # With checkpointing only layer inputs stay; backward recomputes one layer at a time.
    inputs_kept = sh.hidden * s * tokens * sh.layers
    kept = inputs_kept + layer if checkpointing else layer * sh.layers
    activations = kept + final
    # edgepeft.train's loss (loop.token_loss_sum) keeps the fp32 log-softmax and drops the
    # model output when it returns, so no logits are held through backward. The loss's
    # backward then holds log-softmax, its gradient and the logits' fp32 gradient at once.
    # With a vocabulary 85x the hidden size (SmolLM2) that is the step's peak; holding a
    # fourth copy made the plan 22% high there.
    logits_peak = 3 * tokens * sh.vocab * FP32
    # Inside one layer's backward: gradients of a few (B, T, I) and (B, T, H) tensors.
    layer_work = tokens * (2 * sh.intermediate + 2 * sh.hidden) * s + plan.dequant_buffer
    if checkpointing:
        through_layers = kept + plan.gradients
    else:
        through_layers = max(layer * sh.layers, plan.gradients) + final
    phases = {
        "backward start": (inputs_kept if checkpointing else kept) + final + logits_peak,
        "layer backward": through_layers + layer_work,
        "optimizer step": plan.gradients + plan.optimizer_work,
    }
    phase = max(phases, key=phases.get)
    persistent = plan.base_weights + plan.adapter_weights + plan.optimizer_state
    return MemoryEstimate(
        base_weights=plan.base_weights,
        adapter_weights=plan.adapter_weights,
        gradients=plan.gradients,
        optimizer_state=plan.optimizer_state,
        activations=activations,
        logits=logits_peak,
        overhead=max(layer_work, plan.optimizer_work) + plan.device_work,
        total=persistent + phases[phase] + plan.device_work,
        phase=phase,
    )


def estimate_memory(
    model_config,
    *,
    quant: str,
    adapter_config,
    optimizer: str = "adamw",
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
    device: str = "cpu",
    double_quant: bool = True,
    padding: bool = True,
) -> MemoryEstimate:
    """Peak memory of one training step, from the model's config alone.

    Args:
        model_config: An HF `PretrainedConfig`, or a model (its `.config` is read).
        quant: The base's quantization as `load_base` takes it ("nf4", "fp4", "int8", "int4",
            "none").
        adapter_config: An adapter config (LoraConfig, ...); None means full fine-tuning.
        optimizer: "adamw" (torch), "adamw8bit" or "paged_adamw8bit" (bitsandbytes).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (padded length).
        gradient_checkpointing: Recompute each layer in backward instead of keeping it.
        precision: Compute dtype of activations and unquantized weights; "auto" is
            load_base's choice for `device` (fp32 on CPU, bf16 on CUDA).
        device: "cpu" or "cuda".
        double_quant: 4-bit statistics quantized too (load_base's default).
        padding: Batches carry padding and its attention mask (texts of unequal
            length): attention then keeps a float copy of the mask per layer and key/value
            heads repeated to every query head. False for equal-length or packed batches.
    """
    plan = _plan(model_config, quant, adapter_config, optimizer, precision, device, double_quant)
    return _estimate(plan, batch_size, seq_len, gradient_checkpointing, padding)


def _largest(fits: Callable[[int], bool], cap: int) -> int:
    """Largest n in [1, cap] with fits(n), for monotone `fits`; 0 when none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


_MAX_BATCH = 1 << 20


def _fit(
    plan: _Plan, batch_size: int, seq_len: int, checkpointing: bool, padding: bool, budget: int
) -> Fit:
    def fits(b: int, t: int) -> bool:
        return _estimate(plan, b, t, checkpointing, padding).total <= budget

    return Fit(
        batch_size=_largest(lambda b: fits(b, seq_len), _MAX_BATCH),
        seq_len=_largest(lambda t: fits(batch_size, t), plan.shape.max_positions or _MAX_BATCH),
    )


def largest_fit(
    model_config,
    *,
    quant: str,
    adapter_config,
    optimizer: str = "adamw",
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
    device: str = "cpu",
    double_quant: bool = True,
    padding: bool = True,
    max_memory: str | int,
) -> Fit:
    """The largest batch at `seq_len`, and the largest length at `batch_size`, that fit.

    Lengths stop at the model's max_position_embeddings when it has one.
    """
    budget = parse_memory(max_memory)
    plan = _plan(model_config, quant, adapter_config, optimizer, precision, device, double_quant)
    return _fit(plan, batch_size, seq_len, gradient_checkpointing, padding, budget)


def check_fits(
    model_config,
    *,
    quant: str,
    adapter_config,
    optimizer: str = "adamw",
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
    device: str = "cpu",
    double_quant: bool = True,
    padding: bool = True,
    max_memory: str | int,
) -> MemoryEstimate:
    """The estimate when it fits in `max_memory`; else MemoryPlanError.

    `max_memory` is a budget for the step's live tensors (weights, optimizer state,
    activations, gradients: `estimate.total`, what `TensorPeak` measures and a run
    reports as its tensor peak), not for the whole process: the process's own overhead
    (Python, libraries, allocator caching; on CPU a 4-bit load's freed fp32 pages) does
    not scale with the training settings. The error names the largest batch size and
    sequence length that fit, what to change, and that overhead as this process holds it
    now (`process_overhead`), so the memory the process needs as a whole is plain too.
    """
    budget = parse_memory(max_memory)
    plan = _plan(model_config, quant, adapter_config, optimizer, precision, device, double_quant)
    estimate = _estimate(plan, batch_size, seq_len, gradient_checkpointing, padding)
    if estimate.total <= budget:
        return estimate
    fit = _fit(plan, batch_size, seq_len, gradient_checkpointing, padding, budget)
    asked = f"batch_size={batch_size}, seq_len={seq_len}"
    if fit.batch_size == 0 and fit.seq_len == 0:
        hint = "even batch 1 does not fit at these lengths"
    else:
        hint = (
            f"at seq_len={seq_len} the largest batch_size that fits is {fit.batch_size}; "
            f"at batch_size={batch_size} the largest seq_len that fits is {fit.seq_len}"
        )
    savers = []
    if not gradient_checkpointing:
        savers.append("gradient_checkpointing=True")
    if optimizer == "adamw":
        savers.append("optimizer='adamw8bit'")
    if quant == "none" and adapter_config is not None:
        savers.append("quant='nf4'")
    more = f"; or try {', '.join(savers)}" if savers else ""
    overhead = process_overhead(device)
    held = (
        "RSS minus live tensors: Python, libraries, freed pages kept"
        if torch.device(device).type == "cpu"
        else "cached by the CUDA allocator; the CUDA context comes on top"
    )
    raise MemoryPlanError(
        f"training with {asked} needs about {format_bytes(estimate.total)} of live tensors at "
        f"its peak ({estimate.phase}), but max_memory is {format_bytes(budget)} (a budget for "
        f"tensors): {hint}{more}.\nBesides tensors this process holds "
        f"{format_bytes(overhead)} now ({held}), so the run "
        f"needs at least {format_bytes(estimate.total + overhead)} in all.\n{estimate}"
    )


__all__ = [
    "Fit",
    "MemoryEstimate",
    "MemoryPlanError",
    "TensorPeak",
    "check_fits",
    "estimate_memory",
    "format_bytes",
    "largest_fit",
    "live_tensor_bytes",
    "measure_peak",
    "parse_memory",
    "process_overhead",
]
