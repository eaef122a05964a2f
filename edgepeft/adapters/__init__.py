"""Adapter methods, one file each, and the one registry that maps configs to them.

A method provides a `MethodSpec`: how to fill architecture defaults into its config,
how to inject it into a model, and how its config reads and writes as HF peft JSON.
"""

from __future__ import annotations

from typing import Any

from edgepeft.adapters.layer import MethodSpec


def _registry() -> dict[str, MethodSpec]:
    from edgepeft.adapters import bottleneck, ia3, lora, prompt, selective

    methods = {
        "LORA": lora.METHOD,
        "PROMPT_TUNING": prompt.PROMPT_METHOD, "PREFIX_TUNING": prompt.PREFIX_METHOD,
        "IA3": ia3.METHOD,
        "BOTTLENECK": bottleneck.METHOD, "SELECTIVE": selective.METHOD,
    }
    for peft_type, spec in methods.items():
        if spec.config_cls.peft_type != peft_type:
            raise AssertionError(f"registry key {peft_type} != {spec.config_cls.__name__}.peft_type")
    return methods


METHODS: dict[str, MethodSpec] = _registry()


def method_for(config: Any) -> MethodSpec:
    spec = METHODS.get(getattr(config, "peft_type", None))
    if spec is None or not isinstance(config, spec.config_cls):
        raise TypeError(
            f"{type(config).__name__} is not an adapter config; use one of "
            f"{', '.join(s.config_cls.__name__ for s in METHODS.values())}"
        )
    return spec
