"""Parallel bottleneck adapter at the FFN (He et al., 2022; AdapterHub's `ParBn`).

    h ──► ffn_norm (post_attention_layernorm) ──► x ──► mlp: … ──► down_proj (frozen) ──► y ──┐
    │                                                                                       + ──► y'
    └──► down (d → d/rf, bias) ──► act ──► up (d/rf → d, bias) ──► × scaling ────────────────┘
    then the decoder layer adds y' = mlp(x) + branch to its residual stream h, as it adds y.

The branch reads h, the FFN sub-block's input before its norm, and adds to the MLP's
output: this is where AdapterHub's llama `output_adapters` put a `ParallelAdapter` (its
input is the residual the layer saved before `post_attention_layernorm`). `ParallelLayer`
wraps the MLP's output projection (`mlp.down_proj`, whose output is the MLP's), so LoRA
and the other methods still find every module inside the MLP by its own path; h reaches
it through a forward pre-hook on the layer's FFN norm (the norm's input), taken once per
forward. Gemma's sandwich norms: h is the input of `pre_feedforward_layernorm`, and the
branch adds before `post_feedforward_layernorm` (to the MLP's output). Separate mode
names the graph inputs after the MLP block (`model.layers.i.mlp.adapter_down.weight`, see
`block_name`), where the fused graph adds the branch.

`up` starts at zero (AdapterHub's "mam_adapter" init: Kaiming-uniform down weight, zero
down bias, zero up), so a new adapter is the identity. The branch is non-linear in h:
merging raises. The folder layout is the bottleneck one with its own peft_type:

    adapter_config.json  {"peft_type": "PARALLEL_ADAPTER", "reduction_factor": 2,
                          "scaling": 4.0, "activation": "relu", "init": "zeros", ...}
    adapter_model.safetensors
        base_model.model.model.layers.<i>.mlp.down_proj.adapter_down.weight   (d/rf, d)
        base_model.model.model.layers.<i>.mlp.down_proj.adapter_down.bias     (d/rf,)
        base_model.model.model.layers.<i>.mlp.down_proj.adapter_up.weight     (d, d/rf)
        base_model.model.model.layers.<i>.mlp.down_proj.adapter_up.bias       (d,)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edgepeft.adapters.bottleneck import ACTIVATIONS
from edgepeft.adapters.layer import AdapterLayer, MethodSpec
from edgepeft.adapters.targets import select_modules, wrap
from edgepeft.architectures import require_architecture
from edgepeft.base import linear_features
from edgepeft.config import ParallelAdapterConfig

FFN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")
"""The norm in front of a decoder layer's FFN, by attribute name, first match wins
(gemma2/3 have both of the first two: the pre-feedforward one feeds the MLP)."""


class ParallelLayer(AdapterLayer):
    peft_type = "PARALLEL_ADAPTER"
    adapter_attrs = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self._block_input: torch.Tensor | None = None
        self._tap = None

    def tap(self, norm: nn.Module) -> None:
        """Read h from `norm`'s input on every forward (once per layer)."""
        if self._tap is None:
            self._tap = norm.register_forward_pre_hook(self._remember)

    def _remember(self, module: nn.Module, args: tuple) -> None:
        self._block_input = args[0] if self.active is not None else None

    def add(self, name: str, config, module_name: str = "") -> None:
        _, hidden = linear_features(self.innermost())
        width = hidden // config.reduction_factor
        if width < 1:
            raise ValueError(
                f"parallel adapter {name!r} on {module_name or 'an FFN'}: hidden size {hidden} // "
                f"reduction_factor {config.reduction_factor} is 0; use a reduction_factor <= {hidden}"
            )
        device = next(self.innermost().parameters()).device
        down = nn.Linear(hidden, width, bias=True, device=device)  # Kaiming-uniform weight
        up = nn.Linear(width, hidden, bias=True, device=device)
        if config.init == "zeros":
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.activation[name] = config.activation
        self.scaling[name] = float(config.scaling)

    def forget(self, name: str) -> None:
        self.activation.pop(name, None)
        self.scaling.pop(name, None)
        if not self.names() and self._tap is not None:  # about to be unwrapped
            self._tap.remove()
            self._tap = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        h, self._block_input = self._block_input, None
        name = self.active
        if name is None:
            return out
        if h is None or h.shape[:-1] != x.shape[:-1] or h.shape[-1] != out.shape[-1]:
            raise RuntimeError(
                f"parallel adapter {name!r}: the FFN's input h was not seen before its MLP ran "
                "(the MLP was called outside its decoder layer); call the whole model"
            )
        down, up = self.adapter_down[name], self.adapter_up[name]
        hidden = ACTIVATIONS[self.activation[name]](down(h.to(down.weight.dtype)))  # (..., d/rf)
        return out + (self.scaling[name] * up(hidden)).to(out.dtype)  # (..., d)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise self._not_mergeable(name)

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        raise self._not_mergeable(name)

    def _not_mergeable(self, name: str) -> TypeError:
        return TypeError(
            f"parallel adapter {name!r} adds s * up(act(down(h))) beside the FFN, non-linear in "
            "its input, so no base weight update reproduces it and it cannot be merged; keep "
            "it separate (export supports that)"
        )


def block_name(path: str) -> str:
    """The MLP block a wrapped output projection belongs to ("….mlp.down_proj" -> "….mlp")."""
    return path.rsplit(".", 1)[0]


def ffn_outputs(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    """(FFN output projection name, the norm in front of its FFN) per decoder layer."""
    arch = require_architecture(model.config.model_type, "parallel adapter placement")
    found = []
    for name in select_modules(model, (arch.ffn_output,), what=what):
        layer_path = name[: -len(arch.ffn_output) - 1]
        layer = model.get_submodule(layer_path)
        norm = next((getattr(layer, n) for n in FFN_NORMS if hasattr(layer, n)), None)
        if not isinstance(norm, nn.Module):
            raise ValueError(
                f"{what}: decoder layer {layer_path} has no FFN norm ({', '.join(FFN_NORMS)}) "
                "to read the FFN's input from"
            )
        found.append((name, norm))
    return found


def check(config) -> None:
    """Refuse values the parallel branch (of ParallelAdapterConfig or MAMConfig) cannot use."""
    what = type(config).__name__
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"{what}.activation must be one of {tuple(ACTIVATIONS)}, got {config.activation!r}"
        )
    rf = config.reduction_factor
    if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
        raise ValueError(f"{what}.reduction_factor must be a positive int, got {rf!r}")
    if isinstance(config.scaling, bool) or not isinstance(config.scaling, (int, float)):
        raise ValueError(f"{what}.scaling must be a number, got {config.scaling!r}")
    if config.init not in ("zeros", "random"):
        raise ValueError(f"{what}.init must be 'zeros' or 'random', got {config.init!r}")


def resolve(model: nn.Module, config: ParallelAdapterConfig) -> ParallelAdapterConfig:
    check(config)
    return dataclasses.replace(config, scaling=float(config.scaling))


def inject(model: nn.Module, config, name: str) -> list[str]:
    """Wrap every decoder layer's MLP and add adapter `name`; returns the wrapped names."""
    selected = []
    for module_name, norm in ffn_outputs(model, f"parallel adapter {name!r}"):
        layer = wrap(model, module_name, ParallelLayer)
        layer.add(name, config, module_name)
        layer.tap(norm)
        selected.append(module_name)
    return selected


def to_peft(config) -> dict:
    return {
        "reduction_factor": config.reduction_factor,
        "scaling": config.scaling,
        "activation": config.activation,
        "init": config.init,
    }


def from_peft(data: dict) -> ParallelAdapterConfig:
    for key in ("reduction_factor", "scaling", "activation"):
        if key not in data:
            raise ValueError(f"parallel adapter config has no {key!r} field")
    config = ParallelAdapterConfig(
        reduction_factor=data["reduction_factor"],
        scaling=float(data["scaling"]),
        activation=data["activation"],
        init=data.get("init", "zeros"),
    )
    check(config)
    return config


METHOD = MethodSpec(
    config_cls=ParallelAdapterConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=ParallelLayer.mergeable,
    separate_file="onnx_adapter",
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("parallel",),
)
