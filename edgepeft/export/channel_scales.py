"""Activation-aware channel scales for int4 exports (AWQ: Lin et al., 2023, arXiv 2306.00978).

A few input channels of each linear carry most of the activation energy; rounding the
weight columns that read them costs the most output error. Scaling those columns up by s
before rounding, and the input down by s, keeps the function and gives them a finer grid:

    calibration text (data/calibration/declaration-1776.txt) ─ tokenizer ─► ids (1, T)
    embed ─► for each decoder layer (one layer's weights held at a time, as the export does):
        hooks record the input X (T, K) of each group of linears sharing that input
            q|k|v  (after input_layernorm)   gate|up (after post_attention_layernorm)
            down   (act(gate) * up)
        per group, for alpha in ALPHAS:  s = rms(X)^alpha (geometric mean 1)
            error(alpha) = Σ_members ‖(W − Q(W·s)/s) Xᵀ‖²     Q: the export's own rounding
        keep the least error; alpha 0 (no scaling) is a candidate, so a group is never
        made worse on the calibration text
        ─► the layer's output feeds the next layer (fp32 activations, as AWQ calibrates)
    ─► ChannelScales {group: s}

How the fused graph realizes a group's s (fused.py), exact before rounding:
    folded     norm γ / s, member columns · s; for down: up_proj rows / s     no extra node
    explicit   Mul(x, 1/s) before the base MatMulNBits, member columns · s   a separate-mode
               adapter on the group keeps reading the unscaled x, so adapter files need no change

Only int4 graphs of the families in SUPPORTED_MODEL_TYPES are scaled (RMSNorm γ multiplies
directly; gemma's (1 + γ) and phi3's packed checkpoint are left for later, and say so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

CALIBRATION_FILE = (
    Path(__file__).resolve().parent.parent / "data" / "calibration" / "declaration-1776.txt"
)
"""The shipped calibration text: the Declaration of Independence (1776, public domain)."""
CALIBRATION_TOKENS = 1024
"""Tokens of calibration text per export (SmolLM2-135M: 1024 gave the measured gain)."""
ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
"""Exponents tried for s = rms(x)^alpha (scripts/measure_int4.py --only awq measured these)."""
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

Rounding = Callable[["ScaleGroup", str, np.ndarray], np.ndarray]
"""(group, member name, (out, in) fp32 weight) -> that weight as the export will store it,
dequantized (the group tells whether the member is packed with its siblings)."""


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one input, and the module that produces that input."""

    key: str
    """The group's name: "model.layers.3.self_attn.qkv", ".mlp.gate_up" or ".mlp.down"."""
    members: tuple[str, ...]
    """Full module names of the linears that read the input (their columns are scaled by s)."""
    source: str
    """The RMSNorm whose γ, or the linear whose rows, make the input (divided by s when folded)."""
    source_is_norm: bool
    packed: tuple[str, ...] = ()
    """Packed module names that hold members or the source (…qkv_proj, …gate_up_proj)."""


def layer_groups(i: int) -> tuple[ScaleGroup, ...]:
    """The three groups of decoder layer i (llama-style names)."""
    p = f"model.layers.{i}"
    return (
        ScaleGroup(
            f"{p}.self_attn.qkv",
            tuple(f"{p}.self_attn.{m}_proj" for m in "qkv"),
            f"{p}.input_layernorm",
            True,
            (f"{p}.self_attn.qkv_proj",),
        ),
        ScaleGroup(
            f"{p}.mlp.gate_up",
            (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
            f"{p}.post_attention_layernorm",
            True,
            (f"{p}.mlp.gate_up_proj",),
        ),
        ScaleGroup(
            f"{p}.mlp.down",
            (f"{p}.mlp.down_proj",),
            f"{p}.mlp.up_proj",
            False,
            (f"{p}.mlp.gate_up_proj",),
        ),
    )


@dataclass(frozen=True)
class ChannelScales:
    """The calibrated s of every group (float32, one per input channel)."""

    scales: Mapping[str, np.ndarray]
    """ScaleGroup.key -> s (K,); groups whose best alpha was 0 are left out."""
    alphas: Mapping[str, float]
    """ScaleGroup.key -> the chosen alpha, every group."""
    tokens: int

    def record(self) -> dict:
        """The manifest's `quantization.activation_scales` entry."""
        alphas = list(self.alphas.values())
        return {
            "method": "awq",
            "calibration": CALIBRATION_FILE.name,
            "calibration_tokens": self.tokens,
            "groups": len(alphas),
            "scaled_groups": len(self.scales),
            "mean_alpha": round(float(np.mean(alphas)), 4) if alphas else 0.0,
        }


def calibration_ids(tokenizer, text: str | None = None, max_tokens: int = CALIBRATION_TOKENS):
    """(1, T) int64 token ids of the calibration text, or None without a tokenizer."""
    if tokenizer is None:
        return None
    text = CALIBRATION_FILE.read_text(encoding="utf-8") if text is None else text
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise ValueError(f"calibration text gives {len(ids)} tokens; channel scales need >= 16")
    return np.asarray([ids], dtype=np.int64)


def unsupported(model: nn.Module) -> str | None:
    """Why `model` gets no channel scales, or None."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"{model_type} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    return None


def best_scale(
    group: ScaleGroup,
    weights: Mapping[str, np.ndarray],
    inputs: torch.Tensor,
    rounding: Rounding,
) -> tuple[float, np.ndarray]:
    """(alpha, s) of least output error for one group; inputs is (T, K) fp32."""
    x = inputs.to(torch.float32)
    rms = x.pow(2).mean(0).sqrt().clamp_min(1e-8).numpy().astype(np.float64)
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHAS:
        s = rms**alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # geometric centre at 1
        error = 0.0
        for name in group.members:
            w = weights[name]
            rounded = rounding(group, name, w * s) / s
            delta = torch.from_numpy((w - rounded).astype(np.float32))
            error += float((delta @ x.T).pow(2).sum())
        if best is None or error < best[0]:
            best = (error, alpha, s)
    return best[1], best[2]


def _causal_mask(t: int) -> torch.Tensor:
    """(1, 1, T, T) additive mask: eager attention needs it (None there means no mask)."""
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None]


@contextlib.contextmanager
def _recording(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Each named module's last input, flattened to (tokens, in_features)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def keep(module, args, name=name):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(keep))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    ids: np.ndarray,
    weight_of: Callable[[str], torch.Tensor],
    rounding: Rounding,
    *,
    holding: Callable[..., contextlib.AbstractContextManager] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChannelScales:
    """Channel scales of every decoder layer of a llama-style `model`.

    Args:
        model: The model the graph is built from (a streamed skeleton too).
        ids: (1, T) calibration token ids (`calibration_ids`).
        weight_of: Module name -> its (out, in) fp32 weight (the exporter's reader).
        rounding: The export's own rounding of a weight (`Rounding`).
        holding: The stream's `holding(prefix)` when `model` is a skeleton.
        progress: One line per layer.
    """
    hold = holding or (lambda *prefixes: contextlib.nullcontext())
    say = progress or (lambda line: None)
    decoder = model.model
    tokens = torch.as_tensor(ids, dtype=torch.long)
    with hold("model.embed_tokens"):
        hidden = decoder.embed_tokens(tokens).to(torch.float32)
    positions = torch.arange(tokens.shape[1])[None]
    rope = decoder.rotary_emb(hidden, positions)
    mask = _causal_mask(tokens.shape[1])
    scales: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    num_layers = len(decoder.layers)
    for i in range(num_layers):
        say(f"channel scales: layer {i + 1}/{num_layers}")
        groups = layer_groups(i)
        with hold(f"model.layers.{i}"):
            readers = [g.members[0] for g in groups]
            with _recording(model, readers) as seen:
                out = decoder.layers[i](
                    hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope
                )
            hidden = out[0] if isinstance(out, tuple) else out
            if not torch.isfinite(hidden).all():
                raise ValueError(
                    f"channel scales: layer {i} gave NaN or inf activations on the calibration "
                    "text; export with activation_aware=False (--no-activation-aware)"
                )
            for group in groups:
                weights = {
                    n: weight_of(n).detach().to(torch.float32).numpy() for n in group.members
                }
                alpha, s = best_scale(group, weights, seen[group.members[0]], rounding)
                alphas[group.key] = alpha
                if alpha:
                    scales[group.key] = s
    return ChannelScales(scales, alphas, int(tokens.shape[1]))
