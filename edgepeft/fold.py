"""Fold one adapter into one base module: the per-module math of merge and of streamed export.

    model ──walk_stacks──► AdapterStack per wrapped module (innermost paths first)
        │ merge_plan(model, name): which wrapper of each stack holds adapter `name`;
        │ raises MergeError (nothing changed) when it cannot be merged
        ▼
    stack_update(stack, name)      the holder's fp32 merge_update, checked finite
        ▼
    build_folded(inner, values, FoldTarget)  ──► the module replacing the stack
        quant "none"            nn.Linear / GPT-2 Conv1D in the target's compute dtype
        "nf4" / "fp4" / "int8"  bitsandbytes layer quantized from W + ΔW
        "int4" (int4 base)      the same codes and scales, ΔW in float zero points: exact for
                                an update constant per block (QA-LoRA), refused otherwise
        norms, bias-only        a copy of the module with those parameters replaced

`merge` (merge.py) applies this to a whole model, measuring and undoing it; the streamed
exporter (export/stream.py) applies it one decoder layer at a time while it reads the
checkpoint. Both give the same tensors, so their graphs are byte-identical, and both name
the merged base with `merged_fingerprint`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, replace

import torch
from torch import nn

from edgepeft.adapters.inject import list_adapters
from edgepeft.adapters.layer import AdapterLayer, AdapterModule
from edgepeft.adapters.saved_modules import ModulesToSaveLayer
from edgepeft.base import (
    Int4Linear,
    base_info,
    dequantized_weight,
    is_conv1d_origin,
    is_linear_like,
    is_quantized,
    quantized_linear,
)
from edgepeft.config import config_to_dict


class MergeError(ValueError):
    """The adapter cannot be merged into this model (nothing was changed)."""


# ---------------------------------------------------------------- where the adapter lives


@dataclass(frozen=True)
class AdapterStack:
    """The wrappers at one module path, outermost first, and the one holding the adapter."""

    path: str
    """Real path (with ".base_layer" segments) for set_submodule."""
    name: str
    """The base module's own name, for people."""
    wrappers: tuple[AdapterLayer, ...]
    holder: AdapterLayer | None = None

    @property
    def innermost(self) -> nn.Module:
        return self.wrappers[0].innermost()


@dataclass(frozen=True)
class MergePlan:
    """Every wrapper stack of a model, with the holder of one adapter set where it has one."""

    stacks: tuple[AdapterStack, ...]
    model_level: tuple[AdapterModule, ...]


def walk_stacks(model: nn.Module) -> tuple[list[AdapterStack], list[AdapterModule]]:
    """Every wrapper stack (innermost paths first, no holder set) and every model-level adapter."""
    stacks: list[AdapterStack] = []
    model_level: list[AdapterModule] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterLayer):
                wrappers, inner_path, inner = [], path, child
                while isinstance(inner, AdapterLayer):
                    wrappers.append(inner)
                    inner, inner_path = inner.base_layer, f"{inner_path}.base_layer"
                walk(inner, inner_path)  # nested stacks first: the outer one may hold them
                stacks.append(AdapterStack(path, path.replace(".base_layer", ""), tuple(wrappers)))
            elif isinstance(child, AdapterModule):
                model_level.append(child)
            else:
                walk(child, path)

    walk(model, "")
    return stacks, model_level


def merge_plan(model: nn.Module, name: str) -> MergePlan:
    """Where adapter `name` lives; raises MergeError before anything changes."""
    if name not in list_adapters(model):
        have = ", ".join(list_adapters(model)) or "none"
        raise MergeError(f"no adapter named {name!r} on this model (adapters: {have})")
    stacks, model_level = walk_stacks(model)
    for module in model_level:
        if name in module:
            raise MergeError(
                f"adapter {name!r} is a {module.peft_type} adapter (a model-level soft prompt or "
                "prefix): it adds inputs rather than changing weights, so it cannot be merged. "
                "Keep the adapter separate (edgepeft export supports that)."
            )
    planned = []
    for stack in stacks:
        holders = [w for w in stack.wrappers if name in w]
        if len(holders) > 1:
            kinds = ", ".join(w.peft_type for w in holders)
            raise MergeError(
                f"adapter {name!r} has several modules stacked on {stack.name} ({kinds}); merge "
                "supports one per layer"
            )
        if holders:
            holder = holders[0]
            if not (holder.mergeable or isinstance(holder, ModulesToSaveLayer)):
                raise MergeError(
                    f"adapter {name!r} cannot be merged: its {holder.peft_type} module on "
                    f"{stack.name} is not a change of the base weights. Keep the adapter "
                    "separate (edgepeft export supports that)."
                )
            stack = replace(stack, holder=holder)
        planned.append(stack)
    if not any(stack.holder is not None for stack in planned):
        raise MergeError(f"adapter {name!r} is registered on the model but no module holds it")
    return MergePlan(tuple(planned), tuple(model_level))


def merged_fingerprint(model: nn.Module, name: str, plan: MergePlan | None = None) -> str:
    """The base fingerprint of `model` with adapter `name` merged, computed before merging.

    Derived from the base's fingerprint, the adapter's config and its tensors,
    deterministically, so a streamed export names the merged base as `merge` does.
    """
    plan = plan or merge_plan(model, name)
    h = hashlib.sha256(f"{base_info(model).fingerprint}|merge|".encode())
    config = list_adapters(model)[name]
    h.update(json.dumps(config_to_dict(config), sort_keys=True, default=str).encode())
    tensors = {}
    for stack in plan.stacks:
        if stack.holder is not None:
            for local, tensor in stack.holder.tensors(name).items():
                tensors[f"{stack.name}.{local}"] = tensor
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        h.update(f"{key}:{tuple(tensor.shape)}".encode())
        h.update(tensor.to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def stack_update(stack: AdapterStack, name: str) -> dict[str, torch.Tensor]:
    """The holder's fp32 values for the innermost module, checked finite."""
    with torch.no_grad():
        values = stack.holder.merge_update(name)
    for key, value in values.items():
        if not torch.isfinite(value).all():
            raise MergeError(
                f"adapter {name!r} gives non-finite values (NaN/inf) for {stack.name}.{key} "
                f"({stack.holder.peft_type}); its tensors on that layer are corrupt: retrain or "
                "reload the adapter. The model was left unchanged."
            )
    return values


# ---------------------------------------------------------------- building the new module


def layer_storage(module: nn.Module) -> str:
    """How a layer holds its weight: "none" (full precision), "nf4", "fp4" or "int8"."""
    if not is_quantized(module):
        return "none"
    weight = module.weight
    return weight.quant_type if hasattr(weight, "quant_type") else "int8"


@dataclass(frozen=True)
class FoldTarget:
    """What the merged model's layers become."""

    quant: str
    base_quant: str
    double_quant: bool
    dtype: torch.dtype
    head: nn.Module | None
    """The output head: kept full precision over a quantized base, as load_base does."""

    def storage_for(self, module: nn.Module) -> str:
        if self.quant == "none" or not is_linear_like(module):
            return "none"
        if is_quantized(module) or (self.base_quant == "none" and module is not self.head):
            return self.quant
        return "none"  # deliberately full precision in a quantized base (e.g. lm_head)


def _plain_linear(weight, bias, conv1d: bool, dtype, device) -> nn.Module:
    """A full-precision layer computing x @ weight^T + bias; weight is (out, in)."""
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_f, in_f)
        layer.weight = nn.Parameter(weight.t().to(device=device, dtype=dtype).contiguous())
        # Conv1D always adds a bias.
        bias = bias if bias is not None else torch.zeros(out_f)
    else:
        layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
    return layer


def _with_params(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `module` with the named parameters replaced (in their original dtype)."""
    new = copy.deepcopy(module)
    for key, value in values.items():
        owner_name, _, pname = key.rpartition(".")
        owner = new.get_submodule(owner_name) if owner_name else new
        old = getattr(owner, pname)
        setattr(owner, pname, nn.Parameter(value.to(device=old.device, dtype=old.dtype).clone()))
    return new


def _int4_folded(inner: nn.Module, weight: torch.Tensor, bias) -> Int4Linear:
    """An int4 base layer with `weight` folded into its zero points (Int4Linear.with_weight)."""
    if not isinstance(inner, Int4Linear):
        raise MergeError(
            "merge(quant='int4') keeps an int4 base's own codes (load_base(quant='int4')); "
            f"this layer is a {type(inner).__name__}. Merge with quant='none' instead"
        )
    if bias is not inner.bias:  # the adapter's merge_update gave a new bias
        raise MergeError("merge(quant='int4') cannot change an int4 layer's bias")
    try:
        return inner.with_weight(weight)
    except ValueError as e:
        raise MergeError(
            f"int4 layer ({inner.extra_repr()}): {e}. Train with LoraConfig(use_qalora=True, "
            "qalora_group_size=<the base's block size>) on 4-bit layers, or merge with "
            "quant='none' (the export then rounds the merged weights again)"
        ) from e


def build_folded(
    inner: nn.Module, values: dict[str, torch.Tensor], target: FoldTarget
) -> tuple[nn.Module, str, dict[str, torch.Tensor]]:
    """The module replacing `inner` once `values` (fp32, linear weight (out, in)) are folded in.

    Returns (module, storage, the values it should compute with): a layer rebuilt
    in another storage is also measured on its unchanged weight.
    """
    storage = target.storage_for(inner)
    if not is_linear_like(inner) or ("weight" not in values and storage == layer_storage(inner)):
        # Norms, or a bias-only change: re-rounding an untouched quantized weight would add error.
        new = _with_params(inner, values)
    else:
        weight = values["weight"] if "weight" in values else dequantized_weight(inner)
        values = {**values, "weight": weight}
        bias = values.get("bias", inner.bias)
        device = inner.weight.device
        conv1d = is_conv1d_origin(inner)
        if storage == "int4":
            new = _int4_folded(inner, weight, bias)
        elif storage == "none":
            new = _plain_linear(weight, bias, conv1d, target.dtype, device)
        else:
            new = quantized_linear(weight, bias, storage, target.double_quant, target.dtype, device)
            if conv1d:
                new.edgepeft_conv1d = True  # keeps GPT-2's layout known for later merges
    new.train(inner.training)
    for p in new.parameters():
        p.requires_grad_(False)
    return new, storage, values


__all__ = [
    "AdapterStack",
    "FoldTarget",
    "MergeError",
    "MergePlan",
    "build_folded",
    "layer_storage",
    "merge_plan",
    "merged_fingerprint",
    "stack_update",
    "walk_stacks",
]
