"""Choosing an importance mask for selective tuning from a few calibration batches.

    adapter (SelectiveConfig mask="importance", mask not yet chosen: dense zero Δ per parameter)
        │ per batch: loss ──backward──► g = ∂loss/∂Δ   (= ∂loss/∂W at Δ = 0: the base stays frozen)
        │            score += g²  (fisher)   or   |g ⊙ W|  (grad_x_weight, W the frozen original)
        ▼
    unit scores: entries, or rows / columns summed (structure)
        │ all selected parameters together, ranked high to low; ties go to the earlier
        │ parameter (model order), then the lower index: a stable sort, so always the same
        ▼
    top `budget` units ──► per parameter: SparseIndex (ascending indices) + the values of Δ
    there as the new trainable parameter; the config records `selected` and `density`

The gradient is taken with respect to the delta rather than the weight, so no base
parameter ever requires grad. The empirical Fisher here sums squared *batch* gradients
(one per calibration batch), not per-example ones: cheaper, and the ranking is what counts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from edgepeft.adapters.inject import active_adapter, list_adapters, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.selective import SelectiveLayer, SparseIndex, budget_count
from edgepeft.config import SelectiveConfig

log = logging.getLogger("edgepeft")

Loss = Callable[[nn.Module, object], torch.Tensor]


def mask_pending(config: object) -> bool:
    """True for an importance-masked selective config whose mask is still to be chosen."""
    return isinstance(config, SelectiveConfig) and config.mask is not None and not config.selected


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token loss of a batch: input ids (B, T), or a mapping of forward arguments
    (labels default to the input ids)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "choose_mask batches must be input-id tensors or mappings with 'input_ids'; "
            f"got {type(batch).__name__} (pass loss= for other batch types)"
        )
    kwargs = {"labels": batch["input_ids"], **batch, "use_cache": False}
    return model(**kwargs).loss


def _groups(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter, torch.Tensor, list]]:
    """(full name, dense Δ, frozen original, [(layer, local)] aliases) per selected parameter,
    in model order; a tied parameter is one group."""
    groups: dict[int, tuple[str, nn.Parameter, torch.Tensor, list]] = {}
    for path, module in adapter_modules(model):
        if not isinstance(module, SelectiveLayer) or name not in module.selective_delta:
            continue
        for local, delta in module.selective_delta[name].items():
            if module.sparse_index(name, local) is not None:
                raise ValueError(
                    f"selective adapter {name!r} already has its mask ({path}.{local})"
                )
            entry = groups.setdefault(
                id(delta), (f"{path}.{local}", delta, getattr(module.innermost(), local), [])
            )
            entry[3].append((module, local))
    return list(groups.values())


def unit_scores(score: torch.Tensor, structure: str) -> torch.Tensor:
    """Entry scores (parameter-shaped) -> one score per unit (entry, row or column)."""
    if structure == "unstructured":
        return score.reshape(-1)
    if structure == "rows":
        return score.reshape(score.shape[0], -1).sum(1)
    return score.reshape(-1, score.shape[-1]).sum(0)


def choose_mask(
    model: nn.Module,
    name: str,
    batches: Iterable,
    *,
    loss: Loss | None = None,
) -> SelectiveConfig:
    """Score adapter `name`'s selected entries on `batches`, keep the top `budget` units.

    Afterwards only the kept entries are parameters (the rest of each delta is exactly 0
    and stays so); build the optimizer after this call. The model's config for `name`
    gains `selected` and `density` (what `save_adapter` writes), and is returned.

    Args:
        model: A model holding selective adapter `name` with mask="importance", not yet masked.
        name: The adapter.
        batches: Calibration batches; the config's `calibration_batches` of them are used.
            Input-id tensors or forward-argument mappings for the default loss.
        loss: (model, batch) -> scalar loss; default `causal_lm_loss`.

    Raises:
        ValueError: not such an adapter, its mask already chosen, no batch, or a score that
            is NaN/inf (named).
    """
    config = list_adapters(model).get(name)
    if not isinstance(config, SelectiveConfig) or config.mask is None:
        raise ValueError(
            f"adapter {name!r} is not an importance-masked selective adapter "
            "(SelectiveConfig(mask='importance', budget=...)); nothing to choose"
        )
    if config.selected:
        raise ValueError(f"selective adapter {name!r} already has its mask; it is chosen once")
    loss = loss or causal_lm_loss
    groups = _groups(model, name)
    scores = [torch.zeros(delta.shape, dtype=torch.float64) for _, delta, _, _ in groups]

    previous, was_training = active_adapter(model), model.training
    set_adapter(model, name)  # only this adapter's deltas require grad; the base is frozen
    model.eval()  # no dropout: the score of a fixed batch is one number
    used = 0
    try:
        for batch in batches:
            if used == config.calibration_batches:
                break
            for _, delta, _, _ in groups:
                delta.grad = None
            loss(model, batch).backward()
            for score, (_, delta, original, _) in zip(scores, groups, strict=True):
                g = delta.grad if delta.grad is not None else torch.zeros_like(delta)
                g = g.detach().double().cpu()
                score += (
                    g.square()
                    if config.score == "fisher"
                    else (g * original.detach().double().cpu()).abs()
                )
            used += 1
    finally:
        for _, delta, _, _ in groups:
            delta.grad = None
        model.train(was_training)
        set_adapter(model, previous)
    if used == 0:
        raise ValueError(f"selective adapter {name!r}: choose_mask got no calibration batch")
    for (full, *_), score in zip(groups, scores, strict=True):
        if not torch.isfinite(score).all():
            raise ValueError(
                f"selective adapter {name!r}: the {config.score} score of {full} is NaN/inf "
                "on the calibration batches; check the data and the base for non-finite values"
            )

    per_unit = [unit_scores(score, config.structure) for score in scores]
    total = sum(u.numel() for u in per_unit)
    kept = budget_count(config, total, name)
    # Stable descending sort: equal scores keep model order, then index order.
    order = torch.argsort(torch.cat(per_unit), descending=True, stable=True)[:kept]
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[order] = True

    selected: dict[str, int] = {}
    entries = trained = 0
    start = 0
    for (full, delta, _, aliases), units in zip(groups, per_unit, strict=True):
        where = chosen[start : start + units.numel()].nonzero().flatten()  # ascending
        start += units.numel()
        index = SparseIndex(config.structure, delta.shape, where.to(delta.device), param=full)
        values = nn.Parameter(index.gather(delta.detach()).contiguous())
        for layer, local in aliases:
            layer.add(name, local, values, index)
        selected[full] = int(where.numel())
        entries += delta.numel()
        trained += values.numel()
    set_adapter(model, active_adapter(model))  # requires_grad on the new value tensors
    new = dataclasses.replace(config, selected=selected, density=trained / entries)
    model.edgepeft_adapters = {**list_adapters(model), name: new}
    log.info(
        "selective adapter %r: %s mask (%s, %d batches) keeps %d of %d %s units, "
        "%d of %d entries (density %.4f)",
        name, config.score, config.structure, used, kept, total, config.structure, trained,
        entries, new.density,
    )  # fmt: skip
    return new
