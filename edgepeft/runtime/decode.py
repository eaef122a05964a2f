"""Driving the graph for one request: prefill, then one decode step per token sent in.

    steps = fused_steps(...)          # or generic_steps(...)
    logits = next(steps)              # prefill: last position's logits (B, V)
    logits = steps.send(tokens)       # feed (B,) tokens, get the next (B, V)

A KV prefix (prompt / prefix tuning) is seeded with positions="unpadded" (artifacts/kv_seed.py):
each row's text directly follows the virtual tokens whatever its left padding, so a prompt's
output does not depend on the other prompts of its batch (it equals the prompt alone).

fused (GroupQueryAttention, shared past/present buffers in the request's Slot):
    prefix adapter ─► seed_past ─► copied into columns 0..N-1 of every layer's buffer
    prefill  input_ids (B, T), attention_mask (B, N+T) ─► new keys land at columns N..N+T-1
             (with a prefix and B > 1, T > 1: row by row over row views of the buffers,
              GroupQueryAttention takes T > 1 over a past only at batch 1)
    decode   the slot's input_ids (B, 1) and logits (B, 1, V) arrays are bound once and
             updated in place; only attention_mask (B, P+1) is rebound per step
generic (torch.onnx): past and present are separate tensors; each step's presents (OrtValues,
    never copied to numpy) are the next step's pasts.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from edgepeft.artifacts.kv_seed import seed_past
from edgepeft.runtime.kv_cache import Slot

Steps = Generator[np.ndarray, np.ndarray, None]
PREFIX_POSITIONS = "unpadded"
"""Batch-invariant KV-prefix positions (kv_seed.POSITIONS): batched == each prompt alone."""


def fused_steps(session, slot: Slot, binding, input_ids, mask, prefix, parameters=None) -> Steps:
    """Prefill and decode over the slot's shared buffers (`binding` is slot.binding(adapter);
    `parameters`, the adapter's graph inputs, are bound again for a row-by-row prefill)."""
    import onnxruntime as ort

    batch, length = input_ids.shape
    n = prefix.num_virtual_tokens if prefix is not None else 0
    total = n + length
    slot.mask[:, :n] = 1
    slot.mask[:, n:total] = mask
    if prefix is not None:
        seeded = seed_past(prefix, mask, "fused", slot.spec.kv_dtype, positions=PREFIX_POSITIONS)
        for name, value in seeded.items():
            slot.kv[name][:, :, :n] = value  # (B, n_kv, N, d)
    logits = np.empty((batch, length, slot.spec.vocab_size), np.float32)  # (B, T, V)
    if prefix is not None and batch > 1 and length > 1:
        for b in range(batch):
            row, keep = slot.row_binding(b, parameters)
            row_mask = np.ascontiguousarray(slot.mask[b : b + 1, :total])
            row.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids[b : b + 1]))
            row.bind_cpu_input("attention_mask", row_mask)
            row.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits[b : b + 1]))
            session.run_with_iobinding(row)
            del keep
    else:
        prefill_mask = np.ascontiguousarray(slot.mask[:, :total])
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", prefill_mask)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(binding)
    binding.bind_ortvalue_input("input_ids", slot.ids_value)
    binding.bind_ortvalue_output("logits", slot.logits_value)
    tokens = yield logits[:, -1]
    while True:
        slot.ids[:, 0] = tokens
        slot.mask[:, total] = 1
        total += 1
        if batch == 1:  # (1, P+1) is a prefix of the (1, C) array: bind it in place
            binding.bind_input(
                "attention_mask", "cpu", 0, np.int64, [1, total], slot.mask.ctypes.data
            )
        else:
            step_mask = np.ascontiguousarray(slot.mask[:, :total])
            binding.bind_cpu_input("attention_mask", step_mask)
        session.run_with_iobinding(binding)
        tokens = yield slot.logits[:, 0]


def generic_steps(session, spec, parameters: dict, input_ids, mask, prefix) -> Steps:
    """Prefill and decode with growing caches (graphs without shared buffers)."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_numpy
    batch = len(input_ids)
    outputs = ["logits"] + [n.replace("past_key_values.", "present.", 1) for n in spec.past_names]
    n = prefix.num_virtual_tokens if prefix is not None else 0
    full_mask = np.concatenate([np.ones((batch, n), np.int64), mask], axis=1)  # (B, N+T)
    if prefix is not None:
        past = seed_past(prefix, mask, "generic", spec.kv_dtype, positions=PREFIX_POSITIONS)
    else:
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), spec.kv_dtype)
        past = dict.fromkeys(spec.past_names, empty)
    feeds = {**parameters, **{k: value(v) for k, v in past.items()}}
    feeds["input_ids"], feeds["attention_mask"] = value(input_ids), value(full_mask)
    while True:
        results = session.run_with_ort_values(outputs, feeds)
        tokens = yield results[0].numpy()[:, -1]
        full_mask = np.concatenate([full_mask, np.ones((batch, 1), np.int64)], axis=1)
        feeds = dict(parameters)
        feeds.update(zip(spec.past_names, results[1:], strict=True))
        feeds["input_ids"] = value(np.asarray(tokens, np.int64).reshape(batch, 1))
        feeds["attention_mask"] = value(full_mask)


__all__ = ["PREFIX_POSITIONS", "fused_steps", "generic_steps"]
