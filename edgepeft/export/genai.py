"""genai_config.json for an export folder, so onnxruntime-genai can load and run it.

    out/edgepeft.json ──► model type, I/O names, layers, KV heads, head_dim, vocab,
                          context, eos / bos / pad
    out/model.onnx (graph only, no weights read) ──► attention heads (GroupQueryAttention's
                          num_heads), hidden size (the embedding table's width)
        └─ neither in the graph (generic export) ──► the base's config (given, or its
                          config.json)
    ──► out/genai_config.json                      og.Model(out) reads it

`edgepeft export` writes it into every graph folder (fused and generic graphs alike: both
keep the decoder contract of graph_info.py); a merged set gets one file in each graph folder. Separate-mode
exports need nothing more here: onnxruntime-genai feeds an `.onnx_adapter` file's tensors
as the graph inputs they are named after (`og.Adapters(model).load(file, name)`).

The KV cache is not shared between past and present (past_present_share_buffer false): the
graphs keep the growing (B, n_kv, P, d) cache contract that plain onnxruntime loops use.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepeft.export.files import record_files
from edgepeft.export.graph_info import input_names, output_names
from edgepeft.export.manifest import (
    Manifest,
    graph_folders,
    read_manifest,
    write_json,
)

GENAI_CONFIG_FILE = "genai_config.json"
# Types declared as themselves (onnxruntime-genai 0.18 runs each with this I/O; checked on
# every fused architecture). Anything else is declared "llama", its plain decoder loop:
# its own "gpt2" type, for one, expects another graph contract (generic gpt2 exports).
GENAI_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"})
_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight")


def _graph_facts(model_path: Path) -> dict[str, int]:
    """Attention heads and hidden size read from the graph's nodes and initializer shapes."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    facts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            for attribute in node.attribute:
                if attribute.name == "num_heads":
                    facts["num_attention_heads"] = int(attribute.i)
            break
    for initializer in graph.initializer:
        if initializer.name in _EMBEDDING_NAMES and len(initializer.dims) == 2:
            facts["hidden_size"] = int(initializer.dims[1])  # (V, H)
            break
    return facts


def _base_config(base: str):
    """The base model's config (folder or hub cache), or None where it is not readable."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        return None


def _config_facts(config) -> dict[str, int]:
    """The same facts from a transformers config (None: none)."""
    if config is None:
        return {}
    config = config.get_text_config()
    facts = {}
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if heads:
        facts["num_attention_heads"] = int(heads)
    if hidden:
        facts["hidden_size"] = int(hidden)
    return facts


def genai_config(
    folder: str | os.PathLike, *, intra_op_threads: int | None = None, config=None
) -> dict:
    """The genai_config.json document for the single-graph export in `folder`.

    Args:
        folder: An export folder holding one graph (edgepeft.json + model.onnx).
        intra_op_threads: onnxruntime intra-op threads for the decoder session (default:
            onnxruntime's choice).
        config: The base's transformers config, where the graph does not show its attention
            heads or hidden size (default: read from the manifest's `base`).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not isinstance(manifest, Manifest):
        raise ValueError(f"{folder} holds a set of graphs; use write_genai_config on it")
    facts = _graph_facts(folder / manifest.model_file)
    if len(facts) < 2:
        config = config if config is not None else _base_config(manifest.base)
        facts = {**_config_facts(config), **facts}
    missing = sorted({"num_attention_heads", "hidden_size"} - set(facts))
    if missing:
        raise ValueError(
            f"{folder}: cannot tell {missing} from the graph or from the base {manifest.base!r} "
            "(its config.json is not readable here); export again from a reachable base folder"
        )
    layers = manifest.num_layers
    # Separate-mode graphs add adapter inputs after these; onnxruntime-genai feeds those itself.
    contract = input_names(layers)
    if manifest.inputs[: len(contract)] != contract or manifest.outputs != output_names(layers):
        raise ValueError(
            f"{folder}: graph I/O {manifest.inputs[:3]}... / {manifest.outputs[:2]}... is not the "
            "decoder contract (graph_info.py) onnxruntime-genai is told about; re-export it"
        )
    session_options: dict = {"log_id": "edgepeft", "provider_options": []}
    if intra_op_threads is not None:
        session_options["intra_op_num_threads"] = int(intra_op_threads)
    context = int(manifest.max_context or 2048)
    model_type = manifest.model_type if manifest.model_type in GENAI_MODEL_TYPES else "llama"
    return {
        "model": {
            "type": model_type,
            "bos_token_id": manifest.bos_token_id,
            "eos_token_id": manifest.eos_token_id,
            "pad_token_id": manifest.pad_token_id if manifest.pad_token_id is not None else 0,
            "vocab_size": manifest.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": manifest.model_file,
                "head_size": manifest.head_dim,
                "hidden_size": facts["hidden_size"],
                "num_attention_heads": facts["num_attention_heads"],
                "num_hidden_layers": layers,
                "num_key_value_heads": manifest.num_kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(
    export_dir: str | os.PathLike, *, intra_op_threads: int | None = None, config=None
) -> list[Path]:
    """Write genai_config.json beside every graph of an export folder.

    `edgepeft export` already wrote one; call this to change `intra_op_threads` (the
    manifest's file records are updated with it).

    Args:
        export_dir: A folder written by `edgepeft.export` (one graph, or a merged set).
        intra_op_threads: onnxruntime intra-op threads recorded in the session options.
        config: As `genai_config`.

    Returns:
        The files written: one for a single graph, one per graph folder for a merged set.
    """
    written = []
    for folder in graph_folders(export_dir):
        document = genai_config(folder, intra_op_threads=intra_op_threads, config=config)
        written.append(write_json(folder / GENAI_CONFIG_FILE, document))
        if read_manifest(folder).files is not None:  # keep the recorded sha256 true
            record_files(folder)
    return written


__all__ = ["GENAI_CONFIG_FILE", "genai_config", "write_genai_config"]
