"""Prompt and prefix tuning as KV-cache prefixes, the exporter's side: the prefix out of a model.

    prefix tuning   flat (N, L*2*H*D) ──view──► layer l: K_l, V_l (1, H, N, D)   (as learned)
    prompt tuning   virtual embeddings (1, N, hidden) ──► the model, adapter active,
                    positions 0..N-1 ──► the K_l, V_l every layer caches
         │
         ▼  export_kv_prefix ──► adapters/<name>.kvprefix.safetensors

Prefix keys are used as learned (they act as rotated by position 0); prompt keys are cached
at 0..N-1. The file format (`edgepeft.artifacts.kv_prefix`) and how a prefix seeds a graph's
cache in either position frame (`edgepeft.artifacts.kv_seed`) are torch-free, for the device
runtime; their names stay importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from edgepeft.adapters import peft_types
from edgepeft.adapters.inject import list_adapters
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.prompt import ATTRIBUTE
from edgepeft.artifacts.files import sha256_file
from edgepeft.artifacts.kv_prefix import (  # noqa: F401  (re-exported: the old import path)
    FORMAT,
    FORMAT_VERSION,
    KIND,
    LAYOUT,
    KVPrefix,
    kv_prefix_path,
    read_kv_prefix_file,
    write_kv_prefix_file,
)
from edgepeft.artifacts.kv_seed import (  # noqa: F401  (re-exported: the old import path)
    GRAPH_KINDS,
    POSITIONS,
    DecodeState,
    decode_step,
    greedy_with_prefix,
    prefill_with_prefix,
    run_with_prefix,
    seed_past,
)
from edgepeft.base import fingerprint
from edgepeft.finite import check_finite
from edgepeft.kv_cache_keyword import output_cache
from edgepeft.vocab import ADAPTERS_FOLDER, KV_PREFIX_SUFFIX

KV_PREFIX_PEFT_TYPES = peft_types(separate_file="kv_prefix")
"""Adapter methods shipped as KV prefixes rather than graph inputs."""
SUFFIX = KV_PREFIX_SUFFIX
ADAPTERS_DIR = ADAPTERS_FOLDER
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


# ---------------------------------------------------------------- the adapter's cache prefix


def _virtual_tokens(model, adapter_name: str):
    """(the model's VirtualTokens module, the adapter's plan); errors name what is wrong."""
    adapters = list_adapters(model)
    if adapter_name not in adapters:
        have = ", ".join(adapters) or "none"
        raise KeyError(f"no adapter named {adapter_name!r} on this model (adapters: {have})")
    module = getattr(model, ATTRIBUTE, None)
    if module is None or adapter_name not in module.plans:
        raise ValueError(
            f"adapter {adapter_name!r} is {adapters[adapter_name].peft_type}; a KV prefix is made "
            "from prompt or prefix tuning adapters only (merge or export the others as graphs)"
        )
    return module, module.plans[adapter_name]


def has_kv_prefix(model, adapter_name: str) -> bool:
    """Whether adapter `adapter_name` on `model` has a prompt or prefix part (a KV prefix)."""
    module = getattr(model, ATTRIBUTE, None)
    return module is not None and adapter_name in module.plans


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _inv_freq(model, layer: int) -> np.ndarray | None:
    """The rotary frequencies (rotary_dim / 2,) layer `layer` rotates by; None: no rotary."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return None
    rope_type = rotary.rope_type
    prefix = ""
    if isinstance(rope_type, dict):  # per layer type (gemma3: local and global rotary)
        layer_type = _text_config(model).layer_types[layer]
        rope_type, prefix = rope_type[layer_type], f"{layer_type}_"
    if rope_type not in _STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} changes its frequencies with the sequence length, so a "
            f"cached prefix cannot be re-positioned; supported: {sorted(_STATIC_ROPE_TYPES)}"
        )
    return getattr(rotary, f"{prefix}inv_freq").detach().float().cpu().numpy()


def _prefix_keys_values(module, name: str, plan) -> list[tuple]:
    """Per layer (K, V), each (1, H, N, D): peft's flat layout (layer, key|value, head, dim)."""
    n, layers, heads, head_dim = (
        plan.num_virtual_tokens,
        plan.num_layers,
        plan.kv_heads,
        plan.head_dim,
    )
    with torch.no_grad():
        kv = module.flat(name).detach().float().view(n, layers, 2, heads, head_dim)
        kv = kv.permute(1, 2, 3, 0, 4)  # (L, 2, H, N, D)
        return [(kv[i, 0][None], kv[i, 1][None]) for i in range(layers)]


def _prompt_keys_values(model, module, name: str) -> list[tuple]:
    """Per layer (K, V) (1, H, N, D) that the model caches for the N virtual tokens.

    The model runs as it is with `name` active, except that the virtual tokens are fed
    as inputs_embeds themselves (the hook that prepends them is paused), at positions
    0..N-1 under a full mask, as the hook places them. Every module's active adapter is
    put back afterwards; no requires_grad flag changes.
    """
    modules = [m for _, m in adapter_modules(model)]
    before = [m.active for m in modules]
    for m in modules:
        m.set_active(name)  # a module without `name` becomes inactive, as set_adapter does
    module.set_active(None)  # the prompts go in as inputs below, not through the hook
    try:
        embeds = model.get_input_embeddings()
        prompts = module.flat(name).detach().to(embeds.weight.dtype)[None]  # (1, N, hidden)
        n = prompts.shape[1]
        with torch.no_grad():
            out = model(
                inputs_embeds=prompts,
                attention_mask=torch.ones(1, n, dtype=torch.long, device=prompts.device),
                position_ids=torch.arange(n, device=prompts.device)[None],
                use_cache=True,
            )
    finally:
        for m, active in zip(modules, before, strict=True):
            m.active = active
    pairs = [(layer.keys.float(), layer.values.float()) for layer in output_cache(out).layers]
    if any(keys.shape[2] != n for keys, _ in pairs):
        raise NotImplementedError(
            f"adapter {name!r}: a layer cached fewer than its {n} virtual tokens (a sliding "
            "window shorter than the prompt); such a prompt has no KV prefix"
        )
    return pairs


def kv_prefix_tensors(model, adapter_name: str) -> dict[str, np.ndarray]:
    """The cache prefix of a prompt or prefix tuning adapter, in PyTorch's (peft's) frame.

    Args:
        model: An edgepeft model holding adapter `adapter_name` (prompt or prefix tuning);
            it is left as it was (active adapter included).
        adapter_name: The adapter to turn into cache entries.

    Returns:
        "past_key_values.{i}.key" / ".value": (1, n_kv, N, head_dim) float32 per layer, keys
        in the frame PyTorch caches them (see the module docstring), and, for rotary
        models, "rotary.{i}.inv_freq": (rotary_dim / 2,) float32, so a runtime can move
        keys to a graph's frame (`seed_past`).
    """
    module, plan = _virtual_tokens(model, adapter_name)
    if plan.method == "prefix":
        pairs = _prefix_keys_values(module, adapter_name, plan)
    else:
        pairs = _prompt_keys_values(model, module, adapter_name)
    tensors: dict[str, np.ndarray] = {}
    for i, (keys, values) in enumerate(pairs):
        tensors[f"past_key_values.{i}.key"] = np.ascontiguousarray(keys.cpu().numpy(), np.float32)
        tensors[f"past_key_values.{i}.value"] = np.ascontiguousarray(
            values.cpu().numpy(), np.float32
        )
        inv_freq = _inv_freq(model, i)
        if inv_freq is not None:
            tensors[f"rotary.{i}.inv_freq"] = np.ascontiguousarray(inv_freq, np.float32)
    return tensors


def export_kv_prefix(
    model, adapter_name: str, out_dir: str | os.PathLike, source: str = ""
) -> dict:
    """Write out_dir/adapters/<name>.kvprefix.safetensors; returns its manifest entry.

    The adapter must be on `model` (loaded or trained); nothing of `model` changes.

    Returns:
        AdapterEntry's fields as separate mode fills them: "name", "peft_type", "source",
        "fingerprint" (the base's, which the file is bound to), "kind" ("kv_prefix"),
        "file" (relative to out_dir), "sha256" (of the file); plus "method" ("prefix" |
        "prompt") and "num_virtual_tokens", which the file's metadata also holds.
    """
    _, plan = _virtual_tokens(model, adapter_name)
    tensors = kv_prefix_tensors(model, adapter_name)
    base_fp = fingerprint(model)
    path = kv_prefix_path(out_dir, adapter_name)
    check_finite(tensors, adapter=adapter_name, file=f"{path} (not written)")
    write_kv_prefix_file(path, tensors, base_fp, {"adapter": adapter_name, "method": plan.method})
    return {
        "name": adapter_name,
        "peft_type": list_adapters(model)[adapter_name].peft_type,
        "source": source,
        "fingerprint": base_fp,
        "kind": KIND,
        "file": path.relative_to(Path(out_dir)).as_posix(),
        "sha256": sha256_file(path),
        "method": plan.method,
        "num_virtual_tokens": plan.num_virtual_tokens,
    }


__all__ = [
    "KVPrefix",
    "DecodeState",
    "POSITIONS",
    "decode_step",
    "export_kv_prefix",
    "greedy_with_prefix",
    "has_kv_prefix",
    "kv_prefix_path",
    "kv_prefix_tensors",
    "prefill_with_prefix",
    "read_kv_prefix_file",
    "run_with_prefix",
    "seed_past",
    "write_kv_prefix_file",
]
