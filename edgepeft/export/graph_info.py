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
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most IR 13.
IR_VERSION = 10

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
KV_DTYPES = ("float32", "float16")


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")
    ]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
