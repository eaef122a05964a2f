"""Check an export against PyTorch: logits, KL, top-1, greedy continuations, perplexity.

    export dir ─manifest─► onnxruntime session                PyTorch reference
                           (model.onnx; separate mode:        (model passed in, or the base from
                           + one adapters/<name>.onnx_adapter  the manifest + the same adapter,
                           activated per run, or a KV prefix   merged or active), fp32, same contract
                           seeded into the cache)
        prompts (given, or drawn with a fixed seed from the tokenizer's vocabulary), left-padded
            ─► prefill (P = 0) ─► N-1 decode steps (T = 1), both fed the reference's greedy
               tokens (teacher forcing), each with its own cache
            ─► free-running greedy continuation of N tokens on each side
            ─► optional text: one prefill each, perplexity
            ─► each prompt alone (batch 1, unpadded): PyTorch greedy = reference_tokens, ORT's
        ▼
    per graph (merged set: each sub-export; separate: the base, then each adapter file):
        max |Δlogit| (prefill, decode), mean KL(PyTorch || ORT) over positions, top-1
        agreement over positions, greedy continuations equal, perplexity of both,
        reference continuations and how many ORT reproduces at batch 1
        int8/int4 generic graphs: also max |Δlogit| against PyTorch holding the export's own
        dequantized weights (quantization error vs graph error)
        ▼
    VerifyReport ─► verify.json + verify.md (a table) in the export dir

Every graph gets a verdict (`passed`; `edgepeft verify` exits 1 when one fails), by the row of
CRITERIA for its weights (the report prints the rows it used):
    fp32; nf4 / fp4 exact (the base's own     max |Δlogit| relative to the logits' scale, mean
      bitsandbytes codes: base alone or       KL, and every top-1 and greedy token equal
      separate mode, base quantized alike)
    fp16, int8, int4; nf4 / fp4 requantized   mean KL and the share of top-1 tokens that agree
      (merged mode: weights rounded again)    (weights rounded at export: logits move by design)
NaN or inf in either side's logits, or in any metric, fails the graph and says where.

Separate mode: each adapter listed in the manifest is checked against the base with that
adapter loaded and active (edgepeft's hooks, which match HF peft to 0.0):

    LoRA / DoRA / IA3 / bottleneck   entry's `file` (else adapters/<name>.onnx_adapter) activated
                                     through onnxruntime.LoraAdapter + RunOptions
    prompt / prefix tuning           entry's `file` (adapters/<name>.kvprefix.safetensors) seeded
                                     into the cache at prefill (kv_prefix.py: seed_past, rows
                                     re-positioned for left padding), then plain decode steps

The same numbers and judgement apply to both. One case cannot be left padded: a prompt-tuned
prefix on a graph with learned absolute positions (GPT-2, generic): there every prompt is
compared alone, unpadded, at batch 1 (`batched` False in its check).

Reference continuations (verify.json, per graph: `reference_tokens`): for each prompt, the
PyTorch reference's greedy continuation of `max_new_tokens` tokens (no stop token: EOS and
what follows are kept), computed for that prompt ALONE at batch 1 without padding
(`reference_tokens_mode` "per-prompt-batch1-unpadded"). A runtime replaying each prompt
(`prompt_tokens`) at batch 1 must produce exactly these tokens. They are not taken from the
left-padded batch because they can differ from it: peft places prompt-tuned tokens by column,
pads included, and batch-dependent kernels may round differently. `row_greedy_match` counts
the prompts whose onnxruntime greedy continuation, run the same way, equals them. Files
written before these fields existed lack them; `read_report` fills the defaults.


Files, one idea each (criteria, report and adapter_paths load with the package, torch-free;
the rest on first use of check_graph, verify or load_reference):
    criteria.py        CRITERIA, the pass/fail table, and criteria_key
    report.py          GraphCheck, VerifyReport, write_report / read_report
    adapter_paths.py   where a separate export keeps each adapter file
    inputs.py          prompt batches, the perplexity text, unpadded rows
    passes.py          prefill + decode steps on a side, teacher-forced or free
    compare.py         max |Δlogit|, logit scale, KL / top-1, NaN/inf, perplexity
    sides.py           the onnxruntime and PyTorch sides                       (torch)
    dequantized.py     PyTorch holding the export's dequantized weights        (torch)
    reference.py       the PyTorch reference rebuilt from the manifest         (torch)
    check.py           check_graph, verify                                     (torch)
"""

from __future__ import annotations

import importlib

from edgepeft.export.verify.adapter_paths import (
    ADAPTER_DIR,
    ADAPTER_SUFFIX,
    adapter_file,
    is_kv_prefix_file,
)
from edgepeft.export.verify.criteria import BNB4, CRITERIA, REQUANTIZED, Criteria, criteria_key
from edgepeft.export.verify.report import (
    REFERENCE_PER_PROMPT,
    VERIFY_FILE,
    VERIFY_TABLE,
    GraphCheck,
    VerifyReport,
    read_report,
    write_report,
)

_TORCH_SIDE = {
    "check_graph": "edgepeft.export.verify.check",
    "verify": "edgepeft.export.verify.check",
    "load_reference": "edgepeft.export.verify.reference",
}
"""Public names whose modules import torch: resolved on first use."""


def __getattr__(name: str):
    # lazy: keeps `import edgepeft.export.verify` (read_report, CRITERIA) free of torch
    if name not in _TORCH_SIDE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_TORCH_SIDE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_SIDE))


__all__ = [
    "ADAPTER_DIR",
    "ADAPTER_SUFFIX",
    "BNB4",
    "CRITERIA",
    "Criteria",
    "GraphCheck",
    "REFERENCE_PER_PROMPT",
    "REQUANTIZED",
    "VERIFY_FILE",
    "VERIFY_TABLE",
    "VerifyReport",
    "adapter_file",
    "check_graph",
    "criteria_key",
    "is_kv_prefix_file",
    "load_reference",
    "read_report",
    "verify",
    "write_report",
]
