"""Selective tuning: train a named subset of the base's own parameters (BitFit, norms, ...).

    parent.norm = SelectiveLayer(base_layer=<RMSNorm>)
                    ├─ base_layer                  frozen, keeps its original weight
                    └─ selective_delta["sql"]      ParameterDict {"weight": Δ}, one per adapter

    active:   base_layer's forward with weight := weight + Δ   (torch.func.functional_call)
    inactive: base_layer's forward, untouched

    importance-masked (SelectiveConfig.mask="importance", mask chosen by importance.py):
                    ├─ selective_delta["sql"]      {"weight": values}   only the trained entries
                    └─ selective_index["sql"]      {"weight": SparseIndex}  where they sit
    Δ = SparseIndex.scatter(values): zeros elsewhere, so the entries outside the mask are
    not parameters at all and stay exactly 0 through any optimizer (weight decay included).

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
A masked delta is saved sparse: `<param>_delta.values` (fp32, the trained entries / rows /
columns) and `<param>_delta.indices` (int64, ascending: flat entry, row or column numbers),
and the config adds mask, budget, score, structure, calibration_batches, selected (units kept
per parameter) and density.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from edgepeft.adapters.layer import AdapterLayer, MethodSpec, ReadThroughLayer, adapter_modules
from edgepeft.adapters.targets import base_of, candidate_modules, wrap
from edgepeft.base import is_linear_like, is_quantized
from edgepeft.config import SelectiveConfig

DELTA_SUFFIX = "_delta"
VALUES, INDICES = ".values", ".indices"
_RANDOM_STD = 0.1
STRUCTURES = ("unstructured", "rows", "columns")


class SparseIndex(nn.Module):
    """Where a masked delta's trained values sit in its parameter (the mask, as indices).

        unstructured  indices: flat entry numbers        values (k,)
        rows          indices: rows of the (n0, -1) view  values (k, numel / n0)
        columns       indices: columns of the (-1, n_last) view   values (numel / n_last, k)

    A 1-D parameter's rows and columns are its single entries.
    """

    def __init__(
        self, structure: str, shape: tuple[int, ...], indices: torch.Tensor, param: str = ""
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(
                f"sparse delta structure must be one of {STRUCTURES}, got {structure!r}"
            )
        self.structure = structure
        self.shape = tuple(shape)
        self.param = param
        """Full name of the base parameter, for messages."""
        self.register_buffer("indices", indices.to(torch.int64))

    def units(self) -> int:
        """How many entries, rows or columns the parameter has."""
        return self._view()[self._axis()] if self.structure != "unstructured" else self._numel()

    def unit_size(self) -> int:
        """Entries per unit."""
        return 1 if self.structure == "unstructured" else self._numel() // self.units()

    def values_shape(self) -> tuple[int, ...]:
        k = self.indices.numel()
        if self.structure == "unstructured":
            return (k,)
        return (k, self.unit_size()) if self.structure == "rows" else (self.unit_size(), k)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The dense delta: `values` in place, zeros elsewhere (differentiable in `values`)."""
        if self.structure == "unstructured":
            dense = values.new_zeros(self._numel()).index_copy(0, self.indices, values)
        else:
            dense = values.new_zeros(self._view()).index_copy(self._axis(), self.indices, values)
        return dense.reshape(self.shape)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of `dense` (parameter-shaped) the mask keeps, shaped like the values."""
        if self.structure == "unstructured":
            return dense.reshape(-1).index_select(0, self.indices)
        return dense.reshape(self._view()).index_select(self._axis(), self.indices)

    def mask(self) -> torch.Tensor:
        """Boolean, parameter-shaped: True where the delta trains."""
        ones = torch.ones(self.values_shape(), dtype=torch.bool, device=self.indices.device)
        return self.scatter(ones)

    def check(self, where: str) -> None:
        """Refuse indices that are out of range, repeated or unsorted (a damaged file)."""
        idx, units = self.indices, self.units()
        bad = idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= units)
        if bad or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise ValueError(
                f"{where}: sparse delta indices must be ascending, unique and in [0, {units}) "
                f"({self.structure} of a {list(self.shape)} parameter); the file is damaged or "
                "was written for another base"
            )

    def _numel(self) -> int:
        return math.prod(self.shape)

    def _axis(self) -> int:
        return 0 if self.structure == "rows" else 1

    def _view(self) -> tuple[int, int]:
        if self.structure == "rows":
            return (self.shape[0], self._numel() // self.shape[0])
        return (self._numel() // self.shape[-1], self.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.structure}, shape={list(self.shape)}, kept={self.indices.numel()}"


class SelectiveLayer(ReadThroughLayer):  # the delta applies in forward
    peft_type = "SELECTIVE"
    adapter_attrs = ("selective_delta", "selective_index")
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_delta = nn.ModuleDict()
        self.selective_index = nn.ModuleDict()

    def add(
        self, name: str, param_name: str, delta: nn.Parameter, index: SparseIndex | None = None
    ) -> None:
        """Tune the innermost module's parameter `param_name` by `delta` under adapter `name`.

        With `index`, `delta` holds only the trained values and `index` says where they go
        (an importance mask); any earlier delta of that parameter is replaced.
        """
        if name not in self.selective_delta:
            self.selective_delta[name] = nn.ParameterDict()
        self.selective_delta[name][param_name] = delta
        if index is not None:
            if name not in self.selective_index:
                self.selective_index[name] = nn.ModuleDict()
            self.selective_index[name][param_name] = index

    def sparse_index(self, name: str, param_name: str) -> SparseIndex | None:
        """Where a masked delta's values sit; None for a dense delta."""
        indices = self.selective_index[name] if name in self.selective_index else {}
        return indices[param_name] if param_name in indices else None

    def delta(self, name: str, param_name: str) -> torch.Tensor:
        """The parameter-shaped fp32 delta (a masked one scattered; zeros outside its mask)."""
        values = self.selective_delta[name][param_name]
        index = self.sparse_index(name, param_name)
        return values if index is None else index.scatter(values)

    def mask(self, name: str, param_name: str) -> torch.Tensor:
        """Boolean, parameter-shaped: where adapter `name` trains `param_name` (all True if dense)."""
        index = self.sparse_index(name, param_name)
        if index is None:
            shape = self.selective_delta[name][param_name].shape
            return torch.ones(shape, dtype=torch.bool)
        return index.mask()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for p, d in self.selective_delta[name].items():
            index = self.sparse_index(name, p)
            if index is None:
                out[f"{p}{DELTA_SUFFIX}"] = d
            else:
                out[f"{p}{DELTA_SUFFIX}{VALUES}"] = d
                out[f"{p}{DELTA_SUFFIX}{INDICES}"] = index.indices
        return out

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in values and indices; indices are checked (range, order) before any copy."""
        for key, value in tensors.items():
            if key.endswith(INDICES):
                param_name = key.removesuffix(DELTA_SUFFIX + INDICES)
                index = self.sparse_index(name, param_name)
                probe = SparseIndex(index.structure, index.shape, value)
                probe.check(
                    f"selective adapter {name!r}, tensor {index.param}{key[len(param_name) :]}"
                )
        super().load_tensors(name, tensors)

    def _overrides(self, name: str) -> dict[str, torch.Tensor]:
        """{path below base_layer: original + Δ} for functional_call."""
        prefix = ""
        module = self.base_layer
        while isinstance(module, AdapterLayer):  # other wrappers stacked in between
            prefix += "base_layer."
            module = module.base_layer
        out = {}
        for param_name in self.selective_delta[name]:
            original = getattr(module, param_name)
            delta = self.delta(name, param_name)
            # Δ stays fp32 (it trains there); the sum runs in the module's own dtype.
            out[prefix + param_name] = (original.float() + delta).to(original.dtype)
        return out

    def forward(self, *args, **kwargs):
        if self.active is None:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(
            self.base_layer, self._overrides(self.active), args, kwargs
        )

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
        for param_name in self.selective_delta[name]:
            original = getattr(module, param_name).detach()
            delta = self.delta(name, param_name).detach()
            value = original.float() + delta.float().to(original.device)
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
                    'be selectively tuned. Narrow the patterns, or load the base with quant="none"'
                )
            if not param.is_floating_point():
                raise ValueError(
                    f"selective adapter {name!r}: {full} has dtype {param.dtype}, not a float; "
                    "narrow the patterns"
                )
    if config.mask is not None:
        _check_mask_layout(config, name, {group[0][0]: group[0][3].shape for group in chosen})
    wrapped: list[str] = []
    for group in chosen:
        delta = _initial_delta(group[0][3], config.init)  # one Δ shared by all aliases
        index = None
        if config.selected:  # a chosen mask (a saved adapter): its layout, indices to be loaded
            kept = config.selected[group[0][0]]
            arange = torch.arange(kept, device=delta.device)
            index = SparseIndex(config.structure, delta.shape, arange, param=group[0][0])
            delta = nn.Parameter(index.gather(delta.detach()).contiguous())
        for _, path, local, _ in group:
            wrap(model, path, SelectiveLayer).add(name, local, delta, index)
            wrapped.append(path)
    return list(dict.fromkeys(wrapped))


def units_of(shape: tuple[int, ...], structure: str) -> int:
    """How many units (entries, rows or columns) a parameter of `shape` has."""
    return SparseIndex(structure, tuple(shape), torch.zeros(0, dtype=torch.int64)).units()


def budget_count(config: SelectiveConfig, total: int, name: str = "default") -> int:
    """The number of units `config.budget` keeps out of `total`; an error if it cannot."""
    budget = config.budget
    kept = max(1, round(budget * total)) if isinstance(budget, float) else budget
    if kept > total:
        raise ValueError(
            f"selective adapter {name!r}: budget={budget!r} asks for {kept} {config.structure} "
            f"units, but the selected parameters have only {total}; lower the budget or widen "
            "the patterns"
        )
    return kept


def _check_mask_layout(config: SelectiveConfig, name: str, shapes: dict[str, tuple]) -> None:
    """The budget fits the selected parameters; a chosen mask's `selected` names exactly them."""
    total = sum(units_of(shape, config.structure) for shape in shapes.values())
    kept = budget_count(config, total, name)
    if not config.selected:
        return
    if set(config.selected) != set(shapes):
        extra = sorted(set(config.selected) - set(shapes))
        missing = sorted(set(shapes) - set(config.selected))
        raise ValueError(
            f"selective adapter {name!r}: its mask layout (selected) does not match the "
            f"parameters its patterns select: not selected {extra[:3]}, not in the layout "
            f"{missing[:3]}; was it saved from another architecture?"
        )
    for full, count in config.selected.items():
        units = units_of(shapes[full], config.structure)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= units:
            raise ValueError(
                f"selective adapter {name!r}: selected[{full!r}] = {count!r} is not a count "
                f"of {config.structure} units in 0..{units}"
            )
    if sum(config.selected.values()) != kept:
        raise ValueError(
            f"selective adapter {name!r}: its mask layout keeps {sum(config.selected.values())} "
            f"units, but budget={config.budget!r} gives {kept}"
        )


def selected_parameters(model: nn.Module, name: str) -> list[str]:
    """Full names of the base parameters adapter `name` tunes, in model order."""
    return [
        f"{path}.{local}"
        for path, module in adapter_modules(model)
        if isinstance(module, SelectiveLayer) and name in module.selective_delta
        for local in module.selective_delta[name]
    ]


# ---------------------------------------------------------------- adapter_config.json


_MASK_FIELDS = (
    "mask",
    "budget",
    "score",
    "structure",
    "calibration_batches",
    "selected",
    "density",
)


def to_peft(config: SelectiveConfig) -> dict:
    patterns = config.patterns
    out = {
        "patterns": [patterns] if isinstance(patterns, str) else list(patterns),
        "init": config.init,
    }
    if config.mask is not None:  # a dense adapter's JSON stays as it always was
        out.update({key: getattr(config, key) for key in _MASK_FIELDS})
        out["selected"] = dict(config.selected)
    return out


def from_peft(data: dict) -> SelectiveConfig:
    patterns = data.get("patterns")
    if not patterns:
        raise ValueError("selective adapter config has no 'patterns' (parameter-name regexes)")
    mask = {key: data[key] for key in _MASK_FIELDS if data.get(key) is not None}
    if mask.get("mask") is not None and not mask.get("selected"):
        raise ValueError(
            "selective adapter config has mask='importance' but no 'selected' layout: the "
            "mask was never chosen (save the adapter after training, or after choose_mask)"
        )
    config = SelectiveConfig(
        patterns=(patterns,) if isinstance(patterns, str) else tuple(patterns),
        init=data.get("init", "zeros"),
        **mask,
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
    separate_file="onnx_adapter",  # norm weights and biases as graph inputs (fused graphs)
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("selective",),
)
