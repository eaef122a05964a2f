"""Mixed-adapter batches: rows with different LoRA adapters in one forward.

    rows' adapters ["sql", "chat", None, "sql"] ─► the distinct ones, first seen first: sql, chat
    for each LoRA slot of the graph (module.lora_A, .lora_B, .lora_row_mask):
        lora_A   [A_sql | A_chat]               (in, r_sql + r_chat)   stacked along the rank
        lora_B   [B_sql ; B_chat]               (r_sql + r_chat, out)
        mask     row b: 1 on its adapter's columns, 0 elsewhere      (B, 1, r_sql + r_chat)
    ─► a LoadedAdapter like any other: the Slot binds it, the decode loop runs unchanged

The stacked tensors (`stack_adapters`, a copy of the adapters' bytes) serve every row order
of the same adapters; each row order adds only its masks (`mixed_adapter`).

Each row then computes x W + B_k A_k x for its own adapter k (the others' columns are
multiplied by 0 before lora_B), and a row without adapter gets only zeros: the base.
An adapter missing from a slot adds no column there. The cost per token is that of all
the batch's adapters' ranks together, whatever the mix: 8 rows of 8 adapters cost what 8
rows of one adapter at 8x its rank would.

Only LoRA adapters stack this way: DoRA's output scale, IA3's scales and a bottleneck's
weights are one per graph input, not per row, and a KV prefix seeds the cache. A batch
that holds one of those with another adapter is refused with the adapter named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgepeft.runtime.adapters import AdapterInfo, LoadedAdapter

LORA_SUFFIXES = (".lora_A", ".lora_B")
ROW_MASK_SUFFIX = ".lora_row_mask"
"""The mask input each LoRA slot of a separate-mode graph takes (export/adapter_slots.py)."""


class MixedBatchError(ValueError):
    """A batch whose adapters cannot share one forward (the message says which and why)."""


def batch_key(names: Sequence[str | None]) -> str:
    """The composite's name: one entry per row, "-" for the base."""
    return "mixed:" + ",".join("-" if n is None else n for n in names)


def _lora_modules(adapter: LoadedAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (lora_A (in, r), lora_B (r, out)) of a LoRA adapter; refuses the others."""
    if adapter.prefix is not None or adapter.info.kind != "lora":
        raise MixedBatchError(
            f"adapter {adapter.name!r} ({adapter.info.kind}) cannot share a batch with other "
            "adapters: only LoRA adapters stack per row; run its requests in their own batch"
        )
    modules: dict[str, dict[str, np.ndarray]] = {}
    for input_name, value in adapter.parameters.items():
        suffix = next((s for s in LORA_SUFFIXES if input_name.endswith(s)), None)
        if suffix is None:
            raise MixedBatchError(
                f"adapter {adapter.name!r} sets {input_name!r}, which is not a LoRA input: "
                "only LoRA adapters stack per row; run its requests in their own batch"
            )
        modules.setdefault(input_name[: -len(suffix)], {})[suffix] = value.numpy()
    return {m: (t[".lora_A"], t[".lora_B"]) for m, t in modules.items()}


@dataclass(frozen=True)
class LoraStack:
    """Some LoRA adapters stacked along the rank, shared by every row order of them."""

    names: tuple[str, ...]
    """The adapters, in stacking order (sorted)."""
    parameters: dict
    """lora_A / lora_B input name -> OrtValue of the stacked tensor."""
    columns: dict[str, tuple[int, ...]]
    """module -> where each adapter's columns start (and the end): len(names) + 1 offsets."""
    nbytes: int
    dtype: np.dtype
    """The adapters' dtype (the graph's: fp32, or fp16 for an fp16 graph): the masks' too."""
    adapters: tuple = ()
    """The LoadedAdapters stacked, in `names` order."""
    keep_alive: tuple = ()


def stack_adapters(
    adapters: Sequence[LoadedAdapter], graph_inputs: set[str], ort_value
) -> LoraStack:
    """Stack distinct LoRA adapters (sorted by name) for every slot any of them sets.

    Args:
        adapters: The batch's distinct adapters.
        graph_inputs: The graph's overridable inputs (the row masks must be among them).
        ort_value: `onnxruntime.OrtValue.ortvalue_from_numpy` (kept out of the imports here).

    Raises:
        MixedBatchError: an adapter that is not plain LoRA, or a graph without row masks
            (exported before mixed batches: re-export it).
    """
    adapters = sorted(adapters, key=lambda a: a.name)
    tensors = [_lora_modules(a) for a in adapters]
    parameters, columns, arrays = {}, {}, []
    for module in sorted({m for t in tensors for m in t}):
        mask_name = module + ROW_MASK_SUFFIX
        if mask_name not in graph_inputs:
            raise MixedBatchError(
                f"this graph has no input {mask_name!r}: it was exported before mixed-adapter "
                "batches; export it again to batch rows with different adapters"
            )
        blocks = [t.get(module) for t in tensors]
        widths = [0 if b is None else b[0].shape[1] for b in blocks]
        a = np.concatenate([b[0] for b in blocks if b is not None], axis=1)
        b = np.concatenate([b[1] for b in blocks if b is not None], axis=0)
        columns[module] = tuple(int(c) for c in np.cumsum([0, *widths]))
        for name, array in ((module + ".lora_A", a), (module + ".lora_B", b)):
            array = np.ascontiguousarray(array)
            arrays.append(array)
            parameters[name] = ort_value(array)
    return LoraStack(
        tuple(a.name for a in adapters),
        parameters,
        columns,
        sum(x.nbytes for x in arrays),
        arrays[0].dtype if arrays else np.dtype(np.float32),
        tuple(adapters),
        tuple(arrays),
    )


def mixed_adapter(stack: LoraStack, rows: Sequence[str | None], ort_value) -> LoadedAdapter:
    """One LoadedAdapter giving row b the adapter named rows[b] (None: the base): the
    stack's tensors plus one (B, 1, R) row mask per slot."""
    index = {name: k for k, name in enumerate(stack.names)}
    unknown = sorted({n for n in rows if n is not None and n not in index})
    if unknown:
        raise MixedBatchError(f"rows name {unknown}, which the stack {stack.names} lacks")
    parameters, masks = dict(stack.parameters), []
    for module, starts in stack.columns.items():
        mask = np.zeros((len(rows), 1, starts[-1]), stack.dtype)
        for row, name in enumerate(rows):
            if name is not None:
                k = index[name]
                mask[row, 0, starts[k] : starts[k + 1]] = 1
        masks.append(mask)
        parameters[module + ROW_MASK_SUFFIX] = ort_value(mask)
    info = AdapterInfo(
        name=batch_key(rows),
        kind="mixed",
        rank=None,
        bytes=stack.nbytes + sum(m.nbytes for m in masks),
        file="",
    )
    return LoadedAdapter(info, parameters, keep_alive=(stack, tuple(masks)))


__all__ = ["LoraStack", "MixedBatchError", "batch_key", "mixed_adapter", "stack_adapters"]
