"""What an export's manifest records about the model itself: special token ids, longest context.

    model.generation_config / model.config (text part) / tokenizer
        ─► token_ids:   eos (generation config first), bos, pad (tokenizer first)
        ─► max_context: the positions the model has, or fewer when asked

Read from attributes only (no torch), by every graph writer: merged, base alone, separate.
"""

from __future__ import annotations


def token_ids(model, tokenizer) -> dict:
    """eos_token_id, bos_token_id and pad_token_id as the manifest records them (None if unknown)."""
    config = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    return dict(eos_token_id=eos, bos_token_id=getattr(config, "bos_token_id", None), pad_token_id=pad)


def max_context(model, requested: int | None) -> int | None:
    """`requested`, checked against the model's positions; default those positions."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if requested is None:
        return limit
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_context {requested} exceeds the model's {limit} positions; pass at most {limit}"
        )
    return requested


__all__ = ["max_context", "token_ids"]
