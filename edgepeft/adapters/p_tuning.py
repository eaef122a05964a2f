"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): prompt tuning through an encoder.

    training   embedding (N, token_dim) ──encoder──► prompts (N, token_dim) ──► prompt tuning
               MLP:   Linear(d, h) ─► ReLU ─► Linear(h, h) ─► ReLU ─► Linear(h, d)
               LSTM:  biLSTM(d -> h, L layers) over the N tokens ─► Linear(2h, 2h) ─► ReLU
                      ─► Linear(2h, d)
    saved      prompts only ("prompt_embeddings", (N, token_dim)), as HF peft saves them
    loaded     that table, a plain tensor: the adapter is prompt tuning from then on

The encoder is HF peft's `PromptEncoder` (same layers, same names below the adapter, same
default init), so an encoder copied from peft gives peft's prompts. Everything after the
encoder (the hooks, saving, KV-prefix export, switching on the device) is prompt tuning's,
in prompt.py.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from edgepeft.adapters.layer import MethodSpec
from edgepeft.adapters.prompt import (
    VirtualTokens,
    add_virtual_prompt,
    check_common_peft,
    common_to_peft,
    optional_int,
    prompt_facts,
)
from edgepeft.config import PromptEncoderConfig

log = logging.getLogger("edgepeft")

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2
"""peft's default `encoder_num_layers`; its MLP encoder has this many hidden layers whatever
the field says."""


class PromptEncoder(nn.Module):
    """The trained part of a p-tuning adapter: forward() gives its (N, token_dim) prompts."""

    def __init__(self, config: PromptEncoderConfig, device) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        # nn.Embedding's own init (standard normal), as peft's encoder starts.
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, d, device=device))
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=d,
                hidden_size=h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * h, 2 * h, device=device),
                nn.ReLU(),
                nn.Linear(2 * h, d, device=device),
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h, device=device),
                nn.ReLU(),
                nn.Linear(h, h, device=device),
                nn.ReLU(),
                nn.Linear(h, d, device=device),
            )

    def forward(self) -> torch.Tensor:
        if self.encoder_type == "LSTM":
            # One sequence of the N tokens, read both ways (peft's batch of one).
            states = self.lstm_head(self.embedding[None])[0]  # (1, N, 2h)
            return self.mlp_head(states)[0]  # (N, d)
        return self.mlp_head(self.embedding)  # (N, d)


def encoder_parameter_count(config: PromptEncoderConfig, token_dim: int) -> int:
    """Trainable parameters of a p-tuning adapter while it trains (the encoder and its
    embedding), from the config alone; `count_parameters` gives the same."""
    d, n = token_dim, config.num_virtual_tokens
    h = config.encoder_hidden_size or d
    if config.encoder_reparameterization_type == "LSTM":
        lstm = 0
        for layer in range(config.encoder_num_layers):
            width_in = d if layer == 0 else 2 * h
            lstm += 2 * (4 * h * (width_in + h) + 8 * h)  # two directions, two bias vectors
        return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    return n * d + (d * h + h) + (h * h + h) + (h * d + d)


def resolve(model: nn.Module, config: PromptEncoderConfig) -> PromptEncoderConfig:
    """The config with peft's model facts and `encoder_hidden_size` filled in."""
    if config.encoder_reparameterization_type not in ENCODER_TYPES:
        raise ValueError(
            f"encoder_reparameterization_type must be one of {ENCODER_TYPES}, got "
            f"{config.encoder_reparameterization_type!r}"
        )
    if config.encoder_num_layers < 1 or not 0.0 <= config.encoder_dropout < 1.0:
        raise ValueError(
            "p-tuning needs encoder_num_layers >= 1 and 0 <= encoder_dropout < 1; got "
            f"{config.encoder_num_layers!r}, {config.encoder_dropout!r}"
        )
    if config.encoder_hidden_size is not None and config.encoder_hidden_size < 1:
        raise ValueError(f"encoder_hidden_size must be positive, got {config.encoder_hidden_size}")
    resolved = prompt_facts(model, config, "p-tuning")
    if config.encoder_hidden_size is None:
        resolved["encoder_hidden_size"] = resolved["token_dim"]
    return dataclasses.replace(config, **resolved)


def inject(model: nn.Module, config: PromptEncoderConfig, name: str, **_context) -> list[str]:
    """Add p-tuning adapter `name`; returns the one module it lives in."""
    if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != MLP_LAYERS:
        log.warning(
            "p-tuning adapter %r: encoder_num_layers=%d is ignored by the MLP encoder, which has "
            "peft's fixed %d hidden layers",
            name,
            config.encoder_num_layers,
            MLP_LAYERS,
        )
    device = model.get_input_embeddings().weight.device
    return add_virtual_prompt(model, name, config.num_virtual_tokens, PromptEncoder(config, device))


def to_peft(config: PromptEncoderConfig) -> dict:
    return {
        **common_to_peft(config),
        "encoder_reparameterization_type": config.encoder_reparameterization_type,
        "encoder_hidden_size": config.encoder_hidden_size,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_dropout": config.encoder_dropout,
    }


def from_peft(data: dict) -> PromptEncoderConfig:
    check_common_peft(data)
    kind = data.get("encoder_reparameterization_type", "MLP")
    if kind not in ENCODER_TYPES:
        raise ValueError(
            f"encoder_reparameterization_type={kind!r}; expected one of {ENCODER_TYPES}"
        )
    return PromptEncoderConfig(
        num_virtual_tokens=int(data["num_virtual_tokens"]),
        encoder_reparameterization_type=kind,
        encoder_hidden_size=optional_int(data, "encoder_hidden_size"),
        encoder_num_layers=int(data.get("encoder_num_layers", MLP_LAYERS)),
        encoder_dropout=float(data.get("encoder_dropout", 0.0)),
        token_dim=optional_int(data, "token_dim"),
        num_layers=optional_int(data, "num_layers"),
        num_attention_heads=optional_int(data, "num_attention_heads"),
    )


METHOD = MethodSpec(
    config_cls=PromptEncoderConfig,
    resolve=resolve,
    inject=inject,
    to_peft=to_peft,
    from_peft=from_peft,
    mergeable=VirtualTokens.mergeable,
    separate_file="kv_prefix",  # a saved adapter is a prompt table, shipped as prompt tuning's
    streamed_merge=False,
    streamed_separate=False,
    run_config_names=("p_tuning",),
)
