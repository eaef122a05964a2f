"""The adapter protocol: every method's module holds one parameter set per adapter name.

    parent.q_proj = LoraLayer(base_layer=<bnb Linear4bit>)
                      ├─ base_layer            frozen, does its own (quantized) matmul
                      ├─ lora_A["sql"], lora_B["sql"], ...   one entry per adapter
                      └─ active = "sql" | None

Adapters are found by type (`AdapterModule`), never by key strings. Each module
names its tensors the way HF peft does *inside* that module ("lora_A.weight",
"ia3_l", ...); `peft_format` adds the module path around them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from edgepeft.base import base_named_tensors, dequantized_weight

__all__ = [
    "SEPARATE_FILES",
    "AdapterLayer",
    "AdapterModule",
    "MethodSpec",
    "ReadThroughLayer",
    "adapter_modules",
    "base_named_tensors",  # lives in edgepeft.base; kept importable from here
]

SeparateFile = Literal["onnx_adapter", "kv_prefix"]
SEPARATE_FILES: tuple[str, ...] = ("onnx_adapter", "kv_prefix")
"""How separate mode ships a method: an `.onnx_adapter` file of values for the base graph's
adapter inputs, or a `.kvprefix.safetensors` file that seeds the KV cache."""


@dataclass(frozen=True)
class MethodSpec:
    """What the registry (`edgepeft.adapters.METHODS`) knows about one method.

    The functions say how to build and save the method; the capabilities after them say
    what merge, export and the run-config reader may do with it. Those ask the registry
    (`edgepeft.adapters.peft_types`) rather than keep lists of their own, so a new method
    is one file and one registry line.
    """

    config_cls: type
    resolve: Callable[[nn.Module, Any], Any]
    """(model, config) -> config with architecture defaults filled in (what gets saved)."""
    inject: Callable[..., list[str]]
    """(model, config, name, **context) -> names of the modules it adapted."""
    to_peft: Callable[[Any], dict]
    """config -> the method's fields of adapter_config.json, under peft's names."""
    from_peft: Callable[[dict], Any]
    """adapter_config.json -> config; raises on fields that change the math but are unsupported."""
    mergeable: bool
    """`merge` folds it into the base weights (its modules' own `mergeable` agrees)."""
    separate_file: SeparateFile | None
    """What a separate-mode export writes for it (see `SEPARATE_FILES`); None: not
    switchable, export it merged."""
    streamed_merge: bool
    """A streamed merged export (`export.stream`) folds it in layer by layer."""
    streamed_separate: bool
    """A streamed separate export takes it (its file needs no pass over the whole base)."""
    run_config_names: tuple[str, ...]
    """Its `method.type` names in run configs, the plain one first ("dora": LoRA with
    use_dora=True)."""


class AdapterModule(nn.Module):
    """Holds per-adapter parameters in the containers named by `adapter_attrs`."""

    peft_type: ClassVar[str]
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    """The containers holding per-adapter tensors; `edgepeft.base` reads it to see through
    adapters without importing them."""
    mergeable: ClassVar[bool] = False
    model_level: ClassVar[bool] = False
    """True for modules whose tensors are not under a module path (soft prompts)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: str | None = None

    # ---- bookkeeping shared by every method

    def names(self) -> list[str]:
        found: dict[str, None] = {}
        for attr in self.adapter_attrs:
            found.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(found)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def _entries(self, name: str) -> Iterator[tuple[str, nn.Parameter | nn.Module]]:
        """(attribute, entry) of each container in `adapter_attrs` that holds `name`."""
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                yield attr, container[name]

    def parameters_of(self, name: str) -> Iterator[nn.Parameter]:
        for _, entry in self._entries(name):
            if isinstance(entry, nn.Parameter):
                yield entry
            else:
                yield from entry.parameters()

    def delete(self, name: str) -> None:
        for attr, _ in list(self._entries(name)):
            del getattr(self, attr)[name]
        self.forget(name)
        if self.active == name:
            self.active = None

    def forget(self, name: str) -> None:
        """Drop non-parameter per-adapter state (scalings, flags). Override where kept."""

    def set_active(self, name: str | None) -> None:
        self.active = name if name is not None and name in self else None

    # ---- tensors as HF peft names them inside this module

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors, keyed as peft keys them below the module path."""
        out: dict[str, torch.Tensor] = {}
        for attr, entry in self._entries(name):
            if isinstance(entry, nn.Parameter):
                out[attr] = entry
            else:
                for key, value in entry.state_dict(keep_vars=True).items():
                    out[f"{attr}.{key}"] = value
        return out

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in tensors whose keys and shapes `peft_format` has already checked."""
        own = self.tensors(name)
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))


class AdapterLayer(AdapterModule):
    """An adapter that wraps one base module and calls its forward."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def innermost(self) -> nn.Module:
        """The original base module under any stack of wrappers."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    def delta_weight(self, name: str) -> torch.Tensor:
        """Mergeable linear methods: W_merged - W as an fp32 (out, in) tensor."""
        raise TypeError(
            f"{self.peft_type} adapters cannot be merged; keep them separate (export supports that)"
        )

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        """New fp32 values for the innermost module's parameters once `name` is folded in.

        Keys are the module's own parameter names; a linear layer's "weight" is
        always given as (out, in), whatever its storage (bnb, Conv1D). Parameters
        not listed keep their values. The default adds `delta_weight` to the
        dequantized weight; methods that also change the bias override this.
        """
        weight = dequantized_weight(self.innermost())
        return {"weight": weight + self.delta_weight(name).to(weight.device)}


class ReadThroughLayer(AdapterLayer):
    """A wrapper that stands in for a whole module (embeddings, lm_head, a norm): code that
    reads e.g. `lm_head.weight` or `norm.eps` keeps working through it and sees the frozen
    original."""

    def __getattr__(self, attr: str):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr == "base_layer" or attr in self.adapter_attrs:
                raise
            return getattr(self.innermost(), attr)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """(path, module) of every adapter module; paths drop wrapper-internal ".base_layer"."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield path.replace(".base_layer", ""), module

