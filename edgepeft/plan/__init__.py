"""Will it fit, and how fast? Memory and decode speed of an export on a device, from shapes.

    MODEL (folder or config.json) ──json + CONFIG_DEFAULTS──► ModelShape (no weights read,
                                    no transformers: the bare install plans)    shape.py
    DEVICE ──edgepeft.devices.load_profile──► DeviceProfile (budget, bandwidth, efficiency)
        │
        ▼  per weight format, as the fused exporter stores it (export/fused.py, weights.py)
    file bytes     decoder linears, embeddings / lm_head, norms, rotary tables   weights.py
        ▼  as onnxruntime holds them (accelerator "cpu" or "cuda")
    resident + KV cache + activations + adapters + runtime ─► peak vs budget ─► fits, margin
    decode tok/s = efficiency x bandwidth / bytes read per token                budget.py
    recipe: a shipped recipe (edgepeft/data/recipes/*.toml) for this accelerator, first in
            the device's format preference that fits, with the longest context  recipes.py
    plan(model, device) ──► Plan ──str()──► the table (text.py); .to_dict() ──► JSON
                                                                                planner.py

`--train` switches to edgepeft.train.memory (the training planner, training.py) on the
device's torch_device; cli.py is `edgepeft plan`. The memory model was checked against
onnxruntime 1.31 on x86-64 Linux (scripts/bench_plan.py measures it: RSS and tok/s against
these predictions). Everything here but plan_training is torch-free.
"""

from __future__ import annotations

from edgepeft.plan.budget import (
    DEFAULT_CONTEXT,
    DEFAULT_PREFILL,
    FAULT_AROUND,
    KV_STEP,
    PER_NODE_S,
    STEP_OVERHEAD_S,
    FormatPlan,
    activation_bytes,
    decode_tok_s,
    kv_capacity,
    kv_position_bytes,
    largest_linear_bytes,
    plan_format,
    resident_bytes,
    step_seconds,
    touched_bytes,
)
from edgepeft.plan.cli import add_parser
from edgepeft.plan.planner import Plan, plan
from edgepeft.plan.recipes import (
    Recipe,
    Recommendation,
    largest_context,
    recommend,
    shipped_recipes,
)
from edgepeft.plan.shape import (
    CONFIG_DEFAULTS,
    FUSED_ARCHS,
    ModelShape,
    load_config,
    model_shape,
    read_config,
)
from edgepeft.plan.text import compact_size, render, render_training
from edgepeft.plan.training import plan_training
from edgepeft.plan.weights import (
    ALIGNMENT,
    BNB4_BLOCK,
    EXTERNAL_THRESHOLD,
    FORMATS,
    ROTARY_CACHE_LIMIT,
    Part,
    data_file_bytes,
    file_bytes,
    nbits_tensor_bytes,
    tensor_bytes,
    weight_parts,
)

__all__ = [
    "ALIGNMENT",
    "BNB4_BLOCK",
    "CONFIG_DEFAULTS",
    "DEFAULT_CONTEXT",
    "DEFAULT_PREFILL",
    "EXTERNAL_THRESHOLD",
    "FAULT_AROUND",
    "FORMATS",
    "FUSED_ARCHS",
    "KV_STEP",
    "PER_NODE_S",
    "ROTARY_CACHE_LIMIT",
    "STEP_OVERHEAD_S",
    "FormatPlan",
    "ModelShape",
    "Part",
    "Plan",
    "Recipe",
    "Recommendation",
    "activation_bytes",
    "add_parser",
    "compact_size",
    "data_file_bytes",
    "decode_tok_s",
    "file_bytes",
    "kv_capacity",
    "kv_position_bytes",
    "largest_context",
    "largest_linear_bytes",
    "load_config",
    "model_shape",
    "nbits_tensor_bytes",
    "plan",
    "plan_format",
    "plan_training",
    "read_config",
    "recommend",
    "render",
    "render_training",
    "resident_bytes",
    "shipped_recipes",
    "step_seconds",
    "tensor_bytes",
    "touched_bytes",
    "weight_parts",
]
