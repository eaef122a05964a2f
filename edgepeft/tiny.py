"""Tiny random models of every supported architecture, built from configs in code.

Tests, examples and benchmarks use these instead of downloads: each is a real HF
model folder (config, safetensors, tokenizer) made deterministically from a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_VOCAB = 384

# Special-token ids match tiny_tokenizer(): <pad>=0, <s>=1, </s>=2.
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_IDS
)
_GQA = dict(num_attention_heads=4, num_key_value_heads=2)

TINY_CONFIGS: dict[str, dict] = {
    "llama": {**_COMMON, **_GQA},
    "mistral": {**_COMMON, **_GQA, "sliding_window": None},
    "qwen2": {**_COMMON, **_GQA},
    "qwen3": {**_COMMON, **_GQA, "head_dim": 16},
    "phi3": {**_COMMON, **_GQA},
    "gemma2": {**_COMMON, **_GQA, "head_dim": 16},
    "gemma3_text": {**_COMMON, **_GQA, "head_dim": 16},
    "gpt2": dict(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, **_IDS),
}

_TOKENIZER_TEXT = (
    "the quick brown fox jumps over the lazy dog. edge devices run small models; "
    "adapters switch per request. SELECT name FROM users WHERE id = 1; "
    "translate to french: hello -> bonjour. 0123456789 +-*/=()[]{}<>\"'?!,:"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a fixed sentence: deterministic, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves some weights at exactly 0/1 (norms, biases); perturb them so
    # every parameter matters and parity tests see every path.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny_model(folder: str | os.PathLike, model_type: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model folder (safetensors, config, tokenizer) and return its path."""
    folder = Path(folder)
    tiny_model(model_type, seed).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder
