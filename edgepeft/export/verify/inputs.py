"""The inputs both sides of a check run: prompt batches, the perplexity text, unpadded rows.

    prompts (strings through the folder's tokenizer, or token ids; default: three drawn with
    seed 0 from the vocabulary, specials excluded) ─► left-padded (B, T) ids + attention mask
    text ─► (1, L) ids cut to the export's max_context

Torch-free (numpy; transformers only to tokenize strings).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from edgepeft.artifacts.manifest import Manifest

PROMPT_LENGTHS = (7, 4, 9)
"""Token counts of the default prompts (different lengths, so the batch is left padded)."""


def _tokenizer(folder: Path):
    """The export folder's tokenizer, or None where it has none (then prompts are token ids)."""
    with contextlib.suppress(OSError, ValueError):
        from transformers import AutoTokenizer  # lazy: transformers only to tokenize strings

        return AutoTokenizer.from_pretrained(folder)
    return None


def _vocabulary_rows(tokenizer, manifest: Manifest) -> list[list[int]]:
    """Three prompts of fixed lengths drawn with seed 0 from the vocabulary, specials excluded."""
    size = manifest.vocab_size if tokenizer is None else min(len(tokenizer), manifest.vocab_size)
    special = {manifest.pad_token_id, manifest.bos_token_id}
    eos = manifest.eos_token_id
    special |= set(eos) if isinstance(eos, list) else {eos}
    if tokenizer is not None:
        special |= set(tokenizer.all_special_ids)
    ids = np.array(sorted(set(range(size)) - special))
    rng = np.random.default_rng(0)
    return [[int(i) for i in rng.choice(ids, n)] for n in PROMPT_LENGTHS]


def _token_rows(tokenizer, texts_or_ids, what: str) -> list[list[int]]:
    if isinstance(texts_or_ids[0], str):
        if tokenizer is None:
            raise ValueError(f"{what} are strings but the export folder has no tokenizer; pass token ids")
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts_or_ids]
    return [list(map(int, row)) for row in texts_or_ids]


def prompt_batch(folder: Path, manifest: Manifest, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (B, T), attention_mask (B, T)) int64, left-padded."""
    tokenizer = _tokenizer(folder)
    if prompts is None:
        rows = _vocabulary_rows(tokenizer, manifest)
    else:
        rows = _token_rows(tokenizer, list(prompts), "prompts")
    if not rows or any(not r for r in rows):
        raise ValueError(f"every prompt needs at least one token; got lengths {[len(r) for r in rows]}")
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def text_ids(folder: Path, manifest: Manifest, text) -> np.ndarray | None:
    """(1, L) int64 token ids of the perplexity text, cut to the export's max_context."""
    if text is None:
        return None
    (row,) = _token_rows(_tokenizer(folder), [text], "the perplexity text")
    if manifest.max_context:
        row = row[: manifest.max_context]
    if len(row) < 2:
        raise ValueError(f"the perplexity text has {len(row)} token(s); it needs at least 2")
    return np.array([row], dtype=np.int64)


def unpadded_rows(ids: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each prompt alone: ((1, L_b) ids, (1, L_b) ones) without its padding."""
    rows = [row[real.astype(bool)][None] for row, real in zip(ids, mask, strict=True)]
    return [(row, np.ones_like(row)) for row in rows]
