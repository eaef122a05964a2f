"""edgepeft.json: what an export folder holds, for the runtime and for `verify`.

    one graph                              merged set (one graph per adapter)
    out/                                   out/
      edgepeft.json   Manifest               edgepeft.json   ExportIndex: name -> folder
      model.onnx, model.onnx.data            sql/  edgepeft.json, model.onnx, ... (one graph)
      genai_config.json (onnxruntime-genai)  chat/ ...
      tokenizer files, verify.json           verify.json     every graph's check

Plain JSON (no pickles), written atomically; `read_manifest` checks the format. The name is
ours alone: onnxruntime-genai takes a folder holding a `manifest.json` (and no
genai_config.json) for an ORT model package. Older exports named it manifest.json;
`read_manifest` still reads those (LEGACY_MANIFEST_FILE).

A graph's Manifest records the size and sha256 of every file the graph needs (`files`,
see files.py), checked when the runtime opens the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepeft import __version__, atomic
from edgepeft.artifacts.graph_io import MODEL_FILE, input_names, output_names

MANIFEST_FILE = "edgepeft.json"
LEGACY_MANIFEST_FILE = "manifest.json"
"""What MANIFEST_FILE was called before; read (never written) so old exports still open."""
FORMAT = "edgepeft-onnx"
GRAPH_METADATA_PREFIX = "edgepeft."
"""model.onnx metadata_props keys: edgepeft.weights, .max_context, .base_fingerprint
(export/finish.py writes them, runtime/contract.py compares the manifest with them)."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter folded into (merged) or shipped beside (separate) the graph."""

    name: str
    peft_type: str
    source: str
    """The adapter folder it was read from."""
    fingerprint: str
    """merged: the merged weights' id (base fingerprint + adapter config + tensors, as `merge`
    reports); separate: the base fingerprint the adapter file is bound to."""
    kind: str | None = None
    """separate: "lora", "dora", "ia3", "bottleneck", "parallel", "mam", "unipelt",
    "selective" or "kv_prefix"."""
    rank: int | None = None
    """separate: LoRA/DoRA rank (the largest, under a rank_pattern), bottleneck width; else None."""
    targets: list[str] | None = None
    """separate: the modules whose graph inputs the adapter file sets."""
    file: str | None = None
    """separate: the .onnx_adapter file, relative to the export folder (sidecar: same stem, .json)."""
    sha256: str | None = None
    num_virtual_tokens: int | None = None
    """separate, kind "kv_prefix" or a hybrid with a prefix part: how many cache positions
    the prefix seeds."""
    prefix_file: str | None = None
    """separate, a hybrid (kind "mam"): its KV-prefix part, adapters/<name>.kvprefix.safetensors
    beside `file`; the runtime loads both as one adapter (the .onnx_adapter's sidecar names it)."""


@dataclass(frozen=True)
class Manifest:
    """One exported decoder graph (see graph_io.py for its I/O contract)."""

    base: str
    """The base model's folder or hub id, as loaded."""
    base_fingerprint: str
    """`edgepeft.fingerprint` of the base before any adapter was merged."""
    base_quant: str
    model_type: str
    graph: str
    """"fused" (contrib-op builder) or "generic" (torch.onnx trace)."""
    weights: str
    block_size: int
    accuracy_level: int
    inputs: list[str]
    outputs: list[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str
    eos_token_id: int | list[int] | None
    bos_token_id: int | None
    pad_token_id: int | None
    max_context: int | None
    num_nodes: int
    op_counts: dict[str, int]
    mode: str = "merged"
    quantization: dict | None = None
    """int4/int8: how the weights were quantized (`weights.quantization_record`: method,
    symmetric, mixed, the int8 tensors, the int4 count); None for other formats and for
    exports written before edgepeft recorded it (those are symmetric RTN)."""
    adapters: list[AdapterEntry] = field(default_factory=list)
    providers: list[str] | None = None
    """onnxruntime execution providers the recipe asks the runtime to try, in order."""
    verify: dict | None = None
    """GraphCheck.to_dict() of the check run at export time, or None."""
    files: dict[str, dict] | None = None
    """relative path -> {"size", "sha256"} of every file the graph needs (files.py); None in
    exports written before edgepeft recorded them."""
    model_file: str = MODEL_FILE
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    edgepeft_version: str = __version__
    kind: str = "graph"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["adapters"] = [AdapterEntry(**a) for a in data.get("adapters", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ExportIndex:
    """A merged set: one graph folder per adapter, over the same base."""

    base: str
    base_fingerprint: str
    weights: str
    graphs: dict[str, str]
    """adapter name -> folder (relative to the index's folder)."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    edgepeft_version: str = __version__
    kind: str = "merged-set"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExportIndex:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def graph_fields(info) -> dict:
    """The Manifest fields that describe the written graph (a fused or generic GraphInfo)."""
    return dict(
        weights=info.weights,
        inputs=input_names(info.num_layers),
        outputs=output_names(info.num_layers),
        num_layers=info.num_layers,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        vocab_size=info.vocab_size,
        kv_dtype=info.kv_dtype,
        num_nodes=info.num_nodes,
        op_counts=info.op_counts,
        quantization=getattr(info, "quantization", None),
        model_file=Path(info.path).name,
    )


def write_json(path: Path, document: dict) -> Path:
    """Write `document` to `path` through a temporary sibling file and a rename."""
    return atomic.write_json(path, document)


def write_manifest(folder: Path, manifest: Manifest | ExportIndex) -> Path:
    """Write folder/edgepeft.json; an old-named manifest.json there goes (it would be stale)."""
    path = write_json(Path(folder) / MANIFEST_FILE, manifest.to_dict())
    (Path(folder) / LEGACY_MANIFEST_FILE).unlink(missing_ok=True)
    return path


def manifest_path(folder: str | os.PathLike) -> Path | None:
    """folder/edgepeft.json, else an older export's folder/manifest.json, else None."""
    for name in (MANIFEST_FILE, LEGACY_MANIFEST_FILE):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def read_manifest(folder: str | os.PathLike) -> Manifest | ExportIndex:
    """The manifest of an export folder: a Manifest (one graph) or an ExportIndex (a set)."""
    path = manifest_path(folder)
    if path is None:
        raise FileNotFoundError(
            f"{Path(folder) / MANIFEST_FILE} not found: is {folder} a folder written by "
            "`edgepeft export`?"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run the export") from e
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {data['format_version']}; this edgepeft "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade edgepeft"
        )
    if data.get("kind") == "merged-set":
        return ExportIndex.from_dict(data)
    return Manifest.from_dict(data)


def graph_folders(export_dir: str | os.PathLike) -> list[Path]:
    """The folders holding one graph each: the export itself, or every folder of a merged set."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if isinstance(manifest, ExportIndex):
        return [export_dir / folder for folder in manifest.graphs.values()]
    return [export_dir]


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GRAPH_METADATA_PREFIX",
    "LEGACY_MANIFEST_FILE",
    "MANIFEST_FILE",
    "AdapterEntry",
    "ExportIndex",
    "Manifest",
    "graph_fields",
    "graph_folders",
    "manifest_path",
    "read_manifest",
    "write_json",
    "write_manifest",
]
