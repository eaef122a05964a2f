"""Several named adapters on one model: add, switch, disable, delete, count.

State lives where it is used: each adapter module knows which of its adapters is
active; the model keeps the resolved config of every adapter it holds in
`model.edgepeft_adapters` (name -> config) and the active name in
`model.edgepeft_active`. One adapter is active at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from edgepeft.adapters import method_for
from edgepeft.adapters.layer import AdapterLayer, AdapterModule, adapter_modules
from edgepeft.base import base_info, set_submodule


def list_adapters(model: nn.Module) -> dict[str, object]:
    """name -> resolved config of every adapter on `model` (insertion order)."""
    return getattr(model, "edgepeft_adapters", {})


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "edgepeft_active", None)


def _require(model: nn.Module, name: str) -> None:
    if name not in list_adapters(model):
        have = ", ".join(list_adapters(model)) or "none"
        raise KeyError(f"no adapter named {name!r} on this model (adapters: {have})")


def add_adapter(model: nn.Module, config, name: str = "default", **context) -> nn.Module:
    """Add adapter `name` and make it the active, trainable one.

    Args:
        model: A model from `load_base` (or any HF causal LM; its base is frozen here).
        config: One of the adapter configs (LoraConfig, IA3Config, ...).
        name: Adapter name, unique on this model.
        **context: Method-specific needs, e.g. `tokenizer=` for prompt tuning's text init.

    Returns:
        `model`, changed in place.
    """
    spec = method_for(config)
    if name in list_adapters(model):
        raise ValueError(
            f"model already has an adapter named {name!r} (adapters: {', '.join(list_adapters(model))}); "
            "delete it first or pick another name"
        )
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if not list_adapters(model):
        for p in model.parameters():
            p.requires_grad_(False)  # the base is frozen before the first adapter lands
        base_info(model)  # fix the fingerprint while the weights are the base's own
    config = spec.resolve(model, config)
    try:
        spec.inject(model, config, name, **context)
    except Exception:
        _remove_everywhere(model, name)
        raise
    model.edgepeft_adapters = {**list_adapters(model), name: config}
    set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter (None: run the base alone); only it trains."""
    if name is not None:
        _require(model, name)
    for _, module in adapter_modules(model):
        module.set_active(name)
        for other in module.names():
            for p in module.parameters_of(other):
                p.requires_grad_(other == name)
    model.edgepeft_active = name


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base alone inside the block; the active adapter comes back after."""
    previous = active_adapter(model)
    modules = [m for _, m in adapter_modules(model)]
    for module in modules:
        module.active = None
    try:
        yield
    finally:
        for module in modules:
            module.set_active(previous)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; wrappers left with no adapter give back their base module."""
    _require(model, name)
    _remove_everywhere(model, name)
    remaining = {k: v for k, v in list_adapters(model).items() if k != name}
    model.edgepeft_adapters = remaining
    if active_adapter(model) == name:
        model.edgepeft_active = None


def _remove_everywhere(model: nn.Module, name: str) -> None:
    for module in [m for _, m in adapter_modules(model)]:
        if name in module:
            module.delete(name)
    unwrap_empty(model)


def unwrap_empty(model: nn.Module) -> None:
    """Replace every adapter module that holds no adapter by what it wrapped."""
    changed = True
    while changed:
        changed = False
        for path, module in list(model.named_modules()):
            if isinstance(module, AdapterModule) and not module.names():
                if isinstance(module, AdapterLayer):
                    set_submodule(model, path, module.base_layer)
                else:
                    module.detach_from(model)
                changed = True
                break


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of adapter `name` (default: the active one), each once."""
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("no active adapter; pass name=")
    _require(model, name)
    seen: dict[int, nn.Parameter] = {}
    for _, module in adapter_modules(model):
        for p in module.parameters_of(name):
            seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    """Trainable parameters of adapter `name` (the number HF peft reports for the same config)."""
    return sum(p.numel() for p in adapter_parameters(model, name))
