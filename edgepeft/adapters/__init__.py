"""Adapter methods, one file each, and the one registry that maps configs to them.

A method provides a `MethodSpec`: how to fill architecture defaults into its config,
how to inject it into a model, how its config reads and writes as HF peft JSON, and
what the rest of edgepeft may do with it (merge it, ship it as a separate file, stream
it, name it in a run config). Every list of "methods that can X" is a query here:

    peft_types(separate_file="onnx_adapter")   # ("LORA", "IA3", "BOTTLENECK")
    run_config_types()["dora"]                 # LoraConfig

The registry is checked at import against `edgepeft.config.CONFIG_TYPES`, the torch-free
table of config classes (config.py cannot ask this package without a cycle).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from edgepeft.adapters import (
    bottleneck,
    ia3,
    lora,
    mam,
    p_tuning,
    parallel,
    prompt,
    selective,
    unipelt,
)
from edgepeft.adapters.layer import SEPARATE_FILES, MethodSpec
from edgepeft.config import CONFIG_TYPES

METHODS: dict[str, MethodSpec] = {
    "LORA": lora.METHOD,
    "IA3": ia3.METHOD,
    "PROMPT_TUNING": prompt.PROMPT_METHOD,
    "P_TUNING": p_tuning.METHOD,
    "PREFIX_TUNING": prompt.PREFIX_METHOD,
    "BOTTLENECK": bottleneck.METHOD,
    "PARALLEL_ADAPTER": parallel.METHOD,
    "MAM": mam.METHOD,
    "UNIPELT": unipelt.METHOD,
    "SELECTIVE": selective.METHOD,
}
"""peft_type -> method, in the order of `CONFIG_TYPES` (the order every query answers in)."""

_HOW_TO_BUILD = ("config_cls", "resolve", "inject", "to_peft", "from_peft")
CAPABILITIES: tuple[str, ...] = tuple(
    f.name for f in fields(MethodSpec) if f.name not in _HOW_TO_BUILD
)
"""The `MethodSpec` fields `peft_types` can select on."""


def _check(methods: dict[str, MethodSpec]) -> None:
    """Refuse, at import, a registry that disagrees with config.py or with itself."""
    if list(methods) != list(CONFIG_TYPES):
        raise AssertionError(
            f"adapters.METHODS {list(methods)} != config.CONFIG_TYPES {list(CONFIG_TYPES)}"
        )
    run_names: list[str] = []
    for peft_type, spec in methods.items():
        if spec.config_cls is not CONFIG_TYPES[peft_type] or spec.config_cls.peft_type != peft_type:
            raise AssertionError(f"registry key {peft_type} != {spec.config_cls.__name__}.peft_type")
        if spec.separate_file not in (*SEPARATE_FILES, None):
            raise AssertionError(
                f"{peft_type}: separate_file {spec.separate_file!r} is not one of {SEPARATE_FILES}"
            )
        if spec.streamed_merge and not spec.mergeable:
            raise AssertionError(f"{peft_type}: streamed_merge needs a mergeable method")
        if spec.streamed_separate and spec.separate_file is None:
            raise AssertionError(f"{peft_type}: streamed_separate needs a separate_file")
        if not spec.run_config_names:
            raise AssertionError(f"{peft_type}: no run_config_names")
        run_names += spec.run_config_names
    if len(set(run_names)) != len(run_names):
        raise AssertionError(f"run_config_names repeat across methods: {run_names}")


_check(METHODS)


def method_for(config: Any) -> MethodSpec:
    spec = METHODS.get(getattr(config, "peft_type", None))
    if spec is None or not isinstance(config, spec.config_cls):
        raise TypeError(
            f"{type(config).__name__} is not an adapter config; use one of "
            f"{', '.join(s.config_cls.__name__ for s in METHODS.values())}"
        )
    return spec


def peft_types(**capabilities: Any) -> tuple[str, ...]:
    """The peft_types of the methods having every given capability, in registry order.

    Example: `peft_types(mergeable=True)`; keywords are `CAPABILITIES`.
    """
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise TypeError(f"unknown capabilities {unknown}; MethodSpec has {list(CAPABILITIES)}")
    return tuple(
        peft_type
        for peft_type, spec in METHODS.items()
        if all(getattr(spec, key) == value for key, value in capabilities.items())
    )


def config_types() -> dict[str, type]:
    """peft_type -> config class, in registry order (equal to `edgepeft.config.CONFIG_TYPES`)."""
    return {peft_type: spec.config_cls for peft_type, spec in METHODS.items()}


def run_config_types() -> dict[str, type]:
    """A run config's `method.type` -> config class, in registry order."""
    return {name: spec.config_cls for spec in METHODS.values() for name in spec.run_config_names}
