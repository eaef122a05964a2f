"""One prefill of an exported decoder graph with an empty cache, on one CPU thread: what the
export tests compare against PyTorch. Not a test module."""

from __future__ import annotations

import numpy as np


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prefill(graph, ids: np.ndarray, extra: dict | None = None, run_options=None) -> np.ndarray:
    """Logits (B, T, V) of `ids` (B, T) from `graph` (a path or an InferenceSession), every
    past empty; `extra` feeds more inputs (adapter values), `run_options` e.g. an adapter."""
    graph = session(graph) if not hasattr(graph, "get_inputs") else graph
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **(extra or {})}
    for i in graph.get_inputs():
        if i.name.startswith("past_key_values"):
            shape = [len(ids) if d == "batch_size" else 0 if isinstance(d, str) else d
                     for d in i.shape]  # fmt: skip
            feed[i.name] = np.zeros(shape, np.float32)
    return graph.run(["logits"], feed, run_options)[0]
