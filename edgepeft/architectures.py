"""What edgepeft knows about each architecture: one explicit table, validated at import,
and the one reader of a decoder's dimensions from its config (`DecoderShape`).

Module names are dotted-name suffixes inside one decoder layer. A model type not
in the table still works where the user names `target_modules` explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Architecture:
    lora_targets: tuple[str, ...]
    """LoRA's default targets (peft's defaults, so configs agree between libraries)."""
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]
    attention_output: str
    """Attention's output projection: a Houlsby bottleneck goes after it."""
    ffn_output: str
    """The FFN's output projection: both bottleneck styles go after it."""
    layers_pattern: str = "layers"
    """Name of the ModuleList that holds the decoder layers."""


_LLAMA_LIKE = Architecture(
    lora_targets=("q_proj", "v_proj"),
    ia3_targets=("k_proj", "v_proj", "down_proj"),
    ia3_feedforward=("down_proj",),
    attention_output="self_attn.o_proj",
    ffn_output="mlp.down_proj",
)
# peft's IA3 default for Qwen and Gemma rescales queries rather than keys.
_QWEN_GEMMA = replace(_LLAMA_LIKE, ia3_targets=("q_proj", "v_proj", "down_proj"))

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _QWEN_GEMMA,
    "qwen3": _QWEN_GEMMA,
    "gemma": _QWEN_GEMMA,
    "gemma2": _QWEN_GEMMA,
    "gemma3_text": _QWEN_GEMMA,
    "phi3": replace(
        _LLAMA_LIKE, lora_targets=("qkv_proj",), ia3_targets=("qkv_proj", "down_proj")
    ),
    "gpt2": Architecture(
        lora_targets=("c_attn",),
        ia3_targets=("c_attn", "mlp.c_proj"),
        ia3_feedforward=("mlp.c_proj",),
        attention_output="attn.c_proj",
        ffn_output="mlp.c_proj",
        layers_pattern="h",
    ),
}


def _validate(table: dict[str, Architecture]) -> None:
    for name, arch in table.items():
        if not set(arch.ia3_feedforward) <= set(arch.ia3_targets):
            raise AssertionError(f"{name}: IA3 feedforward modules must be IA3 targets")
        if not arch.lora_targets:
            raise AssertionError(f"{name}: no default LoRA targets")


_validate(ARCHITECTURES)


def architecture_of(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def require_architecture(model_type: str, what: str) -> Architecture:
    """The table entry, or an error that says how to proceed without one."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(
            f"edgepeft has no default {what} for model_type {model_type!r} "
            f"(known: {', '.join(sorted(ARCHITECTURES))}); pass target_modules explicitly"
        )
    return arch


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's dimensions as its config states them (standard library only).

    The config is a transformers config or a dict (a config.json); GPT-2's names
    (n_embd, n_head, n_layer, n_inner, n_positions) stand in for the usual ones.
    """

    hidden: int
    intermediate: int
    """The MLP's inner width; 4 x hidden where the config names none (GPT-2)."""
    layers: int
    heads: int
    kv_heads: int
    """Key/value heads; the query heads' count where the config names none (no GQA)."""
    head_dim: int
    vocab: int
    gated_mlp: bool
    """The config names intermediate_size: a gated MLP (gate, up, down)."""
    max_positions: int | None

    @classmethod
    def from_config(cls, config, where: str = "model", what: str = "read its shape") -> DecoderShape:
        """The shape `config` states; `where` (a path or name) and `what` (the task) go into
        the error.

        Raises:
            ValueError: a dimension with no default is missing (the message names the key).
        """
        if isinstance(config, Mapping):
            get = config.get
        else:
            def get(key: str):
                return getattr(config, key, None)

        def value(*keys: str, default: int | None = None) -> int:
            for key in keys:
                if get(key) is not None:
                    return get(key)
            if default is None:
                raise ValueError(
                    f"{where}: config has no {' or '.join(keys)}; cannot {what} without it"
                )
            return default

        hidden = value("hidden_size", "n_embd")
        heads = value("num_attention_heads", "n_head")
        layers = value("num_hidden_layers", "n_layer")
        return cls(
            hidden=hidden,
            intermediate=value("intermediate_size", "n_inner", default=4 * hidden),
            layers=layers,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            vocab=value("vocab_size"),
            gated_mlp=get("intermediate_size") is not None,
            max_positions=get("max_position_embeddings") or get("n_positions"),
        )
