"""The decoder's shape, read from its config.json with the standard library alone.

    folder / config.json / dict / HF config ──read_config──► dict
        ──model_shape (+ CONFIG_DEFAULTS for keys the file leaves out;
                       dimensions by architectures.DecoderShape)──► ModelShape

No weights are read and transformers is not imported: the bare install plans. Only
`load_config`, which the training planner needs, imports transformers, when it runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgepeft.architectures import DecoderShape

# Decoder families of export/fused.py (_ARCHS): (per-head q/k norms, Gemma's four norms).
FUSED_ARCHS = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (False, False),
    "qwen3": (True, False),
    "phi3": (False, False),
    "gemma2": (False, True),
    "gemma3_text": (True, True),
}
_UNTIED = {"tie_word_embeddings": False}
CONFIG_DEFAULTS: dict[str, dict] = {
    "llama": {**_UNTIED, "max_position_embeddings": 2048},
    "mistral": {**_UNTIED, "max_position_embeddings": 131072, "num_key_value_heads": 8},
    "qwen2": {**_UNTIED, "max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {
        **_UNTIED, "max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128
    },
    "phi3": {**_UNTIED, "max_position_embeddings": 4096},
    "gemma": {"max_position_embeddings": 8192, "num_key_value_heads": 16, "head_dim": 256},
    "gemma2": {"max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256},
    "gemma3_text": {"max_position_embeddings": 131072, "num_key_value_heads": 4, "head_dim": 256},
    "gpt2": {"n_positions": 1024},
}
"""Per model type, what transformers' config class fills in for keys the plan reads when
config.json leaves them out (a config saves only what differs from them in some versions);
tests/test_plan.py checks each against transformers."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a decoder, read from its config."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    gated_mlp: bool
    qk_norm: bool
    gemma_norms: bool
    rotary_half: int
    """rotary_dim / 2: columns of each cos/sin table."""
    rotary_tables: int
    """cos/sin table pairs (Gemma 3: one per layer type)."""
    fused: bool
    """The fused exporter builds this model type (else the estimate is of that layout)."""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int, bool]]:
        """(out, in, bias) of one decoder layer's projections, packed as the fused graph packs."""
        return [(n, k, bias) for _, n, k, bias in self.named_linears()]

    def named_linears(self) -> list[tuple[str, int, int, bool]]:
        """`linears` with each projection's module name within a layer, as the fused graph
        names it (mixed precision picks bits by name)."""
        h, i = self.hidden, self.intermediate
        mlp_in = ("mlp.gate_up_proj", 2 * i) if self.gated_mlp else ("mlp.up_proj", i)
        return [
            ("self_attn.qkv_proj", self.q_width + 2 * self.kv_width, h, self.qkv_bias),
            ("self_attn.o_proj", h, self.q_width, self.o_bias),
            (mlp_in[0], mlp_in[1], h, self.mlp_bias),
            ("mlp.down_proj", h, i, self.mlp_bias),
        ]

    def lora_parameters(self, rank: int) -> int:
        """LoRA A and B of rank `rank` on every linear layer but lm_head, all layers."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        if self.model_type == "phi3":  # qkv_proj and gate_up_proj are single modules
            per_layer = (h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h)
            return rank * per_layer * self.layers
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + (2 if self.gated_mlp else 1) * (h + i)
        per_layer += i + h  # down_proj
        return rank * per_layer * self.layers

    @property
    def parameters(self) -> int:
        linear = sum(o * k for o, k, _ in self.linears()) * self.layers
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return linear + embed


def read_config(model: str | os.PathLike | dict) -> dict:
    """The config of a model folder, a config.json, a dict or an HF config, as a dict.

    Standard library only (the bare install has no transformers): a file is read as JSON,
    an HF config object through its `to_dict()`.
    """
    if hasattr(model, "to_dict"):
        return model.to_dict()
    if isinstance(model, dict):
        return dict(model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json at {model}; pass a model folder or its config.json "
            "(the weights are not needed to plan)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_config(model: str | os.PathLike | dict):
    """An HF config (transformers) from a model folder, a config.json or a dict."""
    from transformers import AutoConfig  # lazy: the bare install plans without transformers

    data = read_config(model)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{model}: config has no model_type; cannot tell the architecture")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"{model}: transformers does not know model_type {model_type!r}: {e}") from e


def _rotary_factor(c: dict) -> float:
    """partial_rotary_factor: a key of its own, or inside rope_parameters (transformers 5)."""
    nested = (c.get("rope_parameters") or {}).get("partial_rotary_factor")
    return float(c.get("partial_rotary_factor") or nested or 1.0)


def _gemma3_layer_types(c: dict, layers: int) -> list[str]:
    """Gemma 3's layer types; derived, as transformers does, when the config leaves them out."""
    if c.get("layer_types"):
        return list(c["layer_types"])
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]


def model_shape(model, name: str = "") -> ModelShape:
    """The shape of a model folder, a config.json, a dict, or an HF config object.

    Keys config.json leaves out take the model type's CONFIG_DEFAULTS (what transformers'
    config class would fill in); no transformers needed.
    """
    data = read_config(model)
    where = name or (str(model) if isinstance(model, (str, os.PathLike)) else "model")
    text = data.get("text_config") or data  # a multimodal config: its decoder's part
    model_type = text.get("model_type") or data.get("model_type")
    if not model_type:
        raise ValueError(f"{where}: config has no model_type; cannot tell the architecture")
    c = {**CONFIG_DEFAULTS.get(model_type, {}), **{k: v for k, v in text.items() if v is not None}}
    dims = DecoderShape.from_config(c, where, what="plan")
    qk_norm, gemma = FUSED_ARCHS.get(model_type, (False, False))
    attention_bias = bool(c.get("attention_bias", False))
    gpt2 = model_type == "gpt2"
    # Gemma 3 keeps one cos/sin table pair per layer type (sliding and full attention).
    types = _gemma3_layer_types(c, dims.layers) if model_type == "gemma3_text" else []
    if not name and isinstance(model, (str, os.PathLike)):
        name = str(model)
    return ModelShape(
        name=name or data.get("_name_or_path") or model_type,
        model_type=model_type,
        hidden=dims.hidden,
        intermediate=dims.intermediate,
        layers=dims.layers,
        heads=dims.heads,
        kv_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        vocab=dims.vocab,
        # True where the type is not in CONFIG_DEFAULTS: transformers' base-class default.
        tied=bool(data.get("tie_word_embeddings", c.get("tie_word_embeddings", True))),
        max_positions=dims.max_positions,
        qkv_bias=model_type == "qwen2" or attention_bias or gpt2,
        o_bias=attention_bias or gpt2,
        mlp_bias=bool(c.get("mlp_bias", False)) or gpt2,
        gated_mlp=not gpt2 and dims.gated_mlp,
        qk_norm=qk_norm,
        gemma_norms=gemma,
        rotary_half=int(dims.head_dim * _rotary_factor(c)) // 2,
        rotary_tables=max(len(set(types)), 1),
        fused=model_type in FUSED_ARCHS,
    )


__all__ = ["CONFIG_DEFAULTS", "FUSED_ARCHS", "ModelShape", "load_config", "model_shape", "read_config"]
