"""The last step of every graph folder an export writes, so it opens as it is, anywhere.

    folder: model.onnx(.data), edgepeft.json, tokenizer files, adapters/, verify.json
        ├─► model.onnx metadata_props: edgepeft.weights, edgepeft.max_context,
        │   edgepeft.base_fingerprint (what the graph's I/O does not show; the runtime
        │   compares the manifest with them, runtime/contract.py)
        ├─► genai_config.json: og.Model(folder) opens it (genai.py)
        └─► edgepeft.json "files": size and sha256 of every file above
            (artifacts/files.py), last, so every record is of the file as it stays

Called by `export` for each graph folder (single, merged set, separate); `export_adapter`
only records the files again (`files.record_files`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from edgepeft.artifacts.files import record_files
from edgepeft.artifacts.manifest import GRAPH_METADATA_PREFIX, Manifest, read_manifest, write_json
from edgepeft.atomic import atomic_path
from edgepeft.export.genai import GENAI_CONFIG_FILE, genai_config

LOG = logging.getLogger("edgepeft")


def graph_metadata(manifest: Manifest) -> dict[str, str]:
    """The metadata_props the graph carries about itself (values as strings)."""
    values = {
        "weights": manifest.weights,
        "max_context": manifest.max_context,
        "base_fingerprint": manifest.base_fingerprint,
    }
    return {f"{GRAPH_METADATA_PREFIX}{k}": str(v) for k, v in values.items() if v is not None}


def stamp_graph(model_path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Set metadata_props on the graph file; its weights (model.onnx.data) are not read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    kept = {p.key: p.value for p in model.metadata_props if p.key not in metadata}
    onnx.helper.set_model_props(model, {**kept, **metadata})
    with atomic_path(Path(model_path)) as tmp:
        onnx.save(model, str(tmp))  # external data stays referenced by name, beside it


def finish_graph_folder(
    folder: str | os.PathLike, *, config=None, progress: Callable[[str], None] | None = None
) -> Manifest:
    """Stamp the graph, write genai_config.json and record every file of one graph folder.

    Args:
        folder: A graph folder with its manifest written.
        config: The base's transformers config (genai_config needs its heads and hidden
            size where the graph does not show them, as in traced graphs).
        progress: Called with one line per step.

    Returns:
        The manifest as written, with its `files`.
    """
    say = progress or (lambda line: None)
    folder = Path(folder)
    manifest = read_manifest(folder)
    stamp_graph(folder / manifest.model_file, graph_metadata(manifest))
    try:
        write_json(folder / GENAI_CONFIG_FILE, genai_config(folder, config=config))
    except ValueError as e:  # the export stays usable by edgepeft's runtime
        LOG.warning("no %s written in %s: %s", GENAI_CONFIG_FILE, folder, e)
        say(f"no {GENAI_CONFIG_FILE} ({e}): onnxruntime-genai cannot open {folder}")
    return record_files(folder)


__all__ = ["finish_graph_folder", "graph_metadata", "stamp_graph"]
