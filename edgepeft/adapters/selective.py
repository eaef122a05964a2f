"""Selective tuning: train a named subset of the base's own parameters (BitFit, norms, ...).

    parent.norm = SelectiveLayer(base_layer=<RMSNorm>)
                    ├─ base_layer                  frozen, keeps its original weight
                    └─ selective_delta["sql"]      ParameterDict {"weight": Δ}, one per adapter

    active:   base_layer's forward with weight := weight + Δ   (torch.func.functional_call)
    inactive: base_layer's forward, untouched

Patterns are regexes `re.search`-ed in full parameter names as the base names
them ("model.layers.0.self_attn.q_proj.bias"). The wrapper sits on the module
that owns each selected parameter and keeps the trained change as a delta
beside the frozen original, so several selective adapters share one base and
merge exactly: merged = original + Δ. A parameter tied to others (GPT-2's
`lm_head.weight` is `transformer.wte.weight`) is tuned everywhere it is used:
all its owners share one Δ, as a direct edit of the tied tensor would.

Quantized weights hold codes, not values, so they cannot be tuned this way;
biases, norms, embeddings and an unquantized lm_head can.

File keys: the delta of parameter `<param>` of module `<path>` is saved as
`base_model.model.<path>.<param>_delta` (e.g. "base_model.model.model.norm.weight_delta"),
in fp32. adapter_config.json: {"peft_type": "SELECTIVE", "patterns": [...], "init": ...}.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from edgepeft.adapters.layer import AdapterLayer, MethodSpec, ReadThroughLayer, adapter_modules
from edgepeft.adapters.targets import base_of, candidate_modules, wrap
from edgepeft.base import is_linear_like, is_quantized
from edgepeft.config import SelectiveConfig

DELTA_SUFFIX = "_delta"
_RANDOM_STD = 0.1


class SelectiveLayer(ReadThroughLayer):  # the delta applies in forward
    peft_type = "SELECTIVE"
    adapter_attrs = ("selective_delta",)
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_delta = nn.ModuleDict()

    def add(self, name: str, param_name: str, delta: nn.Parameter) -> None:
        """Tune the innermost module's parameter `param_name` by `delta` under adapter `name`."""
        if name not in self.selective_delta:
            self.selective_delta[name] = nn.ParameterDict()
        self.selective_delta[name][param_name] = delta

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{p}{DELTA_SUFFIX}": d for p, d in self.selective_delta[name].items()}

    def _overrides(self, name: str) -> dict[str, torch.Tensor]:
        """{path below base_layer: original + Δ} for functional_call."""
        prefix = ""
        module = self.base_layer
        while isinstance(module, AdapterLayer):  # other wrappers stacked in between
            prefix += "base_layer."
            module = module.base_layer
        out = {}
        for param_name, delta in self.selective_delta[name].items():
            original = getattr(module, param_name)
            # Δ stays fp32 (it trains there); the sum runs in the module's own dtype.
            out[prefix + param_name] = (original.float() + delta).to(original.dtype)
        return out

    def forward(self, *args, **kwargs):
        if self.active is None:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, self._overrides(self.active), args, kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        raise TypeError(
            f"SELECTIVE adapter {name!r} changes named parameters, not a weight delta; "
            "use merge_update, which gives their merged values"
        )

    def merge_update(self, name: str) -> dict[str, torch.Tensor]:
        """{param: original + Δ} in fp32 for this module's selected parameters only.

        A quantized linear can only have its bias selected, so its weight is never
        listed. An unquantized GPT-2 Conv1D weight is given as (out, in), as the
        protocol wants for every linear weight.
        """
        module = self.innermost()
        conv1d = is_linear_like(module) and not isinstance(module, nn.Linear)
        out = {}
        for param_name, delta in self.selective_delta[name].items():
            original = getattr(module, param_name).detach()
            value = original.float() + delta.detach().float().to(original.device)
            out[param_name] = value.t() if conv1d and param_name == "weight" else value
        return out


# ---------------------------------------------------------------- selection


def _base_parameters(model: nn.Module) -> Iterator[tuple[str, str, str, nn.Parameter]]:
    """(full name, owner module path, local name, parameter) of every base parameter."""
    for path, module in candidate_modules(model):
        owner = base_of(module)
        for local, param in owner.named_parameters(recurse=False):
            yield f"{path}.{local}", path, local, param


def _compile(patterns: tuple[str, ...] | str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not patterns:
        raise ValueError("SelectiveConfig.patterns is empty; name at least one parameter regex")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"selective pattern {p!r} is not a valid regex: {e}") from e
    return compiled


def _initial_delta(param: nn.Parameter, init: str) -> nn.Parameter:
    delta = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    if init == "random":
        delta.normal_(std=_RANDOM_STD)
    return nn.Parameter(delta)


def resolve(model: nn.Module, config: SelectiveConfig) -> SelectiveConfig:
    """Selective tuning has no architecture defaults; only the patterns are checked."""
    _compile(config.patterns)
    if config.init not in ("zeros", "random"):
        raise ValueError(f"selective init must be 'zeros' or 'random', got {config.init!r}")
    return config


def inject(model: nn.Module, config: SelectiveConfig, name: str) -> list[str]:
    """Wrap the owner of every selected parameter and add its delta; returns the wrapped names."""
    patterns = _compile(config.patterns)
    params = list(_base_parameters(model))
    for pattern in patterns:
        if not any(pattern.search(full) for full, *_ in params):
            raise ValueError(
                f"selective adapter {name!r}: pattern {pattern.pattern!r} matches no parameter; "
                f"parameter names look like {', '.join(full for full, *_ in params[:6])}"
            )
    # Group aliases: a tied parameter is selected everywhere once any of its names matches.
    aliases: dict[int, list[tuple[str, str, str, nn.Parameter]]] = {}
    for entry in params:
        aliases.setdefault(id(entry[3]), []).append(entry)
    chosen = [
        group
        for group in aliases.values()
        if any(p.search(full) for p in patterns for full, *_ in group)
    ]
    for group in chosen:
        for full, path, _, param in group:
            owner = base_of(model.get_submodule(path))
            if is_quantized(owner) and param is owner.weight:
                raise ValueError(
                    f"selective adapter {name!r}: {full} is a quantized weight and cannot be "
                    "tuned; only unquantized parameters (biases, norms, embeddings, lm_head) can "
                    "be selectively tuned. Narrow the patterns, or load the base with quant=\"none\""
                )
            if not param.is_floating_point():
                raise ValueError(
                    f"selective adapter {name!r}: {full} has dtype {param.dtype}, not a float; "
                    "narrow the patterns"
                )
    wrapped: list[str] = []
    for group in chosen:
        delta = _initial_delta(group[0][3], config.init)  # one Δ shared by all aliases
        for _, path, local, _ in group:
            wrap(model, path, SelectiveLayer).add(name, local, delta)
            wrapped.append(path)
    return list(dict.fromkeys(wrapped))


def selected_parameters(model: nn.Module, name: str) -> list[str]:
    """Full names of the base parameters adapter `name` tunes, in model order."""
    return [
        f"{path}.{local}"
        for path, module in adapter_modules(model)
        if isinstance(module, SelectiveLayer) and name in module.selective_delta
        for local in module.selective_delta[name]
    ]


# ---------------------------------------------------------------- adapter_config.json


def to_peft(config: SelectiveConfig) -> dict:
    patterns = config.patterns
    return {
        "patterns": [patterns] if isinstance(patterns, str) else list(patterns),
        "init": config.init,
    }


def from_peft(data: dict) -> SelectiveConfig:
    patterns = data.get("patterns")
    if not patterns:
        raise ValueError("selective adapter config has no 'patterns' (parameter-name regexes)")
    config = SelectiveConfig(
        patterns=(patterns,) if isinstance(patterns, str) else tuple(patterns),
        init=data.get("init", "zeros"),
    )
    _compile(config.patterns)
    return config


METHOD = MethodSpec(
    config_cls=SelectiveConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=SelectiveLayer.mergeable,
    separate_file=None,  # it replaces norms and biases, which no graph input feeds
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("selective",),
)
