"""Adapter configurations: small frozen dataclasses, one per method.

Each config names its method in `peft_type`, the value written to
`adapter_config.json`. Methods HF peft also has use peft's name and field
meanings, so a folder written by one library loads in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

Targets = tuple[str, ...] | str | None
"""Module names (matched as whole dotted-name suffixes), one regex string
(matched against the full module name), "all-linear", or None for the
architecture's default."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA, rsLoRA and DoRA: y = W x + (alpha / r) * B A x."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: Targets = None
    """Which linear layers get an adapter; see `Targets`."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a learned per-output-channel magnitude."""
    init: Literal["default", "gaussian", "random"] = "default"
    """"default": Kaiming-uniform A, zero B (peft's True); "gaussian": normal A with
    std 1/r, zero B; "random": both random (peft's False; the adapter starts non-zero)."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank, keyed by a regex matched against the end of the module name."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha, keyed like `rank_pattern`."""
    layers_to_transform: tuple[int, ...] | None = None
    """Only adapt these decoder-layer indices."""
    layers_pattern: str | None = None
    """Name of the layer list holding `layers_to_transform` (e.g. "layers", "h")."""
    modules_to_save: tuple[str, ...] | None = None
    """Whole modules (e.g. "lm_head") trained in full and saved with the adapter."""
    exclude_modules: tuple[str, ...] | None = None
    """Module names never adapted, even when `target_modules` matches them."""


@dataclass(frozen=True)
class IA3Config:
    """IA3: learned vectors that rescale keys, values and the FFN input."""

    peft_type: ClassVar[str] = "IA3"

    target_modules: Targets = None
    """Layers to rescale; None for the architecture's default (keys, values, FFN down projection)."""
    feedforward_modules: Targets = None
    """Subset of targets whose *input* is rescaled (the rest rescale their output)."""
    init: Literal["ones", "random"] = "ones"
    """"ones" starts at the identity; "random" is for tests."""
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None
    modules_to_save: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning: N learned embeddings prepended to every input."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "random"
    """"random": normal noise; "vocab": embeddings of random vocabulary tokens;
    "text": embeddings of `init_text`, repeated to fill N tokens (needs a tokenizer)."""
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    """Recorded for HF peft, which requires it with text init; None: the base's path."""
    # Model facts HF peft writes to adapter_config.json; None until `add_adapter` fills them.
    token_dim: int | None = None
    """Width of one virtual token: the model's hidden size."""
    num_layers: int | None = None
    num_attention_heads: int | None = None


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning: learned key/value prefixes in every attention layer."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    projection: bool = False
    """Train the prefixes through a two-layer MLP (reparameterisation); only its
    output is saved, so inference needs no MLP."""
    projection_hidden: int | None = None
    """Hidden width of that MLP; None means `token_dim` (HF peft's default)."""
    # Model facts HF peft writes to adapter_config.json; None until `add_adapter` fills them.
    token_dim: int | None = None
    """Width of one layer's keys (or values): key/value heads x head size."""
    num_layers: int | None = None
    num_attention_heads: int | None = None
    """Key/value heads (fewer than query heads under grouped-query attention)."""


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapters: x + up(act(down(x))) after a sublayer's output projection.

    Houlsby places one after attention and one after the FFN; Pfeiffer only
    after the FFN. The up projection starts at zero, so a new adapter is the identity.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    style: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = 16
    """Bottleneck width = hidden size // reduction_factor."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    target_modules: Targets = None
    """Override the output projections the style picks (rarely needed)."""
    init: Literal["zeros", "random"] = "zeros"
    """"zeros": identity at start; "random" is for tests."""


@dataclass(frozen=True)
class SelectiveConfig:
    """Selective tuning: train a named subset of the base's own (unquantized) parameters.

    The trained values are kept as deltas beside the frozen originals, so several
    selective adapters can share one base and be switched or merged exactly.
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    patterns: tuple[str, ...] = (r"\.bias$",)
    """Regexes searched in full parameter names; the default trains every bias (BitFit)."""
    init: Literal["zeros", "random"] = "zeros"
    """Initial delta; "random" is for tests."""

    @classmethod
    def bitfit(cls) -> SelectiveConfig:
        """Every bias (Ben Zaken et al., 2021)."""
        return cls(patterns=(r"\.bias$",))

    @classmethod
    def norms(cls) -> SelectiveConfig:
        """Every normalisation layer's scale and shift."""
        return cls(patterns=(r"(norm|ln_\w+|layernorm)[^.]*\.(weight|bias)$",))


AdapterConfig = (
    LoraConfig
    | IA3Config
    | PromptTuningConfig
    | PrefixTuningConfig
    | BottleneckConfig
    | SelectiveConfig
)

CONFIG_TYPES: dict[str, type] = {
    cls.peft_type: cls
    for cls in (
        LoraConfig,
        IA3Config,
        PromptTuningConfig,
        PrefixTuningConfig,
        BottleneckConfig,
        SelectiveConfig,
    )
}


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a config, with its `peft_type`."""
    out: dict[str, Any] = {"peft_type": config.peft_type}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """Inverse of `config_to_dict`; unknown keys are an error naming them."""
    kind = data.get("peft_type")
    if kind not in CONFIG_TYPES:
        raise ValueError(
            f"unknown peft_type {kind!r}; edgepeft knows {sorted(CONFIG_TYPES)}"
        )
    cls = CONFIG_TYPES[kind]
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names - {"peft_type"}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names
    }
    return cls(**kwargs)
