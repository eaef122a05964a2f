"""A KV prefix seeded into a decoder graph's cache: which positions each row's tokens take.

    KVPrefix (kv_prefix.py): past_key_values.{l}.key/.value (1, H, N, D), rotary.{l}.inv_freq
         │
         ▼  seed_past: per row b, broadcast and (if needed) rotate keys by Δ_b positions
    graph(input_ids (B,T), attention_mask [1 x N | mask], past_key_values = prefix)

    the runtime     seed_past(..., positions="unpadded") in its own decode loop (runtime/decode.py)
    export verify   prefill_with_prefix / decode_step: a plain session.run reference, either frame

Positions, the crux. Row b of a left-padded batch (p_b pads, token j of the padded row)
can place its tokens in two frames, the `positions` option of seed_past / prefill_with_prefix:

    "unpadded"  N + j - p_b      the text directly follows the virtual tokens, as in training
                                 and at batch 1: a prompt's output does not depend on which
                                 prompts share its batch (what the runtime uses)
    "peft"      HF peft's batched reference (edgepeft's PyTorch hooks match peft to 0.0),
                under `generate` (position_ids = cumsum(mask) - 1); verify compares with it
        prefix tuning   N + cumsum(mask) - 1 = N + j - p_b   pads not counted (= "unpadded")
        prompt tuning   column index N + j   peft drops position_ids; virtual tokens at
                                             0..N-1, then the pads, then the text

Prefix keys are used as learned (they act as rotated by position 0); prompt keys are cached
at 0..N-1. The graphs place token j of row b at

    fused   N + j          GroupQueryAttention rotates by column; past keys are used as given,
                           new keys rotated before they are cached (checked by the tests)
    generic N + j - p_b    position_ids = cumsum([1 x N | mask]) - 1

RoPE scores depend only on (query position - key position), so a cached key that stands at
position a in PyTorch must be rotated by Δ_b = (graph position - PyTorch position) of the
row's tokens:

                    positions="peft"   positions="unpadded"
    fused   prefix      p_b                 p_b
    fused   prompt      0                   p_b
    generic prefix      0                   0
    generic prompt      -p_b                0

A row without padding (batch 1, the usual edge case) always has Δ = 0: plain broadcast.
Learned absolute positions (GPT-2) cannot be shifted in a cache: there "peft" seeds a
prompt only into unpadded rows (a padded row's tokens sit at other absolute positions in
peft), while "unpadded" needs no shift on a generic graph and takes any padding.

GroupQueryAttention refuses T > 1 new tokens over a non-empty past at batch > 1, so a fused
prefill runs row by row (each at batch 1 with its own padding, which reproduces what a batched
prefill would compute) and the presents are stacked; decode steps then run batched.

Numpy only (sessions are passed in): the torch-free device runtime seeds prefixes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgepeft.artifacts.kv_prefix import KVPrefix

GRAPH_KINDS = ("fused", "generic")
POSITIONS = ("peft", "unpadded")
"""Frames a padded row's tokens can take (module docstring): HF peft's batched semantics, or
the text right after the virtual tokens, as at batch 1 (batch-invariant)."""


def _rotate(keys: np.ndarray, inv_freq: np.ndarray, shift: int) -> np.ndarray:
    """Keys (..., D) turned by `shift` positions (rotate-half RoPE on the first 2*len(inv_freq))."""
    half = inv_freq.shape[0]
    angle = shift * inv_freq.astype(np.float64)  # (half,)
    cos, sin = np.cos(angle), np.sin(angle)
    x1 = keys[..., :half].astype(np.float64)
    x2 = keys[..., half : 2 * half].astype(np.float64)
    out = keys.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


def _shifts(prefix: KVPrefix, attention_mask: np.ndarray, graph: str, positions: str) -> np.ndarray:
    """Δ_b per row: graph position minus PyTorch position of the row's tokens."""
    if graph not in GRAPH_KINDS:
        raise ValueError(
            f"graph must be one of {GRAPH_KINDS} (the manifest's 'graph'), got {graph!r}"
        )
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    pads = (attention_mask == 0).sum(axis=1).astype(np.int64)  # (B,) left pads per row
    # Prefix tuning's peft frame already skips pads: both frames are the unpadded one.
    unpadded = positions == "unpadded" or prefix.method == "prefix"
    if graph == "fused":
        return pads if unpadded else np.zeros_like(pads)
    return np.zeros_like(pads) if unpadded else -pads


def seed_past(
    prefix: KVPrefix,
    attention_mask: np.ndarray,
    graph: str,
    dtype=np.float32,
    *,
    positions: str = "peft",
) -> dict[str, np.ndarray]:
    """past_key_values feeds (B, n_kv, N, head_dim) holding the prefix for every row.

    Args:
        prefix: The adapter's prefix (`read_kv_prefix_file`).
        attention_mask: The caller's (B, T) mask, left padded, without the virtual tokens.
        graph: "fused" or "generic": how the graph positions tokens (module docstring).
        dtype: The graph's KV dtype.
        positions: "peft" (default): a padded row as HF peft computes it in a batch (prompt
            tuning: the pads sit between the virtual tokens and the text), what verify
            compares with; "unpadded": each row's text directly follows the virtual tokens,
            so a row's output equals the same prompt alone at batch 1 (the runtime's).
            Prefix tuning gives the same in both.

    Raises:
        ValueError: an unknown graph or positions, or a padded prompt-tuned row in the
            "peft" frame on a graph with learned absolute positions (GPT-2, generic).
    """
    shifts = _shifts(prefix, np.asarray(attention_mask), graph, positions)
    batch = len(shifts)
    feeds = {}
    for i in range(prefix.num_layers):
        keys = np.repeat(prefix.keys[i], batch, axis=0)  # (B, n_kv, N, D)
        inv_freq = prefix.inv_freq[i]
        if shifts.any():
            if inv_freq is None:
                raise ValueError(
                    f"adapter {prefix.adapter!r} ({prefix.method} tuning) on a {graph} graph with "
                    "learned absolute positions: a left-padded row's tokens would need other "
                    "positions than the graph gives them (peft counts a row's pads in its "
                    "prompt-tuned positions), which a cache prefix cannot express; feed such "
                    "rows one at a time without padding, or seed with positions='unpadded' "
                    "(each row as if alone, the batch-invariant frame)"
                )
            for b in np.flatnonzero(shifts):
                keys[b] = _rotate(keys[b], inv_freq, int(shifts[b]))
        feeds[f"past_key_values.{i}.key"] = keys.astype(dtype)
        feeds[f"past_key_values.{i}.value"] = np.repeat(prefix.values[i], batch, axis=0).astype(
            dtype
        )
    return feeds


@dataclass(frozen=True)
class DecodeState:
    """What the next step feeds: the full mask so far and the presents as pasts."""

    attention_mask: np.ndarray
    """(B, N + tokens so far)."""
    past: dict[str, np.ndarray]


def _kv_dtype(session) -> type:
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            return np.float16 if meta.type == "tensor(float16)" else np.float32
    raise ValueError("the session has no past_key_values inputs: is it an edgepeft decoder graph?")


def _run(session, feed: dict, run_options=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feed, run_options), strict=True))
    past = {
        n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n != "logits"
    }
    return out["logits"], past


def prefill_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    positions: str = "peft",
    run_options=None,
) -> tuple[np.ndarray, DecodeState]:
    """Logits (B, T, V) of the prompt with the adapter's prefix seeded, and the decode state.

    `positions`: "peft" (HF peft's batched semantics) or "unpadded" (each row as if alone,
    batch-invariant); see `seed_past`. Decode steps keep the frame the prefill chose.
    `run_options`: onnxruntime RunOptions, e.g. with a hybrid adapter's (MAM's) other part
    active as an .onnx_adapter; the decode steps take the same.
    """
    input_ids, attention_mask = (
        np.asarray(input_ids, np.int64),
        np.asarray(attention_mask, np.int64),
    )
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must match "
            "(pass the caller's mask, without the virtual tokens)"
        )
    batch = len(input_ids)
    full_mask = np.concatenate(
        [np.ones((batch, prefix.num_virtual_tokens), np.int64), attention_mask], axis=1
    )  # (B, N + T)
    past = seed_past(prefix, attention_mask, graph, _kv_dtype(session), positions=positions)
    # GroupQueryAttention takes T > 1 over a past only at batch 1: one row at a time.
    row_by_row = graph == "fused" and input_ids.shape[1] > 1
    rows = [slice(b, b + 1) for b in range(batch)] if row_by_row else [slice(None)]
    results = [
        _run(
            session,
            {
                "input_ids": input_ids[r],
                "attention_mask": full_mask[r],
                **{k: v[r] for k, v in past.items()},
            },
            run_options,
        )
        for r in rows
    ]
    logits = np.concatenate([lg for lg, _ in results], axis=0)
    presents = {k: np.concatenate([p[k] for _, p in results], axis=0) for k in results[0][1]}
    return logits, DecodeState(full_mask, presents)


def decode_step(
    session, state: DecodeState, tokens: np.ndarray, run_options=None
) -> tuple[np.ndarray, DecodeState]:
    """Feed one token per row (B,); returns logits (B, 1, V) and the next state."""
    tokens = np.asarray(tokens, np.int64).reshape(-1, 1)  # (B, 1)
    mask = np.concatenate([state.attention_mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    feed = {"input_ids": tokens, "attention_mask": mask, **state.past}
    logits, past = _run(session, feed, run_options)
    return logits, DecodeState(mask, past)


def run_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    steps: Sequence[np.ndarray] = (),
    positions: str = "peft",
) -> list[np.ndarray]:
    """Logits of the prefill (B, T, V), then of each forced decode step in `steps` (B, 1, V)."""
    logits, state = prefill_with_prefix(
        session, input_ids, attention_mask, prefix, graph=graph, positions=positions
    )
    out = [logits]
    for tokens in steps:
        logits, state = decode_step(session, state, tokens)
        out.append(logits)
    return out


def greedy_with_prefix(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    prefix: KVPrefix,
    *,
    graph: str,
    max_new_tokens: int,
    positions: str = "peft",
) -> np.ndarray:
    """Greedy continuation (B, max_new_tokens) with the prefix seeded (no stop token)."""
    logits, state = prefill_with_prefix(
        session, input_ids, attention_mask, prefix, graph=graph, positions=positions
    )
    tokens = []
    for step in range(max_new_tokens):
        tokens.append(logits[:, -1].argmax(-1))  # (B,)
        if step + 1 < max_new_tokens:
            logits, state = decode_step(session, state, tokens[-1])
    return np.stack(tokens, axis=1)


__all__ = [
    "GRAPH_KINDS",
    "POSITIONS",
    "DecodeState",
    "decode_step",
    "greedy_with_prefix",
    "prefill_with_prefix",
    "run_with_prefix",
    "seed_past",
]
