"""Fold one adapter into its base: measured, optionally re-quantized, exactly undoable.

    adapted model ──check every module holding the adapter is mergeable (nothing changed on failure)
        │ one wrapper stack at a time, so one fp32 layer is in memory beyond the model
        ▼
    dequantized W (fp32) ──merge_update──► W + ΔW ──finite?──► new layer
        quant "none"            nn.Linear / GPT-2 Conv1D in the model's compute dtype
        "nf4" / "fp4" / "int8"  bitsandbytes layer re-quantized from W + ΔW
        modules_to_save         the adapter's trained copy swapped in
        other adapters          dropped (their wrappers give back the base module)
        ▼
    plain HF model, model.edgepeft_merged = [...], new edgepeft_base fingerprint
    MergeReport: per layer ||W_eff - (W + ΔW)|| / ||W + ΔW||, max |Δ logit| on a sample batch

`merge(..., inplace=True)` keeps the replaced wrappers, so `unmerge` puts them back
bit for bit. Methods take part only through the adapter protocol (`mergeable`,
`merge_update`, `model_level`, modules_to_save `copies`), never by class. The per-module
math (which wrapper holds the adapter, W + ΔW, the new layer) is fold.py's, shared with the
streamed exporter; this module applies it to a whole model, measures it and undoes it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from edgepeft.adapters.inject import list_adapters
from edgepeft.adapters.layer import AdapterLayer, AdapterModule
from edgepeft.adapters.saved_modules import ModulesToSaveLayer
from edgepeft.base import base_info, dequantized_weight, is_linear_like, set_submodule
from edgepeft.fold import (
    FoldTarget,
    MergeError,
    MergePlan,
    build_folded,
    layer_storage,
    merge_plan,
    merged_fingerprint,
    stack_update,
)
from edgepeft.vocab import BNB4_FORMATS, QUANTS

log = logging.getLogger("edgepeft")

SAMPLE_SHAPE = (2, 16)
_SAMPLE_SEED = 0
_TABLE_ROWS = 12


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerMerge:
    """One rewritten module: how far what it computes is from W + ΔW."""

    name: str
    method: str
    storage: str
    """"none" (full precision), "nf4", "fp4" or "int8"."""
    rel_weight_error: float
    """||W_eff - (W + ΔW)||_F / ||W + ΔW||_F over every parameter the merge rewrote."""


@dataclass(frozen=True)
class MergeReport:
    adapter: str
    quant: str
    layers: tuple[LayerMerge, ...] = ()
    max_abs_logit_delta: float = 0.0
    """max |logits(merged) - logits(adapted, unmerged)| on the sample batch."""
    sample_shape: tuple[int, ...] = ()
    dropped_adapters: tuple[str, ...] = ()
    converted_layers: int = 0
    """Layers the adapter does not touch whose storage changed to match `quant`."""
    fingerprint: str = ""
    already_merged: bool = False

    @property
    def max_rel_weight_error(self) -> float:
        return max((row.rel_weight_error for row in self.layers), default=0.0)

    @property
    def mean_rel_weight_error(self) -> float:
        if not self.layers:
            return 0.0
        return sum(row.rel_weight_error for row in self.layers) / len(self.layers)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [asdict(row) for row in self.layers]
        out["sample_shape"] = list(self.sample_shape)
        out["dropped_adapters"] = list(self.dropped_adapters)
        out["max_rel_weight_error"] = self.max_rel_weight_error
        out["mean_rel_weight_error"] = self.mean_rel_weight_error
        return out

    def __str__(self) -> str:
        if self.already_merged:
            return f"adapter {self.adapter!r} is already merged into this model; nothing done"
        lines = [
            f"merged adapter {self.adapter!r} into {len(self.layers)} modules (quant {self.quant})"
        ]
        width = max([len(r.name) for r in self.layers] + [5])
        lines.append(f"  {'layer':<{width}}  {'method':<15} {'storage':<7} rel. weight error")
        worst = sorted(self.layers, key=lambda r: -r.rel_weight_error)[:_TABLE_ROWS]
        for row in sorted(worst, key=self.layers.index):
            lines.append(
                f"  {row.name:<{width}}  {row.method:<15} {row.storage:<7} {row.rel_weight_error:.2e}"
            )
        if len(self.layers) > len(worst):
            lines.append(f"  ... {len(self.layers) - len(worst)} more (the worst are shown)")
        lines.append(
            f"max rel. weight error {self.max_rel_weight_error:.2e}, mean "
            f"{self.mean_rel_weight_error:.2e}; max |delta logit| {self.max_abs_logit_delta:.3e} "
            f"on a {tuple(self.sample_shape)} batch"
        )
        if self.converted_layers:
            storage = "full precision" if self.quant == "none" else self.quant
            lines.append(
                f"{self.converted_layers} layers the adapter does not touch converted to {storage}"
            )
        if self.dropped_adapters:
            lines.append(f"dropped adapters: {', '.join(self.dropped_adapters)}")
        return "\n".join(lines)


# ---------------------------------------------------------------- measuring


def _effective(module: nn.Module, key: str) -> torch.Tensor:
    """What `module` computes with for parameter `key`, as fp32 (linear weight as (out, in))."""
    if key == "weight" and is_linear_like(module):
        return dequantized_weight(module)
    return module.get_parameter(key).detach().float()


def _relative_error(module: nn.Module, values: dict[str, torch.Tensor]) -> float:
    diff = norm = 0.0
    for key, wanted in values.items():
        wanted = wanted.float()
        got = _effective(module, key).to(wanted.device).reshape(wanted.shape)
        diff += float(torch.sum((got - wanted) ** 2))
        norm += float(torch.sum(wanted**2))
    return (diff / norm) ** 0.5 if norm > 0 else diff**0.5


# ---------------------------------------------------------------- applying


@dataclass
class _Undo:
    """What `unmerge` needs to put an inplace merge back exactly."""

    replaced: list[tuple[str, nn.Module]] = field(default_factory=list)
    detached: list[AdapterModule] = field(default_factory=list)
    attributes: dict[str, object] = field(default_factory=dict)
    tie_word_embeddings: bool | None = None

    def restore(self, model: nn.Module) -> None:
        for path, old in reversed(self.replaced):
            set_submodule(model, path, old)
        for module in self.detached:
            module.attach_to(model)
        for attr, value in self.attributes.items():
            if value is _MISSING:
                if attr in model.__dict__:
                    delattr(model, attr)
            else:
                setattr(model, attr, value)
        if self.tie_word_embeddings is not None:
            _set_tie(model, self.tie_word_embeddings)


_MISSING = object()
_MODEL_ATTRS = ("edgepeft_adapters", "edgepeft_active", "edgepeft_base", "edgepeft_merged")


def _swap(model: nn.Module, path: str, new: nn.Module, undo: _Undo | None) -> None:
    if undo is not None:
        undo.replaced.append((path, model.get_submodule(path)))
    set_submodule(model, path, new)


def _apply(model: nn.Module, plan: MergePlan, name: str, target: FoldTarget, undo: _Undo | None):
    """Replace every stack and convert untouched layers; returns (rows, converted count)."""
    rows: list[LayerMerge] = []
    done: set[int] = set()  # replaced and new modules: their storage is settled
    for stack in plan.stacks:
        inner = stack.innermost
        holder = stack.holder
        if holder is None:
            _swap(model, stack.path, inner, undo)  # another adapter's wrapper: dropped
            continue
        if isinstance(holder, ModulesToSaveLayer):
            trained = holder.copies[name]
            # Keep the kept wrapper's copy apart from the merged model's module.
            new = copy.deepcopy(trained) if undo is not None else trained
            new.train(inner.training)
            for p in new.parameters():
                p.requires_grad_(False)
            rows.append(LayerMerge(stack.name, holder.peft_type, layer_storage(new), 0.0))
        else:
            values = stack_update(stack, name)
            new, storage, wanted = build_folded(inner, values, target)
            rows.append(
                LayerMerge(stack.name, holder.peft_type, storage, _relative_error(new, wanted))
            )
            del wanted
            del values
        done.update((id(inner), id(new)))
        _swap(model, stack.path, new, undo)
    converted = 0
    for path, module in list(model.named_modules()):
        if id(module) in done or not is_linear_like(module):
            continue
        storage = target.storage_for(module)
        if storage != layer_storage(module):
            new, _, _ = build_folded(module, {"weight": dequantized_weight(module)}, target)
            _swap(model, path, new, undo)
            converted += 1
    return rows, converted


# ---------------------------------------------------------------- model-wide bookkeeping


def _set_tie(model: nn.Module, value: bool) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = value


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    def base(module):
        return module.innermost() if isinstance(module, AdapterLayer) else module

    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        base(inputs) if inputs is not None else None,
        base(outputs) if outputs is not None else None,
    )


@contextmanager
def _running(model: nn.Module, active: str | None) -> Iterator[None]:
    """Eval mode with adapter `active` on, without touching requires_grad; all restored after."""
    modes = {id(m): m.training for m in model.modules()}
    modules = [m for m in model.modules() if isinstance(m, AdapterModule)]
    previous = [m.active for m in modules]
    for module in modules:
        module.set_active(active)
    model.eval()
    try:
        yield
    finally:
        for module, name in zip(modules, previous, strict=True):
            module.active = name
        for module in model.modules():
            module.train(modes.get(id(module), module.training))


def _logits(model: nn.Module, input_ids: torch.Tensor, active: str | None) -> torch.Tensor:
    with _running(model, active), torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _sample_ids(model: nn.Module, sample_input_ids: torch.Tensor | None) -> torch.Tensor:
    device = next(model.parameters()).device
    if sample_input_ids is not None:
        return sample_input_ids.to(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    return torch.randint(0, vocab, SAMPLE_SHAPE, generator=generator).to(device)


# ---------------------------------------------------------------- public API


def merge(
    model: nn.Module,
    adapter_name: str,
    quant: str = "none",
    inplace: bool = False,
    sample_input_ids: torch.Tensor | None = None,
    *,
    keep_original: bool = True,
) -> tuple[nn.Module, MergeReport]:
    """Fold adapter `adapter_name` into the base weights and measure what that costs.

    Args:
        model: A model holding the adapter (see `add_adapter` / `load_adapter`).
        adapter_name: The adapter to merge; every other adapter is dropped.
        quant: Storage of the merged model's linear layers: "none" (full precision in
            the model's compute dtype) or "nf4" / "fp4" / "int8" (re-quantized from
            the fp32 merged weights). Layers kept full precision in a quantized base
            (the output head) stay so.
        inplace: Work on `model` itself, one layer at a time; default: a deep copy,
            leaving `model` untouched.
        sample_input_ids: Batch used to measure max |delta logit|; default a fixed-seed
            random (2, 16) batch of valid token ids.
        keep_original: With inplace, keep the replaced modules so `unmerge` restores
            the adapted model exactly. False (the CLI) frees them as it goes; the
            merge is then checked in full (one extra pass) before anything changes.

    Returns:
        (merged model, MergeReport). Merging an adapter that is already merged returns
        the model unchanged with `report.already_merged`.

    Raises:
        MergeError: unknown adapter, an unmergeable method (soft prompts, prefixes,
            bottleneck layers), or non-finite merged weights; the model is unchanged.
    """
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if adapter_name not in list_adapters(model) and adapter_name in getattr(
        model, "edgepeft_merged", ()
    ):
        info = getattr(model, "edgepeft_base", None)
        return model, MergeReport(
            adapter=adapter_name,
            quant=info.quant if info else quant,
            fingerprint=info.fingerprint if info else "",
            already_merged=True,
        )
    merge_plan(model, adapter_name)  # fail before copying anything
    if not inplace:
        model = copy.deepcopy(model)
    plan = merge_plan(model, adapter_name)
    keep = inplace and keep_original
    for module in plan.model_level:
        if keep and not hasattr(module, "attach_to"):
            raise MergeError(
                f"{type(module).__name__} cannot be re-attached, so an inplace merge that keeps "
                "originals cannot drop it; delete its adapter first or merge with inplace=False"
            )
    if inplace and not keep_original:
        for stack in plan.stacks:  # the replaced modules are not kept: check before changing
            if stack.holder is not None and not isinstance(stack.holder, ModulesToSaveLayer):
                stack_update(stack, adapter_name)

    info = base_info(model)
    inputs, head = _embeddings(model)
    target = FoldTarget(
        quant=quant,
        base_quant=info.quant,
        double_quant=info.double_quant if info.quant in BNB4_FORMATS else True,
        dtype=getattr(torch, info.compute_dtype),
        head=head,
    )
    fingerprint = merged_fingerprint(model, adapter_name, plan)
    ids = _sample_ids(model, sample_input_ids)
    reference = _logits(model, ids, adapter_name)

    undo = (
        _Undo(attributes={a: model.__dict__.get(a, _MISSING) for a in _MODEL_ATTRS})
        if keep
        else None
    )
    try:
        rows, converted = _apply(model, plan, adapter_name, target, undo)
    except BaseException:
        if undo is not None:
            undo.restore(model)
        raise
    for module in plan.model_level:
        module.detach_from(model)
        if undo is not None:
            undo.detached.append(module)
    tied = (
        head is not None
        and inputs is not None
        and getattr(head, "weight", None) is getattr(inputs, "weight", None)
    )
    if tied and any(s.holder is not None and s.innermost in (head, inputs) for s in plan.stacks):
        if undo is not None:
            undo.tie_word_embeddings = True
        _set_tie(model, False)  # the merged head or embeddings no longer share one tensor

    dropped = tuple(n for n in list_adapters(model) if n != adapter_name)
    if dropped:
        log.info(
            "merge %r: dropped the other adapters on the model: %s",
            adapter_name,
            ", ".join(dropped),
        )
    for attr in ("edgepeft_adapters", "edgepeft_active"):
        model.__dict__.pop(attr, None)
    model.edgepeft_merged = [*getattr(model, "edgepeft_merged", []), adapter_name]
    model.edgepeft_base = replace(
        info,
        fingerprint=fingerprint,
        quant=quant,
        double_quant=(target.double_quant if quant in BNB4_FORMATS else False),
    )
    if undo is not None:
        model.__dict__.setdefault("_edgepeft_undo", []).append(undo)

    merged = _logits(model, ids, None)
    report = MergeReport(
        adapter=adapter_name,
        quant=quant,
        layers=tuple(rows),
        max_abs_logit_delta=float((merged - reference).abs().max()),
        sample_shape=tuple(ids.shape),
        dropped_adapters=dropped,
        converted_layers=converted,
        fingerprint=fingerprint,
    )
    return model, report


def unmerge(model: nn.Module) -> nn.Module:
    """Undo the last `merge(model, ..., inplace=True)` exactly; returns `model`.

    Raises:
        MergeError: the model holds no kept originals (merged with inplace=False, by
            the CLI, or loaded from a merged folder).
    """
    stack = model.__dict__.get("_edgepeft_undo")
    if not stack:
        merged = getattr(model, "edgepeft_merged", None)
        what = f"adapters {merged} were merged" if merged else "no merge was recorded"
        raise MergeError(
            f"cannot unmerge this model: {what} without keeping the original modules. Only "
            "merge(model, name, inplace=True) keeps them; otherwise reload the base and the adapter."
        )
    stack.pop().restore(model)
    if not stack:
        del model.__dict__["_edgepeft_undo"]
    return model


__all__ = ["LayerMerge", "MergeError", "MergeReport", "merge", "unmerge"]
