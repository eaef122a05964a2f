"""DoRA (Liu et al., 2024): LoRA with a learned per-output-channel magnitude.

    W' = m * (W + s B A) / ||W + s B A||_row        m: (out,), norms over the input dim

The norm is treated as a constant in backward (paper, section 4.3), as HF peft does.
Only `dequantized_weight` touches the base, so a 4-bit base works unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgepeft.base import dequantized_weight


def lora_weight(lora_A: torch.nn.Linear, lora_B: torch.nn.Linear) -> torch.Tensor:
    """B A as an (out, in) tensor."""
    return lora_B.weight @ lora_A.weight


def row_norm(weight: torch.Tensor, update: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output row, shape (out,)."""
    return torch.linalg.norm(weight + scaling * update, dim=1)


def initial_magnitude(base: torch.nn.Module, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """m at initialisation: the row norms of the adapted weight, so W' == W + s B A."""
    with torch.no_grad():
        weight = dequantized_weight(base).to(lora_A.weight.device)
        return row_norm(weight, lora_weight(lora_A, lora_B).float(), scaling)


def dora_extra(
    x: torch.Tensor,
    base_out: torch.Tensor | None,
    base: torch.nn.Module,
    lora_A,
    lora_B,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """What DoRA adds to the base output: (m/n - 1) * W x + (m/n) * s B A x.

    Args:
        x: The adapter input (after dropout).
        base_out: The base layer's output for this very `x`, or None to recompute
            W x (needed when dropout changed x).
    """
    weight = dequantized_weight(base).to(device=x.device, dtype=x.dtype)
    norm = row_norm(weight, lora_weight(lora_A, lora_B).detach().to(x.dtype), scaling).detach()
    scale = (magnitude / norm).view(1, -1)  # (1, out)
    if base_out is None:
        base_no_bias = F.linear(x, weight)
    else:
        bias = getattr(base, "bias", None)
        base_no_bias = base_out if bias is None else base_out - bias
    return (scale - 1) * base_no_bias + scale * lora_B(lora_A(x)) * scaling


def dora_delta(base: torch.nn.Module, lora_A, lora_B, magnitude: torch.Tensor, scaling: float):
    """W' - W in fp32, shape (out, in)."""
    weight = dequantized_weight(base)
    adapted = weight + scaling * lora_weight(lora_A, lora_B).detach().float().to(weight.device)
    scale = magnitude.detach().float().to(weight.device) / torch.linalg.norm(adapted, dim=1)
    return scale.unsqueeze(1) * adapted - weight
