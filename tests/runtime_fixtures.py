"""Exports the runtime tests share: a tiny llama in separate mode with one adapter of each
switchable kind, and the PyTorch models that are their reference. Not a test module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgepeft.adapters.inject import add_adapter, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import load_base
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from edgepeft.export import api

ADAPTERS = {
    "lora": LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear"),
    "dora": LoraConfig(r=4, alpha=8, init="random", use_dora=True),
    "ia3": IA3Config(init="random"),
    "bottleneck": BottleneckConfig(reduction_factor=8, activation="gelu", init="random"),
    "prefix": PrefixTuningConfig(num_virtual_tokens=5),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
}
PROMPTS = [
    "the quick brown fox",
    "SELECT name FROM users WHERE",
    "translate to french: hello -> bonjour. edge devices run small",
]


@dataclass
class Separate:
    model: torch.nn.Module
    """fp32 PyTorch base holding every adapter of ADAPTERS (the reference)."""
    tokenizer: object
    out: Path
    """fp32 separate-mode export: base graph + one adapter file each."""


def _perturb_dora(model, name):
    """Random init leaves DoRA's magnitude equal to the weight norm (DoRA == LoRA); move it."""
    with torch.no_grad():
        for _, module in adapter_modules(model):
            if name in getattr(module, "lora_magnitude_vector", {}):
                m = module.lora_magnitude_vector[name]
                m.mul_(1 + 0.2 * torch.randn_like(m))


def build_separate(base_dir: Path, root: Path) -> Separate:
    model, tokenizer = load_base(base_dir, quant="none")
    torch.manual_seed(0)
    folders = {}
    for name, config in ADAPTERS.items():
        add_adapter(model, config, name)
        if name == "dora":
            _perturb_dora(model, name)
        folders[name] = save_adapter(model, root / "src" / name, name)
    set_adapter(model, None)
    out = root / "separate"
    api.export(
        base_dir, out, adapters=folders, weights="fp32", mode="separate", quant="none", quiet=True
    )
    return Separate(model, tokenizer, out)


_SHARED: dict[Path, Separate] = {}


def shared_separate(tiny_dir, tmp_path_factory) -> Separate:
    """build_separate once per test session (the runtime test modules only read it)."""
    base = tiny_dir("llama")
    if base not in _SHARED:
        _SHARED[base] = build_separate(base, tmp_path_factory.mktemp("runtime-llama"))
    return _SHARED[base]


def bos_ids(tokenizer, text: str) -> list[int]:
    """Prompt ids as edgepeft's evaluation builds them (BOS only where the tokenizer adds one)."""
    from edgepeft.train.data import bos_to_add

    bos = bos_to_add(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids if ids[: len(bos)] == bos else [*bos, *ids]


@torch.no_grad()
def torch_greedy(
    model, rows: list[list[int]], max_new_tokens: int, pad: int = 0
) -> list[list[int]]:
    """HF generate's greedy continuation of left-padded rows, cut before the first eos."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    eos = model.generation_config.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, length:].numpy()
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    result = []
    for row in out:
        tokens = []
        for t in row.tolist():
            if t in eos_ids:
                break
            tokens.append(t)
        result.append(tokens)
    return result


def as_int_lists(array) -> list[list[int]]:
    return [list(map(int, r)) for r in np.asarray(array)]
