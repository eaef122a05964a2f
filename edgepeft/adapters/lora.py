"""LoRA (Hu et al., 2021), rsLoRA and DoRA around any linear layer, quantized or not.

    x ──► base_layer (frozen; fp32, NF4, FP4 or int8) ──────────────┐
    │                                                               + ──► y
    └──► dropout ──► A (r × in) ──► B (out × r) ──► × alpha/r ──────┘
                                                     (alpha/√r with rsLoRA)
    DoRA: y = base(x) + dora_extra(...)   (see dora.py)
    DyLoRA: at rank b <= r (`set_active_rank`, or `sampled_rank` per training step) only
            A[:b] (b × in) and B[:, :b] (out × b) take part, scaled alpha/b (alpha/√b)
    QA-LoRA: A reads the input pooled per group, A (r × in/group) (see qalora.py)

The wrapper calls the base layer's own forward, so bitsandbytes does the
quantized matmul; LoRA never branches on the backend.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.adapters.dora import dora_delta, dora_extra, initial_magnitude
from edgepeft.adapters.layer import AdapterLayer, MethodSpec
from edgepeft.adapters.qalora import check as check_qalora
from edgepeft.adapters.qalora import expand_a, pool
from edgepeft.adapters.saved_modules import add_modules_to_save
from edgepeft.adapters.targets import pattern_value, select_configured, wrap
from edgepeft.architectures import require_architecture
from edgepeft.base import linear_features
from edgepeft.config import LoraConfig


class LoraLayer(AdapterLayer):
    peft_type = "LORA"
    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.alpha: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.active_rank: dict[str, int] = {}
        """DyLoRA: adapter name -> the leading rank in use; absent: the full rank."""
        self.qalora_group: dict[str, int] = {}
        """QA-LoRA: adapter name -> input features pooled per group; absent: plain LoRA."""

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        in_f, out_f = linear_features(self.innermost())
        device = next(self.innermost().parameters()).device
        if config.use_qalora:  # inject checked the layer (qalora.check)
            self.qalora_group[name] = config.qalora_group_size
            in_f //= config.qalora_group_size
        A = nn.Linear(in_f, r, bias=False, device=device)
        B = nn.Linear(r, out_f, bias=False, device=device)
        if config.init == "default":
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif config.init == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        # "random": nn.Linear's own init for both, so the adapter starts non-zero.
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.alpha[name], self.rslora[name] = alpha, config.use_rslora
        if config.use_dora:
            m = initial_magnitude(self.innermost(), A, B, self.scaling[name])
            self.lora_magnitude_vector[name] = nn.Parameter(m)

    def forget(self, name: str) -> None:
        for state in (self.scaling, self.alpha, self.rslora, self.active_rank, self.qalora_group):
            state.pop(name, None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A (b, in), B (out, b) and the scaling of adapter `name` at its active rank b
        (DyLoRA, `set_active_rank`), or at its full rank r."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        b = self.active_rank.get(name)
        if b is None or b == A.shape[0]:
            return A, B, self.scaling[name]
        scaling = self.alpha[name] / (math.sqrt(b) if self.rslora[name] else b)
        return A[:b], B[:, :b], scaling

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        # peft stores the DoRA magnitude under the bare container name.
        out = {
            "lora_A.weight": self.lora_A[name].weight,
            "lora_B.weight": self.lora_B[name].weight,
        }
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return out
        A, B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        x_in = dropout(x.to(A.weight.dtype))
        if name in self.lora_magnitude_vector:
            # peft semantics: with dropout active, DoRA recomputes W x on the dropped input.
            dropped = self.training and not isinstance(dropout, nn.Identity)
            extra = dora_extra(
                x_in,
                None if dropped else out.to(x_in.dtype),
                self.innermost(),
                A,
                B,
                self.lora_magnitude_vector[name],
                self.scaling[name],
            )
        else:
            a, b, scaling = self.factors(name)
            if name in self.qalora_group:  # (..., in) -> (..., in/group)
                x_in = pool(x_in, self.innermost(), self.qalora_group[name])
            extra = F.linear(F.linear(x_in, a), b) * scaling  # (..., in) -> (..., b) -> (..., out)
        return out + extra.to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            return dora_delta(
                self.innermost(), A, B, self.lora_magnitude_vector[name], self.scaling[name]
            )
        a, b, scaling = self.factors(name)
        return (b.detach().float() @ self.input_a(name, a).detach().float()) * scaling

    def input_a(self, name: str, a: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter `name`'s A (or the given rows of it) as a plain (b, in) matrix on the
        layer's input: QA-LoRA's pooling folded in (`qalora.expand_a`), else A itself."""
        a = self.lora_A[name].weight if a is None else a
        group = self.qalora_group.get(name)
        return a if group is None else expand_a(a, self.innermost(), group)


def resolve(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config with the architecture's default targets filled in."""
    _check_layer_selection(config)
    if config.target_modules is not None:
        return config
    arch = require_architecture(model.config.model_type, "LoRA target modules")
    return dataclasses.replace(config, target_modules=arch.lora_targets)


def _check_layer_selection(config: LoraConfig) -> None:
    """Refuse the combinations HF peft refuses, so every saved folder loads in peft."""
    if isinstance(config.target_modules, str) and (
        config.layers_to_transform is not None or config.layers_pattern is not None
    ):
        raise ValueError(
            f"LoRA: layers_to_transform/layers_pattern cannot be combined with target_modules="
            f"{config.target_modules!r} (a regex or 'all-linear'); HF peft refuses that config. "
            "Name the modules in a tuple, or put the layer indices in the regex"
        )
    if config.layers_pattern is not None and config.layers_to_transform is None:
        raise ValueError(
            f"LoRA: layers_pattern={config.layers_pattern!r} needs layers_to_transform too "
            "(HF peft refuses it alone); give the layer indices or drop layers_pattern"
        )


def inject(model: nn.Module, config: LoraConfig, name: str) -> list[str]:
    """Wrap every targeted layer and add adapter `name`; returns the wrapped module names."""
    selected = select_configured(model, config, what=f"LoRA adapter {name!r}")
    if config.use_qalora:  # every layer checked before any is wrapped
        for module_name in selected:
            base = model.get_submodule(module_name)
            base = base.innermost() if isinstance(base, AdapterLayer) else base
            check_qalora(base, config.qalora_group_size, f"{module_name} (adapter {name!r})")
    for module_name in selected:
        r = pattern_value(module_name, dict(config.rank_pattern), config.r)
        alpha = pattern_value(module_name, dict(config.alpha_pattern), config.alpha)
        wrap(model, module_name, LoraLayer).add(name, r, alpha, config)
    return selected + add_modules_to_save(model, config.modules_to_save, name)


# ---------------------------------------------------------------- DyLoRA: nested ranks

DYLORA_METADATA = "edgepeft_dylora_min_rank"
"""safetensors metadata key of a DyLoRA folder's lowest trained rank. It stays out of
adapter_config.json, so HF peft loads the folder as the plain rank-r LoRA it is, with no
warning about an unknown field."""


def _lora_config(model: nn.Module, name: str | None) -> tuple[str, LoraConfig]:
    # The model's config table (inject.list_adapters) read directly: inject imports the
    # registry, which imports this module.
    configs = getattr(model, "edgepeft_adapters", {})
    name = name or getattr(model, "edgepeft_active", None)
    if name not in configs:
        have = ", ".join(configs) or "none"
        raise KeyError(f"no adapter named {name!r} on this model (adapters: {have})")
    config = configs[name]
    if not isinstance(config, LoraConfig) or config.dylora_min_rank is None:
        raise ValueError(
            f"adapter {name!r} is not a DyLoRA adapter (LoraConfig(dylora_min_rank=...)): its "
            "ranks below r were never trained on their own, so it runs at its full rank only"
        )
    return name, config


def set_active_rank(model: nn.Module, rank: int | None, name: str | None = None) -> None:
    """Run DyLoRA adapter `name` (default: the active one) at its first `rank` ranks.

    Every LoRA layer of the adapter then uses A[:rank], B[:, :rank] and alpha/rank, in
    training and evaluation alike; None goes back to the full rank. A plain LoRA folder of
    that rank is `edgepeft.truncate_rank`.
    """
    name, config = _lora_config(model, name)
    if rank is not None and not config.dylora_min_rank <= rank <= config.r:
        raise ValueError(
            f"adapter {name!r} was trained at ranks {config.dylora_min_rank} to {config.r}; "
            f"got rank {rank}"
        )
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            if rank is None:
                module.active_rank.pop(name, None)
            else:
                module.active_rank[name] = rank


def step_rank(config: LoraConfig, seed: int, step: int) -> int:
    """DyLoRA's rank for optimizer step `step` of a run seeded `seed`: uniform in
    [dylora_min_rank, r], a function of (seed, step) alone, so a resumed run and every
    data-parallel rank draw the same one, and no other random stream moves."""
    return random.Random(f"dylora:{seed}:{step}").randint(config.dylora_min_rank, config.r)


@contextmanager
def sampled_rank(model: nn.Module, name: str, seed: int, step: int) -> Iterator[int | None]:
    """During the block, DyLoRA adapter `name` runs at `step_rank(...)` in every layer;
    the rank it had before is restored after. A no-op (yields None) for other adapters."""
    config = getattr(model, "edgepeft_adapters", {}).get(name)
    if not isinstance(config, LoraConfig) or config.dylora_min_rank is None:
        yield None
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.scaling]
    before = [m.active_rank.get(name) for m in layers]
    rank = step_rank(config, seed, step)
    set_active_rank(model, rank, name)
    try:
        yield rank
    finally:
        for module, old in zip(layers, before, strict=True):
            if old is None:
                module.active_rank.pop(name, None)
            else:
                module.active_rank[name] = old


def dylora_metadata(config) -> dict[str, str]:
    """The safetensors metadata that marks a saved adapter as DyLoRA (empty otherwise)."""
    low = getattr(config, "dylora_min_rank", None)
    return {} if low is None else {DYLORA_METADATA: str(low)}


def with_dylora_metadata(config, metadata: dict) -> object:
    """`config` with the DyLoRA lowest rank a saved folder's metadata records."""
    if DYLORA_METADATA not in metadata or not isinstance(config, LoraConfig):
        return config
    return dataclasses.replace(config, dylora_min_rank=int(metadata[DYLORA_METADATA]))


# ---------------------------------------------------------------- HF peft JSON

_PEFT_INIT = {"default": True, "gaussian": "gaussian", "random": False}

# peft fields whose non-default values change what a saved adapter computes and
# that edgepeft does not implement: refuse them rather than load something else.
_UNSUPPORTED = {
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
}


def to_peft(config: LoraConfig) -> dict:
    targets = config.target_modules
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": _PEFT_INIT[config.init],
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "layers_to_transform": list(config.layers_to_transform)
        if config.layers_to_transform is not None
        else None,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "exclude_modules": list(config.exclude_modules) if config.exclude_modules else None,
        "bias": "none",
        # peft's fields; peft builds QA-LoRA layers over GPTQ bases only (qalora.py)
        **(
            {"use_qalora": True, "qalora_group_size": config.qalora_group_size}
            if config.use_qalora
            else {}
        ),
    }


def from_peft(data: dict) -> LoraConfig:
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, [], {}):
            raise ValueError(
                f"LoRA adapter uses {key}={data[key]!r}, which edgepeft does not implement"
            )
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(
            f"LoRA adapter was initialised with init_lora_weights={init!r}, which rewrites the "
            "base weights; convert it to a plain LoRA with peft first"
        )
    targets = data.get("target_modules")
    layers = data.get("layers_to_transform")
    return LoraConfig(
        r=int(data["r"]),
        alpha=data.get("lora_alpha", 8),
        dropout=data.get("lora_dropout", 0.0),
        target_modules=targets if isinstance(targets, str) or targets is None else tuple(targets),
        use_rslora=bool(data.get("use_rslora", False)),
        use_dora=bool(data.get("use_dora", False)),
        init={True: "default", False: "random", "gaussian": "gaussian"}[init],
        rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern=dict(data.get("alpha_pattern") or {}),
        layers_to_transform=(layers,) if isinstance(layers, int) else tuple(layers) if layers else None,
        layers_pattern=data.get("layers_pattern") if isinstance(data.get("layers_pattern"), str) else None,
        modules_to_save=tuple(data["modules_to_save"]) if data.get("modules_to_save") else None,
        exclude_modules=tuple(data["exclude_modules"]) if data.get("exclude_modules") else None,
        use_qalora=bool(data.get("use_qalora", False)),
        qalora_group_size=int(data.get("qalora_group_size", 16)),
    )


METHOD = MethodSpec(
    config_cls=LoraConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=LoraLayer.mergeable,
    separate_file="onnx_adapter",
    streamed_merge=True,  # DoRA included
    streamed_separate=True,  # DoRA excepted: export/api.py loads the base whole for its scale
    run_config_names=("lora", "dora"),
)
