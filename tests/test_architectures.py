"""architectures.DecoderShape: one reader of a decoder's dimensions, for dicts and HF configs."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig

from edgepeft.architectures import DecoderShape


def test_dict_and_hf_config_read_alike():
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
    )  # fmt: skip
    shape = DecoderShape.from_config(config)
    assert shape == DecoderShape.from_config(config.to_dict())
    assert (shape.kv_heads, shape.head_dim, shape.gated_mlp, shape.max_positions) == (2, 16, True, 128)


def test_gpt2_names():
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50, n_positions=64)
    shape = DecoderShape.from_config(config)
    assert shape == DecoderShape.from_config(config.to_dict())
    assert (shape.hidden, shape.intermediate, shape.layers, shape.kv_heads) == (32, 128, 3, 4)
    assert (shape.gated_mlp, shape.max_positions) == (False, 64)


def test_missing_dimension_names_the_key():
    with pytest.raises(ValueError, match="cfg.json: config has no vocab_size; cannot plan"):
        DecoderShape.from_config(
            {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1},
            "cfg.json",
            what="plan",
        )
