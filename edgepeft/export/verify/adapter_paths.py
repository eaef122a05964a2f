"""Where a separate export keeps each adapter's file, and which kind of file it is.

    entry.file (as the manifest lists it), else adapters/<name>.onnx_adapter
        .onnx_adapter            activated through onnxruntime.LoraAdapter + RunOptions
        .kvprefix.safetensors    seeded into the cache at prefill (prompt / prefix tuning)

Torch-free; the folder and suffix names come from edgepeft.vocab.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepeft.vocab import ADAPTERS_FOLDER, KV_PREFIX_SUFFIX, ONNX_ADAPTER_SUFFIX

ADAPTER_DIR = ADAPTERS_FOLDER
"""Old name of vocab.ADAPTERS_FOLDER (kept for callers of edgepeft.export.verify)."""
ADAPTER_SUFFIX = ONNX_ADAPTER_SUFFIX
"""Old name of vocab.ONNX_ADAPTER_SUFFIX (kept for callers of edgepeft.export.verify)."""


def adapter_file(export_dir: Path, entry) -> Path:
    """Where a separate export keeps an adapter's file: entry.file, else adapters/<name>.onnx_adapter."""
    given = getattr(entry, "file", None)
    default = export_dir / ADAPTERS_FOLDER / f"{entry.name}{ONNX_ADAPTER_SUFFIX}"
    path = export_dir / given if given else default
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter {entry.name!r}: {path} not found; the manifest of {export_dir} lists it. "
            "Re-run the export"
        )
    return path


def is_kv_prefix_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a KV-prefix adapter file (prompt / prefix tuning), by its suffix."""
    return str(path).endswith(KV_PREFIX_SUFFIX)
