"""A request's working memory, allocated once and reused: KV buffers, decode arrays, bindings.

    fused graph (GroupQueryAttention): past and present share one buffer per layer and kind
        buffer (B, n_kv, capacity, d) ──bound as──► past_key_values.{i}.key  (input)
                                       ──bound as──► present.{i}.key         (output)
        a step writes its new keys at columns P .. P+T-1 in place; attention_mask (B, P+T)
        tells the graph how many columns are filled (the rest is never read)
    decode arrays: input_ids (B, 1), attention_mask (B, capacity) sliced per step,
                   logits (B, 1, V): bound once, updated in place

    Slot.binding(adapter) ──► an IOBinding with the adapter's tensors, the buffers and the
                              decode arrays bound, built on first use and cached per adapter:
                              switching adapters between requests is a dict lookup.

Slots live in a SlotPool: a request takes a free slot of its batch size and capacity (or a
new one) and gives it back at the end, so concurrent requests never share buffers and
sequential ones reuse them. Generic (torch.onnx) graphs concatenate past and present instead
(no shared buffer): their slots hold only the adapter feeds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

CAPACITY_STEP = 256
"""KV buffers grow in steps of this many positions (capped at the context)."""


@dataclass(frozen=True)
class CacheSpec:
    """The graph's cache layout, from the manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: np.dtype
    shared: bool
    """Past and present share one buffer (fused graphs)."""
    max_context: int | None

    @property
    def past_names(self) -> list[str]:
        return [
            f"past_key_values.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")
        ]

    def capacity_for(self, needed: int) -> int:
        rounded = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        return min(rounded, self.max_context) if self.max_context else rounded


def present_name(past_name: str) -> str:
    return past_name.replace("past_key_values.", "present.", 1)


class Slot:
    """Buffers and bindings for one request at a time (see the module docstring)."""

    def __init__(self, session, spec: CacheSpec, batch: int, capacity: int):
        import onnxruntime as ort

        self.session, self.spec, self.batch, self.capacity = session, spec, batch, capacity
        self.ids = np.zeros((batch, 1), np.int64)  # (B, 1) decode token
        self.mask = np.zeros((batch, capacity), np.int64)  # (B, C), sliced to (B, P+T)
        self.logits = np.zeros((batch, 1, spec.vocab_size), np.float32)  # (B, 1, V)
        self.ids_value = ort.OrtValue.ortvalue_from_numpy(self.ids)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.kv: dict[str, np.ndarray] = {}
        self.kv_values: dict = {}
        if spec.shared:
            shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)  # (B, n_kv, C, d)
            for name in spec.past_names:
                self.kv[name] = np.zeros(shape, spec.kv_dtype)
                self.kv_values[name] = ort.OrtValue.ortvalue_from_numpy(self.kv[name])
        self._bindings: dict[str | None, tuple[object, object]] = {}
        self.busy = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv.values()) + self.mask.nbytes + self.logits.nbytes

    def binding(self, adapter, cache: bool = True):
        """The IOBinding for `adapter` (a LoadedAdapter or None), built once per slot; with
        cache=False built anew and not kept (a continuous batch's ever-changing row mixes)."""
        key = None if adapter is None else adapter.name
        hit = self._bindings.get(key)
        if hit is not None and hit[0] is adapter:
            return hit[1]
        binding = self.session.io_binding()
        for name, value in (adapter.parameters if adapter is not None else {}).items():
            binding.bind_ortvalue_input(name, value)
        for name, value in self.kv_values.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present_name(name), value)
        binding.bind_ortvalue_input("input_ids", self.ids_value)
        binding.bind_ortvalue_output("logits", self.logits_value)
        if cache:
            self._bindings[key] = (adapter, binding)
        return binding

    def row_binding(self, row: int, parameters=None):
        """A binding over row `row`'s KV buffers alone (batch 1), for row-by-row prefill, with
        the adapter's graph inputs (`parameters`: a hybrid has both them and a prefix)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in (parameters or {}).items():
            binding.bind_ortvalue_input(name, value)
        views = []
        for name, array in self.kv.items():
            view = ort.OrtValue.ortvalue_from_numpy(array[row : row + 1])  # contiguous
            views.append(view)
            binding.bind_ortvalue_input(name, view)
            binding.bind_ortvalue_output(present_name(name), view)
        return binding, views

    def forget(self, adapter_name: str) -> None:
        self._bindings.pop(adapter_name, None)


class SlotPool:
    """Free and busy slots; `acquire` / `release` are a lock and a list scan."""

    def __init__(self, session, spec: CacheSpec):
        self.session, self.spec = session, spec
        self._lock = threading.Lock()
        self._slots: list[Slot] = []

    def acquire(self, batch: int, needed: int) -> Slot:
        with self._lock:
            for slot in self._slots:
                if not slot.busy and slot.batch == batch and slot.capacity >= needed:
                    slot.busy = True
                    return slot
            # Replace an idle slot of this batch size that is too small, else add one.
            for i, slot in enumerate(self._slots):
                if not slot.busy and slot.batch == batch:
                    del self._slots[i]
                    break
        slot = Slot(self.session, self.spec, batch, self.spec.capacity_for(needed))
        slot.busy = True
        with self._lock:
            self._slots.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.busy = False

    def forget(self, adapter_name: str) -> None:
        """Drop cached bindings of an unloaded adapter (their OrtValues go with them)."""
        with self._lock:
            for slot in self._slots:
                slot.forget(adapter_name)

    def clear(self) -> None:
        """Free every idle slot's buffers."""
        with self._lock:
            self._slots = [s for s in self._slots if s.busy]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots)


__all__ = ["CAPACITY_STEP", "CacheSpec", "Slot", "SlotPool", "present_name"]
