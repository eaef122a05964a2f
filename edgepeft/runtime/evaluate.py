"""Score an export on a task through the device engine: the same report as PyTorch's evaluate.

    rows (JSONL path or list of dicts) ──edgepeft.eval_rows.read_examples──► examples
        {"prompt", "completion"}        prompt string as written
        {"messages": [..., assistant]}  the messages before the last one (the export's
                                        chat template renders them)
        ▼ sorted by prompt length, batches of `batch_size` (the engine pads left)
    for target in ("base", *adapters):  Engine.generate(batch, adapter=None | name),
        greedy, stop at the manifest's EOS, text stripped
        ▼
    edgepeft.eval_report.score_target ──► EvalReport (same table and JSON as
                                          edgepeft.train.evaluate: EM, token F1, ROUGE-L)

So `edgepeft eval EXPORT_DIR` and `edgepeft eval MODEL --adapter DIR` print rows that
compare line by line: the int4 graph on the device against the model it came from.
Needs no torch: onnxruntime, numpy, tokenizers (and jinja2 for chat rows).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

from edgepeft.evaluation.examples import EvalExample, read_examples
from edgepeft.evaluation.report import (
    BASE,
    EvalReport,
    check_sizes,
    choose_targets,
    length_batches,
    score_target,
)
from edgepeft.runtime.engine import Engine


def evaluate(
    engine_or_dir,
    data: str | os.PathLike | Sequence[dict],
    adapters: Iterable[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    include_base: bool = True,
    progress: bool = True,
    threads: int | None = None,
) -> EvalReport:
    """Generate greedily for every prompt with each adapter (and the base) and score it.

    Args:
        engine_or_dir: An `Engine`, or an export folder to open one on (its manifest's
            adapters loaded).
        data: A JSONL file of {"prompt", "completion"} or {"messages"} rows, or a list
            of such dicts.
        adapters: Names of loaded adapters to evaluate, in table order; default: every
            adapter the engine has loaded.
        max_new_tokens: Generation stops after this many tokens, or at EOS.
        batch_size: Prompts generated together (left-padded by the engine).
        include_base: Add a "base" row: the graph with no adapter.
        progress: One line per target on stderr.
        threads: Intra-op threads when an engine is opened here.

    Returns:
        An EvalReport, as `edgepeft.evaluate` returns it.

    Raises:
        KeyError: a named adapter is not loaded (the loaded ones are listed).
        ValueError: malformed data (file and line named), nothing to evaluate, or a
            messages row and an export whose tokenizer has no chat template.
    """
    check_sizes(max_new_tokens, batch_size)
    engine = engine_or_dir if isinstance(engine_or_dir, Engine) else Engine(engine_or_dir, threads=threads)
    targets = choose_targets(
        list(engine.adapters()), adapters, include_base,
        holder=f"the engine for {engine.export_dir}", listed="loaded",
        remedy="load it with engine.load_adapter(path, name)",
    )  # fmt: skip

    examples, description = read_examples(data)
    prompts = [_prompt(engine, ex) for ex in examples]
    batches = length_batches([len(engine.encode(p)) for p in prompts], batch_size)
    results = []
    for target in targets:
        predictions = [""] * len(examples)
        for batch in batches:
            texts = engine.generate(
                [prompts[i] for i in batch],
                adapter=None if target == BASE else target,
                max_new_tokens=max_new_tokens,
            )
            for i, text in zip(batch, texts, strict=True):
                predictions[i] = text.strip()
        results.append(score_target(target, predictions, examples))
        if progress:
            means = ", ".join(f"{k} {v:.3f}" for k, v in results[-1].metrics.items())
            print(f"eval {target}: {len(examples)} examples, {means}", file=sys.stderr, flush=True)
    return EvalReport(tuple(examples), tuple(results), description, max_new_tokens)


def _prompt(engine, example: EvalExample):
    """What the engine continues: the prompt string, or the messages (its chat template)."""
    if example.messages is None:
        return example.prompt
    if not engine.codec.chat_template:
        raise ValueError(
            f"{example.source}: a 'messages' row needs the export's chat template, but "
            f"{engine.export_dir}/tokenizer_config.json has none; write the rows as "
            "prompt/completion, or export from a tokenizer with a chat_template"
        )
    return list(example.messages)


__all__ = ["evaluate"]
