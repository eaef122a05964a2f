"""Error-compensating int4 rounding (GPTQ, Frantar et al. 2022, arXiv 2210.17323) for MatMulNBits.

An experiment of scripts/measure_int4.py, not (yet) an exporter option: on SmolLM2-135M's
off-grid copy, calibrated on 1024 tokens of another text, it measured +12.6% ppl (mixed,
q/k unpacked) against the exporter's search fit's +14.3%, and +11.0% against +10.6% with
q|k|v packed at int8: no clear gain over the fitted blocks at block 32.

Rounding each weight to its nearest grid point minimises the weight error; what matters is
the output error ||X W^T - X Q^T||^2 over real inputs X. With H = X^T X (in x in), GPTQ
rounds the input columns of W one at a time and spreads each column's rounding error over
the columns not yet rounded, in the proportions H^-1 gives, so the later columns absorb it:

    H + damp * mean(diag H) * I ──cholesky of its inverse (upper)──► U
    for each block of `block_size` input columns (MatMulNBits' block):
        scale, zero point   fitted to the block's current (already compensated) weights,
                            each column weighted by diag H (weights.search_blocks)
        for each column j:  q_j = round(w_j / s + z), clipped;   e_j = (w_j - (q_j - z) s) / U_jj
                            w_{j+1..} -= e_j U_{j, j+1..}       (within a lazy batch, the
                            rest of W once per batch)

The codes, scales and zero points are MatMulNBits' own (asymmetric, uint8 zero points), so
the graph is unchanged: only which grid point each weight gets differs. Columns no input
ever reaches (diag H = 0) are rounded plainly.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from edgepeft.export.weights import PackedNBits, check_block_size, pack_codes, search_blocks

DAMP = 0.01
"""Added to H's diagonal, as a share of its mean: keeps the inverse well conditioned."""
LAZY_COLUMNS = 128
"""Columns whose error updates are applied to the rest of W at once (GPTQ's lazy batch)."""


def input_moments(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X (float64) of a batch of layer inputs (..., in_features): add these up over
    the calibration batches to get a layer's H."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    return x.T @ x


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray | torch.Tensor,
    bits: int = 4,
    block_size: int = 32,
    *,
    damp: float = DAMP,
) -> PackedNBits:
    """(out, in) fp32 weight -> asymmetric MatMulNBits codes with compensated rounding.

    Args:
        weight: (out_features, in_features), as nn.Linear holds it.
        hessian: (in_features, in_features) X^T X of the layer's inputs (`input_moments`).
        bits: 4 or 8.
        block_size: Input features per scale and zero point (a power of two >= 16).
        damp: Share of mean(diag H) added to the diagonal.
    """
    check_block_size(block_size)
    w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).to(torch.float64).clone()
    n, k = w.shape
    h = torch.as_tensor(hessian).to(torch.float64).clone()
    if h.shape != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}) for a weight with {k} inputs, got {tuple(h.shape)}")
    if not torch.isfinite(h).all() or not torch.isfinite(w).all():
        raise ValueError("gptq_quantize: the weight or the input moments hold NaN or inf")
    k_blocks = -(-k // block_size)
    padded = k_blocks * block_size
    if padded != k:  # padding columns: no input, weight 0 (MatMulNBits pads with code 0)
        w = torch.nn.functional.pad(w, (0, padded - k))
        h = torch.nn.functional.pad(h, (0, padded - k, 0, padded - k))
    diagonal = torch.diagonal(h)
    dead = diagonal <= 0
    h[dead, dead] = 1
    importance = torch.diagonal(h).clone()
    importance[dead] = 0
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(padded, dtype=torch.float64)
    upper = _inverse_cholesky(h)

    # Column j of W is row j of wt: every step below reads and updates contiguous rows.
    wt = w.T.to(torch.float32).contiguous()  # (padded, n)
    upper = upper.to(torch.float32)
    codes = torch.zeros(padded, n, dtype=torch.float32)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zeros = np.zeros((n, k_blocks), dtype=np.float32)
    lazy = max(block_size, LAZY_COLUMNS // block_size * block_size)
    with _one_thread():
        _compensate(wt, upper, importance, codes, scales, zeros, bits, block_size, lazy)
    codes = codes.T
    codes[:, k:] = 0
    return PackedNBits(
        codes=pack_codes(codes.numpy().reshape(n, k_blocks, block_size), bits),
        scales=scales,
        zero_points=pack_codes(zeros.astype(np.uint8), bits),
        bits=bits,
        block_size=block_size,
        in_features=k,
    )


def _compensate(wt, upper, importance, codes, scales, zeros, bits: int, block_size: int, lazy: int):
    """GPTQ's column loop over wt (padded in, n), filling codes (in, n), scales and zeros."""
    qmax = (1 << bits) - 1
    padded, n = wt.shape
    for start in range(0, padded, lazy):
        end = min(start + lazy, padded)
        errors = torch.zeros(end - start, n, dtype=torch.float32)
        for j in range(start, end):
            if j % block_size == 0:  # this block's grid, from its compensated weights
                b = j // block_size
                block = wt[j : j + block_size].T.numpy()[:, None, :]
                column_weights = importance[j : j + block_size].to(torch.float32).numpy()[None]
                s, z, _ = search_blocks(
                    block, column_weights, bits, symmetric=False, integer_zeros=True
                )
                scales[:, b], zeros[:, b] = s[:, 0], z[:, 0]
                scale, zero = torch.from_numpy(s[:, 0]), torch.from_numpy(z[:, 0])
                inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
            column = wt[j]
            q = torch.clamp(_round_half_away(column * inverse + zero), 0, qmax)
            codes[j] = q
            error = (column - (q - zero) * scale) / upper[j, j]
            wt[j + 1 : end] -= upper[j, j + 1 : end, None] * error[None, :]
            errors[j - start] = error
        wt[end:] -= upper[start:end, end:].T @ errors


@contextlib.contextmanager
def _one_thread():
    """The column loop runs thousands of small ops: intra-op threads cost more than they
    give there (measured 30x slower on 2 busy cores), so it runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; more damping if H is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        extra = max(extra * 10, 1e-6 * float(torch.diagonal(h).mean()))
    raise ValueError("gptq_quantize: the input moments are not positive definite even damped")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Half away from zero, as onnxruntime's kernels (and weights.py) round."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)
