"""The on-disk contract of an export: what `edgepeft export` writes and the device runtime reads.

    out/ (one graph folder)                 module            written by         read by
      edgepeft.json       Manifest          manifest.py       export (api,       runtime Engine,
                          (a merged set:                      separate)          verify, genai
                          ExportIndex)
      model.onnx(.data)   decoder graph     graph_io.py       export (fused,     runtime Engine
                          inputs/outputs                      generic)
      edgepeft.json       size, sha256      files.py          export (finish,    runtime Engine,
        "files"           of every file                       export_adapter)    verify --files
      adapters/<name>.onnx_adapter          onnx_adapter.py   export (separate)  runtime adapters
        + <name>.json     LoRA, DoRA, IA3, bottleneck values for graph inputs
      adapters/<name>.kvprefix.safetensors  kv_prefix.py      export (separate,  runtime adapters,
                          prompt / prefix tuning keys, values    kv_prefix)      verify
        seeded into the graph's cache       kv_seed.py                           runtime decode,
                                                                                 verify

    runtime ──► artifacts ◄── export          (each arrow one way; artifacts imports neither)

Torch-free and onnx-free: numpy, safetensors' numpy API, onnxruntime and the standard
library, plus edgepeft.{vocab, settings, atomic, finite}; tests/test_layout_imports.py holds
it to that. The names below resolve lazily, so `import edgepeft.artifacts.manifest` stays
free of numpy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterEntry": "manifest",
    "ExportIndex": "manifest",
    "MANIFEST_FILE": "manifest",
    "Manifest": "manifest",
    "graph_folders": "manifest",
    "manifest_path": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "DATA_FILE": "graph_io",
    "MODEL_FILE": "graph_io",
    "input_names": "graph_io",
    "output_names": "graph_io",
    "FileIntegrityError": "files",
    "check_export": "files",
    "check_files": "files",
    "file_records": "files",
    "record_files": "files",
    "sha256_file": "files",
    "split_records": "files",
    "tensors_sha256": "files",
    "AdapterBaseMismatchError": "onnx_adapter",
    "adapter_fingerprint": "onnx_adapter",
    "check_adapter_file": "onnx_adapter",
    "load_adapter_file": "onnx_adapter",
    "write_adapter_file": "onnx_adapter",
    "KVPrefix": "kv_prefix",
    "kv_prefix_path": "kv_prefix",
    "read_kv_prefix_file": "kv_prefix",
    "write_kv_prefix_file": "kv_prefix",
    "seed_past": "kv_seed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that reading a manifest does not load numpy (files.py and the adapters need it).
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgepeft.artifacts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
