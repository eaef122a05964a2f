"""Size and sha256 of every file an export depends on: recorded at export, checked at load.

    export ──file_records(folder)──► edgepeft.json "files": {relative path: {size, sha256}}
        model.onnx, model.onnx.data, tokenizer files, genai_config.json,
        adapters/*.onnx_adapter (+ .json sidecars), adapters/*.kvprefix.safetensors
    Engine(out)                      ──check_files(folder, files)──► every size (cheap: stat)
    Engine(out, verify_files=True)   ──check_files(..., hashes=True)──► + every sha256
    edgepeft verify OUT --files      ──┘

Not recorded: the manifest itself, the verify reports (rewritten by every `edgepeft verify`)
and hidden files (atomic writes' temporaries). An adapter file also carries a checksum over
its own tensors (`tensors_sha256`; onnx_adapter.py, kv_prefix.py), so a file copied without
the manifest or its sidecar is still checked when it is loaded.

Torch-free and onnx-free: the device runtime imports it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgepeft.artifacts.manifest import (
    LEGACY_MANIFEST_FILE,
    MANIFEST_FILE,
    Manifest,
    graph_folders,
    read_manifest,
    write_manifest,
)

# verify.py's VERIFY_FILE / VERIFY_TABLE (not imported: verify.py needs torch)
UNRECORDED = frozenset({MANIFEST_FILE, LEGACY_MANIFEST_FILE, "verify.json", "verify.md"})
"""File names never recorded: the manifest (either name) and the verify reports."""
_ON_PURPOSE = " (changed on purpose? record it: edgepeft.export.files.record_files(folder))"


class FileIntegrityError(ValueError):
    """A file of an export is missing, or its size or sha256 is not the recorded one."""


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def file_records(folder: str | os.PathLike) -> dict[str, dict]:
    """relative path -> {"size", "sha256"} of every file under `folder` an export needs."""
    folder = Path(folder)
    records = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or path.name in UNRECORDED:
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        records[relative.as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return records


def split_records(
    records: Mapping[str, Mapping], adapter_files: Mapping[str, str]
) -> tuple[dict, dict[str, dict]]:
    """(the graph's records, adapter name -> its file's and sidecar's records).

    The runtime checks an adapter's records when it loads that adapter, so one damaged
    adapter file leaves the base and the other adapters usable.

    Args:
        records: The manifest's "files".
        adapter_files: adapter name -> its file, relative to the export folder.
    """
    per_adapter = {}
    for name, file in adapter_files.items():
        sidecar = Path(file).with_suffix(".json").as_posix()  # sql.onnx_adapter -> sql.json
        per_adapter[name] = {k: v for k, v in records.items() if k in (file, sidecar)}
    taken = {k for adapter in per_adapter.values() for k in adapter}
    return {k: v for k, v in records.items() if k not in taken}, per_adapter


def record_files(folder: str | os.PathLike) -> Manifest:
    """Rewrite the graph manifest in `folder` with the records of its files; returns it."""
    manifest = read_manifest(folder)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"{folder} holds a set of graphs; record each graph folder's files")
    manifest = replace(manifest, files=file_records(folder))
    write_manifest(Path(folder), manifest)
    return manifest


def check_files(
    folder: str | os.PathLike, records: Mapping[str, Mapping], *, hashes: bool = False
) -> int:
    """Raise unless every recorded file is there with its size (and sha256, if `hashes`).

    Args:
        folder: The export folder the records are relative to.
        records: The manifest's "files" (`file_records` at export time).
        hashes: Also hash every file (reads all of them; sizes alone only stat them).

    Returns:
        How many files were checked.

    Raises:
        FileIntegrityError: names the file, the expected and the found size or sha256, and
            what to do.
    """
    folder = Path(folder)
    for relative, record in records.items():
        path = folder / relative
        if not path.is_file():
            raise FileIntegrityError(
                f"{path} is missing: the export at {folder} lists it ({record['size']} bytes); "
                "copy the whole export folder again, or re-export"
            )
        size = path.stat().st_size
        if size != record["size"]:
            raise FileIntegrityError(
                f"{path} has {size} bytes, the export recorded {record['size']} "
                f"({'truncated' if size < record['size'] else 'grown'} since export): copy "
                f"the file again from the original export, or re-export{_ON_PURPOSE}"
            )
    if hashes:
        for relative, record in records.items():
            path = folder / relative
            found = sha256_file(path)
            if found != record["sha256"]:
                raise FileIntegrityError(
                    f"{path} has sha256 {found}, the export recorded {record['sha256']} (same "
                    "size, other bytes: corrupted since export): copy the file again from the "
                    f"original export, or re-export{_ON_PURPOSE}"
                )
    return len(records)


def check_export(export_dir: str | os.PathLike, *, hashes: bool = True) -> int:
    """`check_files` on every graph folder of an export (one graph, or a merged set).

    Returns:
        How many files were checked (0 for an export that records none).
    """
    checked = 0
    for folder in graph_folders(export_dir):
        records = read_manifest(folder).files
        if records is not None:
            checked += check_files(folder, records, hashes=hashes)
    return checked


__all__ = [
    "check_export",
    "FileIntegrityError",
    "UNRECORDED",
    "check_files",
    "file_records",
    "record_files",
    "sha256_file",
    "split_records",
    "tensors_sha256",
]
