"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) after output projections.

    x ──► base_layer (o_proj / down_proj / c_proj; frozen, any quantization) ──► y ──┐
                                                                                     + ──► y'
          y ──► down (d → d/rf, bias) ──► act ──► up (d/rf → d, bias) ───────────────┘

    Houlsby: after attention's and the FFN's output projections (2 per layer)
    Pfeiffer: after the FFN's output projection only (1 per layer)

`up` starts at zero, so a new adapter is the identity. The residual branch is
non-linear in y, so it cannot be folded into the base weight: merging raises,
and export keeps the adapter as separate layers.

HF peft has no bottleneck method; edgepeft writes the same folder layout with its
own `peft_type`:

    adapter_config.json  {"peft_type": "BOTTLENECK", "style": "houlsby" | "pfeiffer",
                          "reduction_factor": 16, "activation": "relu" | "gelu" | "silu" | "tanh",
                          "target_modules": ["self_attn.o_proj", "mlp.down_proj"],
                          "init": "zeros" | "random", ...peft's common fields}
    adapter_model.safetensors
        base_model.model.<path>.adapter_down.weight   (d/rf, d)
        base_model.model.<path>.adapter_down.bias     (d/rf,)
        base_model.model.<path>.adapter_up.weight     (d, d/rf)
        base_model.model.<path>.adapter_up.bias       (d,)

AdapterHub's `SeqBnConfig` on Llama reads y + h (`original_ln_before=True`, h the
residual); edgepeft's Pfeiffer equals `SeqBnConfig(original_ln_before=False)`, checked to
identical logits in tests/test_adapterhub_reference.py.

"gelu" is the exact (erf) GELU. The LLM-Adapters fork of peft also wrote
"BOTTLENECK" folders (bias-free, `bottleneck_size`, `non_linearity`); those are
refused with a clear error rather than read with other math.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.adapters.layer import AdapterLayer, MethodSpec
from edgepeft.adapters.targets import select_modules, wrap
from edgepeft.architectures import require_architecture
from edgepeft.base import linear_features
from edgepeft.config import BottleneckConfig

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
STYLES = ("houlsby", "pfeiffer")


def branch_layers(
    base: nn.Module, config, what: str, module_name: str = ""
) -> tuple[nn.Linear, nn.Linear]:
    """down (d -> d/rf) and up (d/rf -> d), with biases, for a branch on `base`'s output d.

    `config` gives reduction_factor and init: "zeros" zeroes up (the branch starts as the
    identity), "random" keeps nn.Linear's own init for both. UniPELT's gated bottleneck
    (unipelt.py) builds its branch here too.
    """
    _, out_f = linear_features(base)
    width = out_f // config.reduction_factor
    if width < 1:
        raise ValueError(
            f"{what} on {module_name or 'a layer'}: output size {out_f} // "
            f"reduction_factor {config.reduction_factor} is 0; use a reduction_factor <= {out_f}"
        )
    device = next(base.parameters()).device
    down = nn.Linear(out_f, width, bias=True, device=device)
    up = nn.Linear(width, out_f, bias=True, device=device)
    if config.init == "zeros":
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
    return down, up


class BottleneckLayer(AdapterLayer):
    peft_type = "BOTTLENECK"
    adapter_attrs = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}

    def add(self, name: str, config: BottleneckConfig, module_name: str = "") -> None:
        what = f"bottleneck adapter {name!r}"
        down, up = branch_layers(self.innermost(), config, what, module_name)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.activation[name] = config.activation

    def forget(self, name: str) -> None:
        self.activation.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return out
        down, up = self.adapter_down[name], self.adapter_up[name]
        hidden = ACTIVATIONS[self.activation[name]](down(out.to(down.weight.dtype)))  # (..., d/rf)
        return out + up(hidden).to(out.dtype)  # (..., d)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise self._not_mergeable(name)

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        raise self._not_mergeable(name)

    def _not_mergeable(self, name: str) -> TypeError:
        # The branch is non-linear in y: no change of the base weight reproduces it.
        return TypeError(
            f"BOTTLENECK adapter {name!r} computes y + up(act(down(y))), which no base weight "
            "update reproduces, so it cannot be merged; keep it separate (export supports that)"
        )


def default_targets(model_type: str, style: str) -> tuple[str, ...]:
    """The output projections a style adapts in one decoder layer."""
    arch = require_architecture(model_type, "bottleneck target modules")
    if style == "houlsby":
        return (arch.attention_output, arch.ffn_output)
    return (arch.ffn_output,)


def _check(config: BottleneckConfig) -> None:
    if config.style not in STYLES:
        raise ValueError(f"bottleneck style must be one of {STYLES}, got {config.style!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"bottleneck activation must be one of {tuple(ACTIVATIONS)}, got {config.activation!r}"
        )
    if not isinstance(config.reduction_factor, int) or config.reduction_factor < 1:
        raise ValueError(
            f"bottleneck reduction_factor must be a positive int, got {config.reduction_factor!r}"
        )
    if config.init not in ("zeros", "random"):
        raise ValueError(f"bottleneck init must be 'zeros' or 'random', got {config.init!r}")


def resolve(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """The config checked, with the style's output projections filled in."""
    _check(config)
    if config.target_modules is not None:
        return config
    return dataclasses.replace(
        config, target_modules=default_targets(model.config.model_type, config.style)
    )


def inject(model: nn.Module, config: BottleneckConfig, name: str) -> list[str]:
    """Wrap every targeted output projection and add adapter `name`; returns the wrapped names."""
    selected = select_modules(
        model, config.target_modules, what=f"bottleneck adapter {name!r}"
    )
    for module_name in selected:
        wrap(model, module_name, BottleneckLayer).add(name, config, module_name)
    return selected


# ---------------------------------------------------------------- adapter_config.json


def to_peft(config: BottleneckConfig) -> dict:
    targets = config.target_modules
    return {
        "style": config.style,
        "reduction_factor": config.reduction_factor,
        "activation": config.activation,
        "target_modules": targets if isinstance(targets, str) or targets is None else list(targets),
        "init": config.init,
    }


def from_peft(data: dict) -> BottleneckConfig:
    if "style" not in data and ("bottleneck_size" in data or "non_linearity" in data):
        raise ValueError(
            "this BOTTLENECK adapter was written by the LLM-Adapters fork of peft (bias-free "
            "layers sized by bottleneck_size), which edgepeft does not read; retrain it with "
            "edgepeft's BottleneckConfig"
        )
    for key in ("style", "reduction_factor", "activation"):
        if key not in data:
            raise ValueError(f"bottleneck adapter config has no {key!r} field")
    targets = data.get("target_modules")
    config = BottleneckConfig(
        style=data["style"],
        reduction_factor=data["reduction_factor"],
        activation=data["activation"],
        target_modules=targets if isinstance(targets, str) or targets is None else tuple(targets),
        init=data.get("init", "zeros"),
    )
    _check(config)
    return config


METHOD = MethodSpec(
    config_cls=BottleneckConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=BottleneckLayer.mergeable,
    separate_file="onnx_adapter",
    streamed_merge=False,
    streamed_separate=True,
    run_config_names=("bottleneck",),
)
