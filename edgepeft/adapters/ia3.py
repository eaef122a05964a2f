"""IA3 (Liu et al., 2022): learned vectors that rescale activations of chosen layers.

    normal target (keys, values):      x ──► base_layer ──► ⊙ l ──► y      l: (out, 1)
                                       y = (W x + b) ⊙ l    (the bias is scaled too)
    feedforward target (FFN down):     x ──► ⊙ l ──► base_layer ──► y      l: (1, in)
                                       y = W (x ⊙ l) + b

The wrapper calls the base layer's own forward (fp32, NF4, FP4, int8 or GPT-2
Conv1D), so IA3 never branches on the backend. The semantics, tensor names and
shapes are HF peft's, so folders load both ways.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from edgepeft.adapters.layer import AdapterLayer, MethodSpec
from edgepeft.adapters.saved_modules import add_modules_to_save
from edgepeft.adapters.targets import select_configured, wrap
from edgepeft.architectures import architecture_of
from edgepeft.base import dequantized_weight, linear_features
from edgepeft.config import IA3Config

_RANDOM_INIT_STD = 0.2
"""init="random": l = 1 + N(0, 0.2²) from torch's global RNG; far enough from the
identity that tests see every vector, close enough that activations stay tame."""


class IA3Layer(AdapterLayer):
    peft_type = "IA3"
    adapter_attrs = ("ia3_l",)
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        """Per adapter: True rescales the input, False the output (two adapters may differ)."""

    def add(self, name: str, feedforward: bool, init: str) -> None:
        in_f, out_f = linear_features(self.innermost())
        device = next(self.innermost().parameters()).device
        shape = (1, in_f) if feedforward else (out_f, 1)  # peft's shapes
        if init == "ones":
            vector = torch.ones(shape, device=device)
        elif init == "random":
            vector = 1 + _RANDOM_INIT_STD * torch.randn(shape).to(device)
        else:
            raise ValueError(f"IA3 adapter {name!r}: init must be 'ones' or 'random', got {init!r}")
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def forget(self, name: str) -> None:
        self.feedforward.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()  # (in,) or (out,)
        if self.feedforward[name]:
            scaled = (x.to(scale.dtype) * scale).to(x.dtype)  # (B, T, in)
            return self.base_layer(scaled, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        return (out * scale).to(out.dtype)

    def _scale(self, name: str, device: torch.device) -> torch.Tensor:
        return self.ia3_l[name].detach().to(device=device, dtype=torch.float32)

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        """Exact fp32 values: rows (and bias) scaled for a normal target, columns for feedforward.

        Computed as W * l rather than W + delta_weight, which would round differently.
        """
        base = self.innermost()
        weight = dequantized_weight(base)  # (out, in)
        scale = self._scale(name, weight.device)
        if self.feedforward[name]:
            return {"weight": weight * scale.view(1, -1)}
        update = {"weight": weight * scale.view(-1, 1)}
        bias = getattr(base, "bias", None)
        if bias is not None:
            update["bias"] = bias.detach().to(torch.float32) * scale.view(-1).to(bias.device)
        return update

    def delta_weight(self, name: str) -> torch.Tensor:
        """W_merged - W as fp32 (out, in); the bias change of a normal target is not in it."""
        weight = dequantized_weight(self.innermost())
        scale = self._scale(name, weight.device)
        shape = (1, -1) if self.feedforward[name] else (-1, 1)
        return weight * (scale.view(shape) - 1)


# ---------------------------------------------------------------- config and injection


def is_feedforward(module_name: str, feedforward_modules: tuple[str, ...] | str) -> bool:
    """peft's rule: a regex must match the whole name; a list entry is a plain name suffix.

    peft tests `name.endswith(entry)` without a dot boundary, and so does edgepeft,
    so one adapter_config.json means the same thing in both libraries.
    """
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(entry) for entry in feedforward_modules)


def resolve(model: nn.Module, config: IA3Config) -> IA3Config:
    """The config with the architecture's targets and feedforward modules filled in.

    Raises:
        ValueError: feedforward modules that are not among the targets, or defaults
            needed for an architecture edgepeft has no table entry for.
    """
    model_type = model.config.model_type
    arch = architecture_of(model_type)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None or feedforward is None:
        if arch is None:
            missing = " and ".join(
                f for f, v in (("target_modules", targets), ("feedforward_modules", feedforward))
                if v is None
            )
            raise ValueError(
                f"IA3: edgepeft has no default {missing} for model_type {model_type!r}; pass "
                "them explicitly (feedforward_modules=() when no target rescales its input)"
            )
        if targets is None:
            targets = arch.ia3_targets
        if feedforward is None:
            if isinstance(targets, str):
                feedforward = arch.ia3_feedforward
            else:
                # Keep the result a subset of the targets, as peft requires of a saved config.
                feedforward = tuple(
                    t for t in targets if any(t.endswith(f) for f in arch.ia3_feedforward)
                )
    if not isinstance(targets, str) and not isinstance(feedforward, str):
        outside = [f for f in feedforward if f not in targets]
        if outside:
            raise ValueError(
                f"IA3: feedforward_modules must be a subset of target_modules, but "
                f"{', '.join(map(repr, outside))} is not among the targets "
                f"({', '.join(map(repr, targets))}); add it to target_modules or drop it"
            )
    return dataclasses.replace(config, target_modules=targets, feedforward_modules=feedforward)


def inject(model: nn.Module, config: IA3Config, name: str) -> list[str]:
    """Wrap every targeted layer and add adapter `name`; returns the wrapped module names."""
    selected = select_configured(model, config, what=f"IA3 adapter {name!r}")
    for module_name in selected:
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        wrap(model, module_name, IA3Layer).add(name, feedforward, config.init)
    return selected + add_modules_to_save(model, config.modules_to_save, name)


# ---------------------------------------------------------------- HF peft JSON


def _listed(value):
    return value if isinstance(value, str) or value is None else list(value)


def to_peft(config: IA3Config) -> dict:
    document = {
        "target_modules": _listed(config.target_modules),
        "feedforward_modules": _listed(config.feedforward_modules),
        # A saved folder holds every trained vector, so the init only decides what peft
        # puts where the file has no vector: peft's IA3 ignores layers_to_transform and
        # wraps every target, and ones keep those extra layers the identity.
        "init_ia3_weights": True,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "exclude_modules": list(config.exclude_modules) if config.exclude_modules else None,
        # save_adapter sets True when the targets are GPT-2 Conv1D layers.
        "fan_in_fan_out": False,
    }
    if config.layers_to_transform is not None:
        # peft's IA3Config has no such fields (it warns and drops them); edgepeft reads them back.
        document["layers_to_transform"] = list(config.layers_to_transform)
        document["layers_pattern"] = config.layers_pattern
    return document


def _tuple_or_regex(data: dict, key: str):
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def from_peft(data: dict) -> IA3Config:
    exclude = data.get("exclude_modules")
    if isinstance(exclude, str):
        raise ValueError(
            f"IA3 adapter excludes modules by regex ({exclude!r}); edgepeft takes a list of "
            "module names there: rewrite exclude_modules as a list"
        )
    pattern = data.get("layers_pattern")
    if isinstance(pattern, list):
        if len(pattern) != 1:
            raise ValueError(
                f"IA3 adapter lists several layers_pattern values {pattern!r}; edgepeft takes one"
            )
        pattern = pattern[0]
    layers = data.get("layers_to_transform")
    # fan_in_fan_out is not read: edgepeft knows each layer's layout from the layer itself.
    return IA3Config(
        target_modules=_tuple_or_regex(data, "target_modules"),
        feedforward_modules=_tuple_or_regex(data, "feedforward_modules"),
        init="ones" if data.get("init_ia3_weights", True) else "random",
        layers_to_transform=(layers,) if isinstance(layers, int) else tuple(layers) if layers else None,
        layers_pattern=pattern,
        modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None,
        exclude_modules=tuple(exclude) if exclude else None,
    )


METHOD = MethodSpec(
    config_cls=IA3Config,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=IA3Layer.mergeable,
    separate_file="onnx_adapter",
    streamed_merge=True,
    streamed_separate=True,
    run_config_names=("ia3",),
)
