"""The manifest checked against the graph it describes, when the Engine opens an export.

    edgepeft.json                 InferenceSession (graph I/O and metadata_props)
      inputs, outputs        ==   the session's inputs (not the adapter ones) and outputs
      num_layers             ==   how many past_key_values.{i}.key inputs it has
      num_kv_heads, head_dim ==   dims 1 and 3 of past_key_values.0.key (B, n_kv, P, d)
      kv_dtype               ==   that input's element type
      vocab_size             ==   dim 2 of logits (B, T, V), where the graph fixes it
      weights                ==   metadata edgepeft.weights           (export/finish.py
      base_fingerprint       ==   metadata edgepeft.base_fingerprint   writes these; older
      max_context            <=   metadata edgepeft.max_context        graphs lack them)

A manifest edited by hand, or copied beside another graph, would otherwise fail later
inside onnxruntime (a shape error at the first generate) or not at all (the wrong cache
capacity, the wrong adapters accepted). Torch- and onnx-free: only the session is read.
"""

from __future__ import annotations

from edgepeft.artifacts.manifest import GRAPH_METADATA_PREFIX, Manifest

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class ManifestGraphMismatchError(ValueError):
    """The manifest says one thing about the graph, the graph another."""


def graph_facts(session) -> dict:
    """What the session shows of the manifest's fields (a field it does not show is absent)."""
    adapter_inputs = {i.name for i in session.get_overridable_initializers()}
    inputs = [i for i in session.get_inputs() if i.name not in adapter_inputs]
    outputs = session.get_outputs()
    facts: dict = {
        "inputs": [i.name for i in inputs],
        "outputs": [o.name for o in outputs],
        "num_layers": sum(
            i.name.startswith("past_key_values.") and i.name.endswith(".key") for i in inputs
        ),
    }
    past = next((i for i in inputs if i.name == "past_key_values.0.key"), None)
    if past is not None:
        if past.type in _ORT_TYPES:
            facts["kv_dtype"] = _ORT_TYPES[past.type]
        if len(past.shape) == 4:  # (B, n_kv, P, d): symbolic dims are strings
            for field, dim in (("num_kv_heads", past.shape[1]), ("head_dim", past.shape[3])):
                if isinstance(dim, int):
                    facts[field] = dim
    logits = next((o for o in outputs if o.name == "logits"), None)
    if logits is not None and len(logits.shape) == 3 and isinstance(logits.shape[2], int):
        facts["vocab_size"] = logits.shape[2]  # (B, T, V)
    metadata = session.get_modelmeta().custom_metadata_map
    for field in ("weights", "base_fingerprint", "max_context"):
        value = metadata.get(GRAPH_METADATA_PREFIX + field)
        if value is not None:
            facts[field] = int(value) if field == "max_context" else value
    return facts


def check_manifest(manifest: Manifest, session, where: str) -> None:
    """Raise unless every manifest field the graph shows has the graph's value.

    Args:
        manifest: The export's manifest.
        session: The InferenceSession over its graph.
        where: The manifest file, for the message.

    Raises:
        ManifestGraphMismatchError: names the field, the manifest's value and the graph's.
    """
    for field, graph_value in graph_facts(session).items():
        value = getattr(manifest, field)
        if field == "max_context":
            wrong = value is None or value > graph_value  # a shorter limit is the user's choice
        else:
            wrong = value != graph_value
        if wrong:
            shown = f"{value[:4]}... ({len(value)})" if isinstance(value, list) else repr(value)
            found = (
                f"{graph_value[:4]}... ({len(graph_value)})"
                if isinstance(graph_value, list)
                else repr(graph_value)
            )
            raise ManifestGraphMismatchError(
                f"{where}: field {field!r} is {shown}, but the graph {manifest.model_file} has "
                f"{found}. The manifest does not describe this graph (edited, or copied from "
                "another export): restore it from the original export, or re-export"
            )


__all__ = ["ManifestGraphMismatchError", "check_manifest", "graph_facts"]
