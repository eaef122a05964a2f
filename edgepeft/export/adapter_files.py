"""`.onnx_adapter` files, the exporter's side: the graph's optional inputs, read with onnx.

    optional_graph_inputs(model.onnx) ──► {input name: GraphInput(dtype, shape)}
        ──► edgepeft.artifacts.onnx_adapter.write_adapter_file(folder, name, tensors, ...)

The file format itself (writing, reading and checking adapter files, the base-fingerprint
guard) is torch-free and lives in `edgepeft.artifacts.onnx_adapter`, where the device
runtime reads it; its names stay importable from here.
"""

from __future__ import annotations

import os

import numpy as np

from edgepeft.artifacts.onnx_adapter import (  # noqa: F401  (re-exported: the old import path)
    ADAPTER_LAYOUT_VERSION,
    GUARD_PREFIX,
    SIDECAR_FORMAT,
    AdapterBaseMismatchError,
    AdapterFile,
    GraphInput,
    adapter_fingerprint,
    check_adapter_file,
    check_tensors,
    fingerprint_input,
    load_adapter_file,
    model_version,
    tensors_checksum,
    write_adapter_file,
)
from edgepeft.vocab import ADAPTERS_FOLDER, ONNX_ADAPTER_SUFFIX

ADAPTER_DIR = ADAPTERS_FOLDER
SUFFIX = ONNX_ADAPTER_SUFFIX


def optional_graph_inputs(model_path: str | os.PathLike) -> dict[str, GraphInput]:
    """Inputs of a graph that have a default initializer (the ones adapters may set)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    defaults = {t.name for t in graph.initializer}
    out = {}
    for value in graph.input:
        if value.name not in defaults:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        out[value.name] = GraphInput(np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape)
    return out


__all__ = [
    "ADAPTER_DIR",
    "AdapterBaseMismatchError",
    "AdapterFile",
    "adapter_fingerprint",
    "check_adapter_file",
    "check_tensors",
    "fingerprint_input",
    "load_adapter_file",
    "optional_graph_inputs",
    "tensors_checksum",
    "write_adapter_file",
]
