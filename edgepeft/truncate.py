"""`truncate_rank`: one rank of a DyLoRA adapter as a plain LoRA folder.

    DyLoRA folder (r, dylora_min_rank m)           rank-b folder (plain LoRA, b in [m, r])
      <module>.lora_A.weight  (r, in)    ──[:b]──►   (b, in)
      <module>.lora_B.weight  (out, r)   ─[:,:b]─►   (out, b)
      lora_alpha = alpha                 ────────►   alpha (unchanged, see below)
      modules_to_save, metadata          ────────►   copied

DyLoRA evaluated at rank b scales B[:, :b] A[:b] by alpha / b (alpha / sqrt(b) with
rsLoRA); a plain rank-b LoRA with the same alpha scales by exactly that, so lora_alpha
(and alpha_pattern) carry over as they are. The folder keeps the DyLoRA mark with the
same lowest rank, so it can be truncated again. Only the two files are read, no model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from edgepeft.adapters.lora import dylora_metadata
from edgepeft.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from edgepeft.atomic import atomic_folder
from edgepeft.config import LoraConfig
from edgepeft.finite import check_finite_torch


def truncate_rank(adapter_dir: str | os.PathLike, r: int, out_dir: str | os.PathLike) -> Path:
    """Write the first `r` ranks of DyLoRA adapter `adapter_dir` as a plain LoRA folder.

    Args:
        adapter_dir: A folder saved from a `LoraConfig(dylora_min_rank=...)` adapter.
        r: The rank to keep, from the adapter's `dylora_min_rank` to its trained rank.
        out_dir: The new folder (replaced whole if it exists; written atomically).

    Returns:
        `out_dir`, which HF peft and `edgepeft.load_adapter` load as a rank-`r` LoRA.

    Raises:
        ValueError: not a LoRA or not a DyLoRA adapter, or `r` outside the trained ranks.
    """
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config, tensors, metadata = read_adapter(adapter_dir)
    _check(adapter_dir, config, r)
    check_finite_torch(tensors, adapter=str(adapter_dir), file=adapter_dir / WEIGHTS_FILE)
    document = json.loads((adapter_dir / CONFIG_FILE).read_text())
    document["r"] = r  # every other field (alpha, targets, rsLoRA, ...) means the same at r
    kept = {key: _truncated(key, tensor, r) for key, tensor in tensors.items()}
    metadata = {k: str(v) for k, v in metadata.items() if k != "base_model_name_or_path"}
    metadata.update(dylora_metadata(dataclasses.replace(config, r=r)))
    with atomic_folder(out_dir) as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        save_file(kept, str(staging / WEIGHTS_FILE), metadata=metadata)
    return out_dir


def trained_ranks(adapter_dir: str | os.PathLike) -> tuple[int, int]:
    """(dylora_min_rank, r) of a DyLoRA folder; ValueError naming it for any other folder."""
    config, _, _ = read_adapter(adapter_dir)
    _check(Path(adapter_dir), config, None)
    return config.dylora_min_rank, config.r


def _check(adapter_dir: Path, config, r: int | None) -> None:
    if not isinstance(config, LoraConfig) or config.use_dora:
        kind = "DoRA" if isinstance(config, LoraConfig) else config.peft_type
        raise ValueError(f"{adapter_dir} holds a {kind} adapter; only LoRA ranks can be truncated")
    low, high = config.dylora_min_rank, config.r
    if low is None:
        raise ValueError(
            f"{adapter_dir} is a plain LoRA (r={high}), not trained with DyLoRA "
            "(LoraConfig(dylora_min_rank=...)): its leading ranks do not work alone, so it "
            "cannot be truncated; train it with dylora_min_rank set"
        )
    if r is None:
        return
    if isinstance(r, bool) or not isinstance(r, int) or r > high:
        raise ValueError(
            f"{adapter_dir} was trained up to rank {high}; cannot truncate to rank {r!r}"
        )
    if r < low:
        raise ValueError(
            f"{adapter_dir} was trained at ranks {low} to {high} (DyLoRA); rank {r} is below "
            f"them and was never trained: pick a rank from {low} to {high}"
        )


def _truncated(key: str, tensor, r: int):
    # peft keys: "<module path>.lora_A.weight" (rank, in), "<module path>.lora_B.weight" (out, rank)
    if key.endswith(".lora_A.weight"):
        return tensor[:r].contiguous()
    if key.endswith(".lora_B.weight"):
        return tensor[:, :r].contiguous()
    return tensor  # modules_to_save: whole modules, the same at every rank


__all__ = ["trained_ranks", "truncate_rank"]
