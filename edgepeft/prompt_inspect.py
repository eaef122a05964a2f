"""What a soft prompt is close to: each virtual token's nearest vocabulary tokens.

    adapter dir ──read_adapter──► prompt_embeddings (N, d)   prompt tuning or p-tuning
    base (--base, or the adapter's base_model_name_or_path) ──► input embedding E (V, d)
        cos(p_i, e_v) = p_i · e_v / (|p_i| |e_v|)   for every virtual token i, vocabulary row v
        ──top k per i──► PromptInspectReport  (str() for `edgepeft inspect`, to_dict() for JSON)

A trained soft prompt rarely sits on a real token (Lester et al., 2021 read its neighbours to
interpret it); the norms are reported beside them, since a prompt far longer than any
vocabulary row is a sign the neighbours say little. P-tuning is read from its saved table,
the encoder's output. Only vocabulary rows the tokenizer can produce are searched (models pad
their embedding matrix with rows no text maps to).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from edgepeft.adapters.peft_format import CONFIG_FILE, read_adapter
from edgepeft.adapters.prompt import SAVED_KEY
from edgepeft.base import load_base
from edgepeft.config import PromptEncoderConfig, PromptTuningConfig

SOFT_PROMPT_TYPES = (PromptTuningConfig.peft_type, PromptEncoderConfig.peft_type)
"""Adapters whose tensor is a table of input embeddings (what this module can read)."""


class NotASoftPromptError(ValueError):
    """The adapter folder holds a method that adds no input embeddings."""


@dataclass(frozen=True)
class Neighbour:
    token_id: int
    text: str
    """The token decoded alone ("" without a tokenizer)."""
    similarity: float
    """Cosine similarity with the virtual token, in [-1, 1]."""


@dataclass(frozen=True)
class VirtualToken:
    index: int
    norm: float
    """L2 norm of the virtual token (compare `PromptInspectReport.vocab_norm_mean`)."""
    neighbours: tuple[Neighbour, ...]
    """Most similar first."""


@dataclass(frozen=True)
class PromptInspectReport:
    adapter_dir: str
    peft_type: str
    base: str
    base_matches: bool | None
    """The base's fingerprint equals the one recorded at save time; None: none recorded."""
    top_k: int
    vocab_searched: int
    """Vocabulary rows compared (the tokenizer's tokens, at most the embedding's rows)."""
    vocab_norm_mean: float
    tokens: tuple[VirtualToken, ...]

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.adapter_dir}: {self.peft_type}, {len(self.tokens)} virtual tokens",
            f"  base {self.base}"
            + {True: "", False: " (NOT the base it was trained on)", None: ""}[self.base_matches],
            f"  nearest of {self.vocab_searched} vocabulary tokens by cosine similarity "
            f"(top {self.top_k}); vocabulary norm mean {self.vocab_norm_mean:.3g}",
            "",
        ]
        for token in self.tokens:
            cells = "  ".join(f"{n.text!r} {n.similarity:+.3f}" for n in token.neighbours)
            lines.append(f"  v{token.index:<3} |{token.norm:7.3g}|  {cells}")
        return "\n".join(lines)


def nearest_tokens(
    prompts: torch.Tensor, embeddings: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, token ids), each (N, top_k), most similar first, by cosine similarity.

    A zero vector (a padding row) has similarity 0 with everything rather than NaN.
    """
    p = F.normalize(prompts.float(), dim=-1)  # (N, d)
    e = F.normalize(embeddings.float(), dim=-1)  # (V, d)
    sims = p @ e.T  # (N, V)
    values, ids = sims.topk(min(top_k, e.shape[0]), dim=-1)
    return values, ids


def soft_prompt_table(adapter_dir: str | os.PathLike) -> tuple[str, torch.Tensor, dict]:
    """(peft_type, prompt table (N, d), metadata) of a prompt-tuning or p-tuning folder."""
    directory = Path(adapter_dir)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {directory} an adapter folder?")
    try:
        kind = json.loads(config_path.read_text()).get("peft_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if kind not in SOFT_PROMPT_TYPES:
        raise NotASoftPromptError(
            f"{directory} holds a {kind} adapter; vocabulary neighbours are listed for soft "
            f"prompts only ({', '.join(SOFT_PROMPT_TYPES)}). For a base model, pass its folder."
        )
    _, tensors, metadata = read_adapter(directory)
    if SAVED_KEY not in tensors:
        raise ValueError(f"{directory}: the adapter file holds no {SAVED_KEY!r} tensor")
    return kind, tensors[SAVED_KEY], metadata


def inspect_prompt(
    adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None, top_k: int = 5
) -> PromptInspectReport:
    """The `top_k` nearest vocabulary tokens of every virtual token of a soft-prompt adapter.

    Args:
        adapter_dir: A PROMPT_TUNING or P_TUNING folder (edgepeft's or HF peft's).
        base: The base model (folder or hub id); None: the adapter's base_model_name_or_path.
        top_k: Neighbours per virtual token.

    Raises:
        NotASoftPromptError: the folder holds another method (named in the message).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    kind, table, metadata = soft_prompt_table(adapter_dir)
    base = base if base is not None else metadata.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir} records no base model; pass the base (--base DIR)")
    model, tokenizer = load_base(base, quant="none", device="cpu", compute_dtype=torch.float32)
    embeddings = model.get_input_embeddings().weight.detach()  # (V, d)
    if table.shape[-1] != embeddings.shape[1]:
        raise ValueError(
            f"{adapter_dir}: virtual tokens have width {table.shape[-1]}, but {base}'s input "
            f"embedding has width {embeddings.shape[1]}; pass the adapter's own base (--base DIR)"
        )
    vocab = embeddings.shape[0] if tokenizer is None else min(len(tokenizer), embeddings.shape[0])
    embeddings = embeddings[:vocab]
    sims, ids = nearest_tokens(table, embeddings, top_k)
    tokens = tuple(
        VirtualToken(
            index=i,
            norm=float(table[i].float().norm()),
            neighbours=tuple(
                Neighbour(int(t), "" if tokenizer is None else tokenizer.decode([int(t)]), float(s))
                for s, t in zip(sims[i], ids[i], strict=True)
            ),
        )
        for i in range(table.shape[0])
    )
    saved_fp = metadata.get("edgepeft_base_fingerprint")
    return PromptInspectReport(
        adapter_dir=str(adapter_dir),
        peft_type=kind,
        base=str(base),
        base_matches=None if not saved_fp else saved_fp == model.edgepeft_base.fingerprint,
        top_k=top_k,
        vocab_searched=vocab,
        vocab_norm_mean=float(embeddings.float().norm(dim=-1).mean()),
        tokens=tokens,
    )
