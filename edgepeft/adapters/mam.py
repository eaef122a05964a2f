"""The MAM adapter (He et al., 2022; AdapterHub's `MAMConfig`): two parts, one adapter.

    attention   prefix tuning: N = 30 learned key/value positions per layer, trained through
                Embedding (N, kv_dim) ─► Linear (kv_dim → 800) ─► Tanh ─► Linear (→ L*2*kv_dim)
                (prompt.py's prefix, under the adapter's name)
    FFN         parallel adapter: y' = mlp(x) + 4.0 * up(relu(down(h))), width hidden // 2
                (parallel.py's ParallelLayer, under the same name)

Both parts are added, switched, trained and deleted together (one name in every module
that holds a part), and saved in one folder:

    adapter_config.json  {"peft_type": "MAM", "num_virtual_tokens": 30,
                          "prefix_bottleneck": 800, "reduction_factor": 2, "scaling": 4.0,
                          "activation": "relu", "token_dim", "num_layers", ...}
    adapter_model.safetensors
        prompt_embeddings                                    (N, L*2*kv_dim): the MLP's output
        base_model.model.model.layers.<i>.mlp.adapter_{down,up}.{weight,bias}

As for prefix tuning, only the prefix MLP's output is saved; a loaded MAM adapter holds it
as a plain tensor. Separate mode ships the parts as two files under the adapter's name (an
.onnx_adapter for the parallel branch, a .kvprefix.safetensors for the prefix); the runtime
loads them as one adapter. Neither part changes a weight: merging raises.

Where this differs from AdapterHub (adapters 1.3.0; tests/test_adapterhub_reference.py):
the input runs at positions N..N+T-1 after the prefix (peft's, what the KV cache holds),
AdapterHub's at 0..T-1; prefix keys are not rotated, so each query-prefix score
(R(pos) q) . k_p differs (equal when AdapterHub is given position_ids = N + t). The prefix
MLP reads (N, kv_heads * head_size) embeddings, AdapterHub's (N, hidden): the same width
without grouped-query attention. Both give one key/value per key/value head.
"""

from __future__ import annotations

import dataclasses

from torch import nn

import edgepeft.adapters.parallel as parallel
import edgepeft.adapters.prompt as prompt
from edgepeft.adapters.layer import MethodSpec
from edgepeft.config import MAMConfig, PrefixTuningConfig


def prefix_part(config: MAMConfig) -> PrefixTuningConfig:
    """The prefix-tuning config of MAM's attention part."""
    return PrefixTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        projection=True,
        projection_hidden=config.prefix_bottleneck,
        token_dim=config.token_dim,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
    )


def resolve(model: nn.Module, config: MAMConfig) -> MAMConfig:
    """The config checked, with the prefix's model facts filled in."""
    parallel.check(config)
    width = config.prefix_bottleneck
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"MAMConfig.prefix_bottleneck must be a positive int, got {width!r}")
    facts = prompt.resolve_prefix(model, prefix_part(config))
    return dataclasses.replace(
        config,
        scaling=float(config.scaling),
        token_dim=facts.token_dim,
        num_layers=facts.num_layers,
        num_attention_heads=facts.num_attention_heads,
    )


def inject(model: nn.Module, config: MAMConfig, name: str) -> list[str]:
    """Add both parts of adapter `name`; returns the modules holding them."""
    return [
        *prompt.inject_prefix(model, prefix_part(config), name),
        *parallel.inject(model, config, name),
    ]


def to_peft(config: MAMConfig) -> dict:
    return {
        **prompt.common_to_peft(config),
        "prefix_bottleneck": config.prefix_bottleneck,
        **parallel.to_peft(config),
    }


def from_peft(data: dict) -> MAMConfig:
    prompt.check_common_peft(data)
    for key in ("num_virtual_tokens", "prefix_bottleneck", "reduction_factor", "scaling"):
        if key not in data:
            raise ValueError(f"MAM adapter config has no {key!r} field")
    config = MAMConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        prefix_bottleneck=int(data["prefix_bottleneck"]),
        reduction_factor=data["reduction_factor"],
        scaling=float(data["scaling"]),
        activation=data.get("activation", "relu"),
        init=data.get("init", "zeros"),
        token_dim=prompt.optional_int(data, "token_dim"),
        num_layers=prompt.optional_int(data, "num_layers"),
        num_attention_heads=prompt.optional_int(data, "num_attention_heads"),
    )
    parallel.check(config)
    return config


METHOD = MethodSpec(
    config_cls=MAMConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=False,
    # The parallel branch's graph inputs; the prefix goes beside it as a .kvprefix file of
    # the same name (export/separate.py), which the runtime loads with it.
    separate_file="onnx_adapter",
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("mam",),
)
