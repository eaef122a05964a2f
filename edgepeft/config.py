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
    dylora_min_rank: int | None = None
    """DyLoRA (Valipour et al., 2022): each training step uses a rank b drawn uniformly from
    [dylora_min_rank, r] (the first b rows of A, columns of B, scaled alpha / b), so every
    such rank works alone afterwards (`edgepeft.truncate_rank`). None: plain LoRA."""
    use_qalora: bool = False
    """QA-LoRA (Xu et al., 2023): the adapter reads its input average-pooled over groups of
    `qalora_group_size` features (A is r x in/group), so B A is constant per group and
    merges exactly into an int4 base's zero points (adapters/qalora.py). HF peft's field;
    peft itself implements it for GPTQ layers only."""
    qalora_group_size: int = 16
    """Input features per pooled group (peft's default 16); over an int4 base it must be the
    base's block size (32)."""

    def __post_init__(self) -> None:
        if self.use_qalora:
            group = self.qalora_group_size
            if isinstance(group, bool) or not isinstance(group, int) or group < 1:
                raise ValueError(
                    f"LoraConfig.qalora_group_size must be a positive integer, got {group!r}"
                )
            if self.use_dora:
                raise ValueError(
                    "LoraConfig: use_qalora cannot be combined with use_dora (HF peft refuses "
                    "it too); choose one"
                )
        low = self.dylora_min_rank
        if low is None:
            return
        if isinstance(low, bool) or not isinstance(low, int) or not 1 <= low <= self.r:
            raise ValueError(
                f"LoraConfig.dylora_min_rank must be an integer from 1 to r={self.r}, got {low!r}"
            )
        # Nested ranks need one rank for every module and a delta linear in B A.
        if self.use_dora or self.rank_pattern:
            other = "use_dora=True" if self.use_dora else f"rank_pattern={self.rank_pattern!r}"
            raise ValueError(
                f"LoraConfig.dylora_min_rank cannot be combined with {other}; DyLoRA trains one "
                "nested rank range for every module of a plain LoRA"
            )


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
class PromptEncoderConfig:
    """P-tuning (Liu et al., 2021): N virtual tokens produced by a trained encoder.

    The encoder (an MLP, or a bidirectional LSTM and an MLP) trains; what is saved is its
    output, one (N, token_dim) table, so a saved adapter runs exactly like prompt tuning.
    Field names and defaults are HF peft's `PromptEncoderConfig`.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int = 20
    """Virtual tokens prepended to every input."""
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    """"MLP": Linear-ReLU-Linear-ReLU-Linear on each token; "LSTM": a bidirectional LSTM over
    the N tokens, then Linear-ReLU-Linear."""
    encoder_hidden_size: int | None = None
    """Hidden width of the encoder; None means `token_dim` (HF peft's default)."""
    encoder_num_layers: int = 2
    """LSTM layers; the MLP always has peft's three linear layers (other values are ignored)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers while training (the MLP has none, as in peft)."""
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
class ParallelAdapterConfig:
    """Parallel bottleneck adapter at the FFN (He et al., 2022; AdapterHub's `ParBnConfig`).

    Each decoder layer's FFN output gains scaling * up(act(down(h))), where h is the FFN
    sub-block's input (the residual stream before its norm, as AdapterHub reads it). The up
    projection starts at zero, so a new adapter is the identity. Defaults are `ParBnConfig`'s.
    """

    peft_type: ClassVar[str] = "PARALLEL_ADAPTER"

    reduction_factor: int = 2
    """Bottleneck width = hidden size // reduction_factor."""
    scaling: float = 4.0
    """Fixed multiplier of the branch (He et al.'s s)."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    init: Literal["zeros", "random"] = "zeros"
    """"zeros": up projection zero (identity at start, AdapterHub's "mam_adapter" init);
    "random" is for tests."""


@dataclass(frozen=True)
class MAMConfig:
    """Mix-and-match adapter (He et al., 2022; AdapterHub's `MAMConfig`): prefix tuning at
    attention plus a scaled parallel adapter at the FFN, trained and saved as one adapter."""

    peft_type: ClassVar[str] = "MAM"

    num_virtual_tokens: int = 30
    """Prefix length (AdapterHub's prefix_length)."""
    prefix_bottleneck: int = 800
    """Hidden width of the MLP the prefix trains through (AdapterHub's bottleneck_size);
    only its output is saved."""
    reduction_factor: int = 2
    """Parallel adapter width = hidden size // reduction_factor."""
    scaling: float = 4.0
    """Parallel adapter multiplier."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    init: Literal["zeros", "random"] = "zeros"
    """Parallel adapter's start: "zeros" (identity) or "random" (tests)."""
    # Model facts of the prefix (as PrefixTuningConfig); None until `add_adapter` fills them.
    token_dim: int | None = None
    """Width of one layer's keys (or values): key/value heads x head size."""
    num_layers: int | None = None
    num_attention_heads: int | None = None
    """Key/value heads."""


@dataclass(frozen=True)
class UniPELTConfig:
    """UniPELT (Mao et al., 2022; AdapterHub's `UniPELTConfig`): gated LoRA on q/v, a gated
    prefix at attention and a gated sequential bottleneck after the FFN, each gate a learned
    per-token sigmoid of its part's input; trained and saved as one adapter (unipelt.py)."""

    peft_type: ClassVar[str] = "UNIPELT"

    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 8
    """The gated LoRA update is g * (lora_alpha / r) * B A x. AdapterHub's gated LoRA drops
    alpha / r (so its UniPELTConfig's alpha=2 does nothing); alpha = r reproduces it."""
    lora_targets: Targets = None
    """The linear layers with gated LoRA; None: the architecture's LoRA default (q_proj,
    v_proj on llama, AdapterHub's attn_matrices q, v)."""
    num_virtual_tokens: int = 10
    """Prefix length (AdapterHub's prefix_length)."""
    prefix_bottleneck: int = 512
    """Hidden width of the MLP the prefix trains through (AdapterHub's bottleneck_size);
    only its output is saved."""
    reduction_factor: int = 16
    """Bottleneck width = hidden size // reduction_factor."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """The bottleneck's activation."""
    init: Literal["zeros", "random"] = "zeros"
    """"zeros": LoRA B and the bottleneck's up projection start at zero (only the prefix
    changes the output at first); "random" is for tests: every part starts non-zero."""
    # Model facts of the prefix (as PrefixTuningConfig); None until `add_adapter` fills them.
    token_dim: int | None = None
    """Width of one layer's keys (or values): key/value heads x head size."""
    num_layers: int | None = None
    num_attention_heads: int | None = None
    """Key/value heads."""


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
    mask: Literal["importance"] | None = None
    """None: every entry of the selected parameters trains (a dense delta). "importance":
    only the `budget` entries that score highest on a few calibration batches train; the
    rest of the delta stays exactly 0 and is never stored (a sparse delta)."""
    budget: int | float | None = None
    """With a mask: how many units train, an int, or a float in (0, 1) for a share of all
    of them over the selected parameters. A unit is an entry ("unstructured"), or a whole
    row / column ("rows", "columns"; each entry of a 1-D parameter is a unit of its own)."""
    score: Literal["fisher", "grad_x_weight"] = "fisher"
    """How an entry is scored: "fisher", the empirical Fisher sum of g^2 over the batches
    (FISH mask, Sung et al., 2021); "grad_x_weight", the saliency sum of |g * w|."""
    structure: Literal["unstructured", "rows", "columns"] = "unstructured"
    """Rank single entries, or whole rows / columns of a 2-D weight by their summed score."""
    calibration_batches: int = 8
    """Training batches (the first ones, in file order) the score is summed over."""
    selected: Mapping[str, int] = field(default_factory=dict)
    """Filled when the mask is chosen: units kept per selected parameter (full name), the
    layout a saved adapter needs. Empty: the mask is still to be chosen."""
    density: float | None = None
    """Filled when the mask is chosen: trained entries / entries of the selected parameters."""

    def __post_init__(self) -> None:
        budget = self.budget
        if self.mask is None:
            if budget is not None or self.selected:
                raise ValueError(
                    f"SelectiveConfig.budget={budget!r} needs mask='importance'; without a mask "
                    "every entry of the selected parameters trains"
                )
            return
        if self.mask != "importance":
            raise ValueError(
                f"SelectiveConfig.mask must be None or 'importance', got {self.mask!r}"
            )
        share = isinstance(budget, float) and 0.0 < budget < 1.0
        count = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
        if not (share or count):
            raise ValueError(
                f"SelectiveConfig budget={budget!r} is not usable: give a positive integer count "
                "of trained units or a float share in (0, 1)"
            )
        if self.score not in ("fisher", "grad_x_weight"):
            raise ValueError(
                f"SelectiveConfig.score must be 'fisher' or 'grad_x_weight', got {self.score!r}"
            )
        if self.structure not in ("unstructured", "rows", "columns"):
            raise ValueError(
                "SelectiveConfig.structure must be 'unstructured', 'rows' or 'columns', "
                f"got {self.structure!r}"
            )
        n = self.calibration_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"SelectiveConfig.calibration_batches must be a positive integer, got {n!r}"
            )

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
    | PromptEncoderConfig
    | PrefixTuningConfig
    | BottleneckConfig
    | ParallelAdapterConfig
    | MAMConfig
    | UniPELTConfig
    | SelectiveConfig
)

# edgepeft.adapters.METHODS is checked against this table at import (same keys and order):
# config.py stays torch-free, so it cannot derive the table from the registry.
CONFIG_TYPES: dict[str, type] = {
    cls.peft_type: cls
    for cls in (
        LoraConfig,
        IA3Config,
        PromptTuningConfig,
        PromptEncoderConfig,
        PrefixTuningConfig,
        BottleneckConfig,
        ParallelAdapterConfig,
        MAMConfig,
        UniPELTConfig,
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


@dataclass(frozen=True)
class TrainConfig:
    """How `edgepeft.train` trains one adapter over a frozen base.

    Step counts are optimizer steps: one step runs `grad_accum` micro-batches of
    `batch_size` rows each.
    """

    max_seq_len: int = 512
    """Longest row in tokens; longer examples are cut at the end (see `packing`)."""
    packing: bool = False
    """Fill each row with several whole examples, back to back (each ends with EOS), up to
    `max_seq_len`. Attention is not blocked between them: a later example can see the
    earlier ones in its row. Examples are never split across rows."""
    completion_only: bool = True
    """Loss on completions / assistant turns only; prompt tokens get label -100."""
    val_fraction: float = 0.1
    """Share of the rows held out for validation (when `val_data` is None); 0 disables it."""
    val_data: str | None = None
    """A separate validation file; replaces `val_fraction`."""
    seed: int = 0
    """Seeds the split, the shuffling (per epoch) and the global RNGs (dropout)."""
    batch_size: int = 4
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their label tokens."""
    max_steps: int | None = None
    """Optimizer steps to run; None: `epochs` passes over the training rows."""
    epochs: float = 1.0
    """Passes over the training rows when `max_steps` is None (fractions allowed)."""
    lr: float = 2e-4
    """Peak learning rate, reached after `warmup_steps`."""
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    """torch AdamW, or bitsandbytes' 8-bit AdamW (paged on CUDA only)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: to 0 at the last step (cosine, linear) or none (constant)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter's gradient to this global L2 norm; None: no clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype: "auto" is fp32 on CPU and bf16 (fp16 without bf16 support) on CUDA;
    fp16 uses a gradient scaler and needs CUDA."""
    eval_every: int | None = 50
    """Validate every N optimizer steps (and after the last); None: only after the last."""
    save_every: int | None = 50
    """Write a resumable checkpoint every N optimizer steps (and after the last); None: only
    after the last and on interruption."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a lower validation loss; None: never."""
    bad_rows: Literal["skip", "error"] = "skip"
    """Unusable rows are skipped and reported ("skip") or raise at the first ("error")."""
    quiet: bool = False
    """Print nothing (no progress bar, no summary)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimizer steps."""

    def __post_init__(self) -> None:
        positive = {
            "max_seq_len": self.max_seq_len,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "log_every": self.log_every,
        }
        for optional in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            if getattr(self, optional) is not None:
                positive[optional] = getattr(self, optional)
        for key, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{key} must be a positive integer, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                "TrainConfig needs warmup_steps >= 0, lr > 0 and weight_decay >= 0; got "
                f"{self.warmup_steps!r}, {self.lr!r}, {self.weight_decay!r}"
            )
        choices = {
            "optimizer": ("adamw", "adamw8bit", "paged_adamw8bit"),
            "scheduler": ("cosine", "linear", "constant"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "bad_rows": ("skip", "error"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"TrainConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
