"""The contract every exported decoder graph keeps, whichever builder wrote it.

    input_ids                  (B, T)          int64
    attention_mask             (B, P+T)        int64   1 = token, 0 = padding (left)
    past_key_values.{i}.key    (B, n_kv, P, d) kv_dtype      i = 0 .. num_layers-1, also .value
        ──► decoder graph ──►
    logits                     (B, T, V)       float32
    present.{i}.key            (B, n_kv, P+T, d) kv_dtype    also .value

Batch, sequence and past are dynamic (P may be 0). The graph lives in
`model.onnx` with its weights in `model.onnx.data` beside it. Builders report what they
wrote as `edgepeft.export.fused.GraphInfo`.

In separate mode the fused graph keeps sibling projections packed (PACKED_PROJECTIONS), so
adapter inputs are named after the packed module (`model.layers.0.self_attn.qkv_proj.lora_A`);
see export/packed_adapters.py.
"""

from __future__ import annotations

from edgepeft.vocab import FLOAT_FORMATS, NBITS

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most IR 13.
IR_VERSION = 10

GRAPH_WEIGHT_FORMATS = (*FLOAT_FORMATS, *sorted(NBITS, key=NBITS.get, reverse=True))
"""("fp32", "fp16", "int8", "int4"), widest first: the float and MatMulNBits formats both
builders write (the fused builder also takes vocab.BNB4_FORMATS)."""
KV_DTYPES = ("float32", "float16")

PACKED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    # the packed module the fused graph emits -> its members, in row order (fused.py)
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
"""Sibling projections a separate-mode graph exposes as one adapter input each."""


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")
    ]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


__all__ = [
    "DATA_FILE",
    "GRAPH_WEIGHT_FORMATS",
    "IR_VERSION",
    "KV_DTYPES",
    "MODEL_FILE",
    "PACKED_PROJECTIONS",
    "input_names",
    "output_names",
]
