"""Which modules an adapter config selects, with errors that name the closest modules.

Rules (the same as HF peft's, so one config means the same thing in both):
  ("q_proj", "v_proj")  a module matches when its dotted name ends with ".q_proj"
  "model.*(q|v)_proj"   one string is a regex that must match the whole name
  "all-linear"          every linear layer except the output head
  layers_to_transform   keeps modules under `<layers_pattern>.<index>.`
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from edgepeft.adapters.layer import AdapterLayer, AdapterModule
from edgepeft.base import is_linear_like, set_submodule

_DEFAULT_LAYER_LISTS = r"(?:layers|h|blocks|block|decoder\.layers)"


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the base's modules; a wrapper stands for the module it wraps."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterLayer):
                yield name, child
                yield from walk(child.innermost(), name)
            elif isinstance(child, AdapterModule):
                continue  # model-level adapters hold no base modules
            else:
                yield name, child
                yield from walk(child, name)

    yield from walk(model, "")


def base_of(module: nn.Module) -> nn.Module:
    return module.innermost() if isinstance(module, AdapterLayer) else module


def _layer_index(name: str, layers_pattern: str | None) -> int | None:
    pattern = re.escape(layers_pattern) if layers_pattern else _DEFAULT_LAYER_LISTS
    m = re.search(rf"(?:^|\.){pattern}\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in candidate_modules(model) if head is not None and base_of(m) is head}


def select_modules(
    model: nn.Module,
    targets: tuple[str, ...] | str,
    *,
    layers_to_transform: tuple[int, ...] | None = None,
    layers_pattern: str | None = None,
    exclude: tuple[str, ...] | None = None,
    linear_only: bool = True,
    what: str = "adapter",
) -> list[str]:
    """Names of the modules `targets` selects, in model order.

    Raises:
        ValueError: a named target matched nothing; the message lists the closest names.
    """
    modules = list(candidate_modules(model))
    if linear_only:
        modules = [(n, m) for n, m in modules if is_linear_like(base_of(m))]
    heads = _output_head_names(model)

    if targets == "all-linear":
        chosen = [n for n, _ in modules if n not in heads]
    elif isinstance(targets, str):
        chosen = [n for n, _ in modules if re.fullmatch(targets, n)]
        if not chosen:
            raise ValueError(
                f"{what}: target regex {targets!r} matched no module; module names look like "
                f"{', '.join(n for n, _ in modules[:4])}"
            )
    else:
        chosen = []
        for key in targets:
            hits = [n for n, _ in modules if suffix_match(n, key)]
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in modules})
                close = difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4)
                raise ValueError(
                    f"{what}: target module {key!r} matched no "
                    f"{'linear ' if linear_only else ''}module; closest names: "
                    f"{', '.join(close) or ', '.join(leaves[:8])}"
                )
            chosen.extend(hits)
        order = {n: i for i, (n, _) in enumerate(modules)}
        chosen = sorted(set(chosen), key=order.__getitem__)

    if layers_to_transform is not None:
        keep = set(layers_to_transform)
        chosen = [n for n in chosen if _layer_index(n, layers_pattern) in keep]
    if exclude:
        chosen = [n for n in chosen if not any(suffix_match(n, e) for e in exclude)]
    if not chosen:
        raise ValueError(f"{what}: the configuration selects no module (check layers_to_transform)")
    return chosen


def select_configured(model: nn.Module, config, what: str) -> list[str]:
    """`select_modules` driven by a config's target_modules, layers_to_transform,
    layers_pattern and exclude_modules fields (LoRA, IA3)."""
    return select_modules(
        model,
        config.target_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        exclude=config.exclude_modules,
        what=what,
    )


def pattern_value(name: str, patterns: dict, default):
    """peft's rank/alpha pattern lookup: the first key matching the end of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def wrap(model: nn.Module, name: str, wrapper_cls: type[AdapterLayer]) -> AdapterLayer:
    """The `wrapper_cls` at `name`, creating it around whatever module sits there."""
    current = model.get_submodule(name)
    module = current
    while isinstance(module, AdapterLayer):  # reuse this method's wrapper in a stack
        if isinstance(module, wrapper_cls):
            return module
        module = module.base_layer
    wrapper = wrapper_cls(current)
    set_submodule(model, name, wrapper)
    return wrapper
