"""Score generations of the base and of each adapter on a held-out set.

    rows (JSONL path or list of dicts) ──edgepeft.eval_rows.read_examples──► examples
        {"prompt", "completion"}       prompt as written, reference = completion
        {"messages": [..., assistant]} prompt = chat template of the messages before the
                                       final assistant one (+ generation prompt), reference =
                                       that assistant message
        ▼ tokenize once as training does ([BOS] + prompt), sort by length, batches
    for target in ("base", *adapters):     disable_adapters / set_adapter(name)
        model.generate: greedy, left padding (pad token, else EOS), stop at EOS
        prompt tuning: batches of prompts of one token length only (no padding)
        ▼ new tokens only, cut at the first EOS, decoded, stripped
    edgepeft.metrics.score_example(prediction, reference) per example
        ▼
    EvalReport: per target the means of EM, token F1, ROUGE-L and n; every prediction

The model leaves as it came: active adapter, requires_grad flags and train/eval mode
are put back even when generation fails. Prompt and prefix tuning apply through
forward hooks, so they generate like any other adapter.

Batch invariance: a prompt's prediction must not depend on which prompts share its batch.
Left padding is invisible to every adapter but prompt tuning: its hook (as HF peft) puts
the virtual tokens before the pads, so a padded row's text stands pads-many positions
further from them than in training or alone. Prompt-tuning targets therefore batch only
prompts of equal length, which equals batch size 1 (and the device runtime, which seeds
each row's virtual tokens right before its text).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgepeft.adapters.inject import active_adapter, disable_adapters, list_adapters, set_adapter
from edgepeft.evaluation.examples import EvalExample, read_examples  # noqa: F401
from edgepeft.evaluation.report import (  # noqa: F401
    BASE,
    EvalReport,
    TargetResult,
    check_sizes,
    choose_targets,
    length_batches,
    score_target,
)
from edgepeft.train.data import bos_to_add

# ---------------------------------------------------------------- prompts


def _prompt_text(tokenizer, example: EvalExample) -> str:
    if example.messages is None:
        return example.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{example.source}: a 'messages' row needs the tokenizer's chat template, but this tokenizer "
            "has none; write the rows as prompt/completion, or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(
        list(example.messages), tokenize=False, add_generation_prompt=True
    )


# ---------------------------------------------------------------- generation


def _token_ids(tokenizer, examples: Sequence[EvalExample]) -> list[list[int]]:
    """Prompt ids as training builds them: [BOS] + the text's tokens, special tokens not added.

    BOS leads only when the tokenizer puts one before plain text itself (Llama does,
    GPT-2 and Qwen do not), and never twice: a chat template may write its own.
    """
    bos = bos_to_add(tokenizer)
    ids = []
    for ex in examples:
        text = _prompt_text(tokenizer, ex)
        row = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if row[: len(bos)] != bos:
            row = [*bos, *row]
        if not row:
            raise ValueError(
                f"{ex.source}: the prompt tokenizes to no tokens; the model needs something to continue"
            )
        ids.append(row)
    return ids


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every EOS id the tokenizer or the model's generation config names (chat models add some)."""
    found: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
    return found


def _batches(ids: list[list[int]], batch_size: int, equal_length: bool = False) -> list[list[int]]:
    """Example indices grouped by similar length (`equal_length`: one length per batch)."""
    return length_batches([len(row) for row in ids], batch_size, equal_length)


def _pads_shift_outputs(config) -> bool:
    """Left padding changes this adapter's outputs: prompt tuning and P-tuning, whose
    virtual tokens sit before the pads (module docstring)."""
    return getattr(config, "peft_type", None) in ("PROMPT_TUNING", "P_TUNING")


@dataclass(frozen=True)
class _Greedy:
    """Greedy decoding of token-id prompts with one model and tokenizer."""

    model: nn.Module
    tokenizer: object
    pad_id: int
    stop_ids: list[int]
    max_new_tokens: int

    def __call__(self, ids: list[list[int]], batches: list[list[int]], bar) -> list[str]:
        """Continuation of every prompt, in data order."""
        device = self.model.device
        out: list[str] = [""] * len(ids)
        for batch in batches:
            length = max(len(ids[i]) for i in batch)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor(
                [[self.pad_id] * (length - len(ids[i])) + ids[i] for i in batch], device=device
            )  # (B, T)
            attention_mask = torch.tensor(
                [[0] * (length - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device
            )  # (B, T)
            generated = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                eos_token_id=self.stop_ids or None,
            )  # (B, T + new)
            for row, i in zip(generated[:, length:].tolist(), batch, strict=True):
                stop = next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))
                out[i] = self.tokenizer.decode(row[:stop], skip_special_tokens=True).strip()
            bar.update(len(batch))
        return out


def evaluate(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | Sequence[dict],
    adapters: Iterable[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    include_base: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Generate greedily for every prompt with each adapter (and the base) and score it.

    Args:
        model: A model from `load_base`, with adapters added or loaded on it (or none).
        tokenizer: Its tokenizer (from `load_base`).
        data: A JSONL file of {"prompt", "completion"} or {"messages"} rows, or a list
            of such dicts.
        adapters: Names of adapters on `model` to evaluate, in table order; default:
            every adapter on the model.
        max_new_tokens: Generation stops after this many tokens, or at EOS.
        batch_size: Prompts generated together (left-padded; for prompt tuning, prompts
            of equal length only, so that batching never changes a prediction).
        include_base: Add a "base" row: the model with every adapter disabled.
        progress: Show a progress bar per target.

    Returns:
        An EvalReport; `print(report)` shows the table, `report.save(path)` writes JSON.

    Raises:
        KeyError: a named adapter is not on the model.
        ValueError: malformed data (the file and line are named), nothing to evaluate,
            or a tokenizer with neither a pad nor an EOS token.
    """
    from tqdm.auto import tqdm

    check_sizes(max_new_tokens, batch_size)
    configs = list_adapters(model)
    targets = choose_targets(
        list(configs), adapters, include_base, holder="this model",
        listed="adapters", remedy="load it first with edgepeft.load_adapter",
    )  # fmt: skip

    examples, description = read_examples(data)
    ids = _token_ids(tokenizer, examples)
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), None)
    if pad_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token"
        )
    batches = _batches(ids, batch_size)
    unpadded = _batches(ids, batch_size, equal_length=True)
    generate = _Greedy(model, tokenizer, pad_id, stop_ids, max_new_tokens)

    previous = active_adapter(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout: greedy decoding must be repeatable
    results = []
    try:
        for target in targets:
            with tqdm(total=len(ids), desc=f"eval {target}", unit="ex", disable=not progress) as bar:
                if target == BASE:
                    with disable_adapters(model):
                        preds = generate(ids, batches, bar)
                else:
                    set_adapter(model, target)
                    padded_ok = not _pads_shift_outputs(configs[target])
                    preds = generate(ids, batches if padded_ok else unpadded, bar)
            results.append(score_target(target, preds, examples))
    finally:
        if configs:
            set_adapter(model, previous)
        for p, flag in trainable:
            p.requires_grad_(flag)
        model.train(was_training)
    return EvalReport(tuple(examples), tuple(results), description, max_new_tokens)
