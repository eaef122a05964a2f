"""The demo: one base, two adapters trained here, one int4 export, answers switched per request.

    edgepeft/demo/base_model/ (shipped; scripts/make_demo_base.py)
        │ load_base(quant="nf4"): frozen, 4-bit
        ▼ per DemoAdapter (corpus.TASKS data written to out/data/<task>/)
    add_adapter ─► evaluate (before) ─► train ─► evaluate (after)      out/runs/<name>/
        ▼                                                              (loss_curves.png, last/)
    export(base, adapters=both, weights="int4", mode="separate")       out/export/
        ▼ verify: ORT vs PyTorch (base, LoRA file; soft prompts listed)   verify.json / .md
    edgepeft.runtime.Engine(out/export): the same prompts with no adapter and with each,
        adapter chosen per request ─► answers, accuracy on the device, switch latency
        (Engine.prepare), decode tok/s                                  out/demo_report.json

Accuracy here is case-sensitive exact match (the answer " GARDEN" is not " garden"), not
the SQuAD-normalized EM of edgepeft.metrics, which lowercases; "chars" is the mean
difflib similarity of answer and reference (partial credit: "nedrgg" for "nedrag" counts).

Scores are taken in left-padded batches of EVAL_BATCH_SIZE, in PyTorch and on the device
alike. Batching changes no answer, the soft prompt's included: edgepeft.evaluate batches a
prompt-tuning adapter's prompts of equal length only, and the runtime seeds each row's
virtual tokens right before its text, so both equal one prompt at a time.
"""

from __future__ import annotations

import difflib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgepeft.atomic import write_bytes, write_json
from edgepeft.config import LoraConfig, PromptTuningConfig, TrainConfig
from edgepeft.demo import corpus
from edgepeft.demo.paths import BASE_DIR

REPORT_FILE = "demo_report.json"


@dataclass(frozen=True)
class DemoAdapter:
    """One adapter the demo trains: its task (corpus.TASKS), method and schedule."""

    name: str
    """Adapter name and task name."""
    method: object
    train: TrainConfig
    summary: str


EVAL_BATCH_SIZE = 8
"""Prompts generated together when scoring (answers equal batch 1, module docstring)."""
_TRAIN = dict(batch_size=32, max_seq_len=24, val_fraction=0.0, eval_every=None, save_every=None,
              log_every=10)  # fmt: skip
DEMO_ADAPTERS: tuple[DemoAdapter, ...] = (
    DemoAdapter(
        "reverse",
        LoraConfig(r=16, alpha=32, target_modules="all-linear"),
        TrainConfig(max_steps=150, lr=5e-3, warmup_steps=10, **_TRAIN),
        "LoRA r=16 on every linear layer: a skill the base never saw (spell the word backwards)",
    ),
    DemoAdapter(
        "upper",
        PromptTuningConfig(num_virtual_tokens=8, init="vocab"),
        TrainConfig(max_steps=100, lr=3e-2, warmup_steps=5, **_TRAIN),
        "prompt tuning, 8 virtual tokens: replaces the instruction word 'upper:' the base knows",
    ),
)


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path
    steps: int | None = None
    """Training steps per adapter; None: each adapter's own (DEMO_ADAPTERS)."""
    n_train: int = 2000
    n_test: int = 32
    quant: str = "nf4"
    examples: int = 5
    """Prompts answered side by side."""
    base_dir: Path = BASE_DIR


@dataclass(frozen=True)
class AdapterOutcome:
    name: str
    method: str
    accuracy_before: float
    accuracy_after: float
    accuracy_device: float
    """The int4 export through the device runtime, same test prompts."""
    chars_before: float
    """Mean character similarity (difflib ratio) of answers and references."""
    chars_after: float
    chars_device: float
    train_seconds: float
    steps: int
    final_loss: float | None
    adapter_dir: str
    loss_plot: str


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    export_dir: Path
    adapters: tuple[AdapterOutcome, ...]
    answers: tuple[dict, ...]
    """Per prompt: {"prompt", "base", <adapter>: answer, "expected": {adapter: answer}}."""
    base_text: dict
    """A sentence start and the base's continuation: the base writes text."""
    switch_ms: float
    """Median time to take a request slot bound to another adapter (Engine.prepare)."""
    load_ms: dict
    """Adapter name -> median time to load its file into the running engine."""
    decode_tok_s: float
    verify: dict = field(default_factory=dict)
    verify_text: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "export_dir": str(self.export_dir),
            "adapters": [vars(a) for a in self.adapters],
            "answers": list(self.answers),
            "base_text": self.base_text,
            "switch_ms": self.switch_ms,
            "load_ms": self.load_ms,
            "decode_tok_s": self.decode_tok_s,
            "verify": self.verify,
            "seconds": self.seconds,
        }


def strict_accuracy(predictions: Sequence[str], rows: Sequence[dict]) -> float:
    """Share of predictions equal to the completion, case-sensitive, outer spaces ignored."""
    hits = sum(p.strip() == r["completion"].strip() for p, r in zip(predictions, rows, strict=True))
    return hits / len(rows)


def char_similarity(predictions: Sequence[str], rows: Sequence[dict]) -> float:
    """Mean difflib ratio of prediction and completion (outer spaces ignored): partial credit."""
    ratios = [difflib.SequenceMatcher(None, p.strip(), r["completion"].strip()).ratio()
              for p, r in zip(predictions, rows, strict=True)]  # fmt: skip
    return sum(ratios) / len(ratios)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    return write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_demo(options: DemoOptions, say: Callable[[str], None] | None = None) -> DemoResult:
    """Train both demo adapters, export once in int4, answer with each on the device runtime."""
    import torch

    import edgepeft as ep
    from edgepeft.runtime import Engine
    from edgepeft.runtime.evaluate import evaluate as device_evaluate

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    start = time.perf_counter()
    out = options.out_dir.expanduser().resolve()
    if not (options.base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo base model is missing from {options.base_dir}; rebuild it with "
            "`python scripts/make_demo_base.py` from the repository"
        )
    total = len(DEMO_ADAPTERS) + 3
    say(f"[1/{total}] loading the demo base {options.base_dir} ({options.quant}, frozen)")
    model, tokenizer = ep.load_base(options.base_dir, quant=options.quant)

    data, outcomes_partial = {}, []
    for i, spec in enumerate(DEMO_ADAPTERS, 2):
        train_rows, test_rows = corpus.task_splits(spec.name, options.n_train, options.n_test)
        folder = out / "data" / spec.name
        data[spec.name] = (_write_jsonl(folder / "train.jsonl", train_rows),
                           _write_jsonl(folder / "test.jsonl", test_rows), test_rows)  # fmt: skip
        config = spec.train if options.steps is None else replace(spec.train, max_steps=options.steps)
        say(f"[{i}/{total}] adapter {spec.name!r}: {spec.summary}; {config.max_steps} steps")
        torch.manual_seed(config.seed)
        context = {"tokenizer": tokenizer} if isinstance(spec.method, PromptTuningConfig) else {}
        ep.add_adapter(model, spec.method, name=spec.name, **context)
        before = _scores(ep, model, tokenizer, spec.name, test_rows)
        say(f"  before training: {before[0]:.0%} exact on {len(test_rows)} unseen words")
        run_dir = out / "runs" / spec.name
        result = ep.train(model, tokenizer, str(data[spec.name][0]), config, run_dir, adapter=spec.name)
        after = _scores(ep, model, tokenizer, spec.name, test_rows)
        say(f"  after {result.steps} steps ({result.seconds:.0f}s): {after[0]:.0%} exact")
        outcomes_partial.append(dict(
            name=spec.name, method=type(spec.method).__name__, accuracy_before=before[0],
            accuracy_after=after[0], chars_before=before[1], chars_after=after[1],
            train_seconds=result.seconds, steps=result.steps,
            final_loss=result.final_train_loss, adapter_dir=str(result.last_adapter_dir),
            loss_plot=str(result.plot_path),
        ))  # fmt: skip

    step = len(DEMO_ADAPTERS) + 2
    export_dir = out / "export"
    say(f"[{step}/{total}] exporting the base once (int4) with both adapters as separate files")
    adapters = {o["name"]: o["adapter_dir"] for o in outcomes_partial}
    ep.export(options.base_dir, export_dir, adapters, weights="int4", mode="separate",
              quant=options.quant, overwrite=True)  # fmt: skip
    report = ep.verify(export_dir)

    say(f"[{total}/{total}] device runtime (onnxruntime, no torch): answering per request")
    engine = Engine(export_dir)
    outcomes = []
    for partial in outcomes_partial:
        test_rows = data[partial["name"]][2]
        evaluated = device_evaluate(engine, test_rows, adapters=[partial["name"]],
                                    include_base=False, max_new_tokens=10,
                                    batch_size=EVAL_BATCH_SIZE,
                                    progress=False)  # fmt: skip
        predictions = evaluated[partial["name"]].predictions
        outcomes.append(AdapterOutcome(accuracy_device=strict_accuracy(predictions, test_rows),
                                       chars_device=char_similarity(predictions, test_rows), **partial))  # fmt: skip
    answers, decode = _answers(engine, [o.name for o in outcomes], options.examples)
    base_text = _base_text(engine)
    result = DemoResult(
        out_dir=out,
        export_dir=export_dir,
        adapters=tuple(outcomes),
        answers=tuple(answers),
        base_text=base_text,
        switch_ms=_switch_ms(engine, [o.name for o in outcomes]),
        load_ms=_load_ms(engine, [o.name for o in outcomes]),
        decode_tok_s=decode,
        verify=report.to_dict(),
        verify_text=str(report),
        seconds=time.perf_counter() - start,
    )
    write_json(out / REPORT_FILE, result.to_dict())
    return result


def _scores(ep, model, tokenizer, name: str, rows: list[dict]) -> tuple[float, float]:
    """(exact, chars) of adapter `name` in PyTorch, greedy."""
    report = ep.evaluate(model, tokenizer, rows, adapters=[name], include_base=False,
                         max_new_tokens=10, batch_size=EVAL_BATCH_SIZE, progress=False)  # fmt: skip
    predictions = report[name].predictions
    return strict_accuracy(predictions, rows), char_similarity(predictions, rows)


def _answers(engine, names: list[str], n: int) -> tuple[list[dict], float]:
    """The same n held-out prompts with no adapter and with each, switching every request."""
    words = corpus.test_words(n, seed=2000)
    rows, tokens, decode_s = [], 0, 0.0
    for word in words:
        prompt = word + corpus.ARROW
        row = {"prompt": prompt, "expected": {name: corpus.TASKS[name](word) for name in names}}
        for name in [None, *names]:
            r = engine.generate(prompt, adapter=name, max_new_tokens=12, return_result=True)
            row[name or "base"] = r.text.strip()
            tokens += max(len(r.token_ids) - 1, 0)
            decode_s += r.decode_ms / 1000
        rows.append(row)
    return rows, tokens / decode_s if decode_s else 0.0


def _base_text(engine) -> dict:
    prompt = "the old king"
    return {"prompt": prompt, "continuation": engine.generate(prompt, max_new_tokens=40)}


def _switch_ms(engine, names: list[str], rounds: int = 50) -> float:
    """Median ms of Engine.prepare for a request whose adapter differs from the previous one."""
    order = [None, *names]
    for name in order:  # first use of an adapter on a slot builds its binding; time the rest
        engine.prepare(name).close()
    times = []
    for i in range(rounds * len(order)):
        t = time.perf_counter()
        engine.prepare(order[i % len(order)]).close()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _load_ms(engine, names: list[str], rounds: int = 5) -> dict[str, float]:
    """Median ms to load each adapter's file into the engine (checked against the base) again."""
    out = {}
    for name in names:
        path, times = Path(engine.adapters()[name].file), []
        for _ in range(rounds):
            t = time.perf_counter()
            engine.load_adapter(path, name=f"{name}-timed")
            times.append(time.perf_counter() - t)
            engine.unload_adapter(f"{name}-timed")
        out[name] = statistics.median(times) * 1000
    return out


def format_result(result: DemoResult) -> str:
    """What `edgepeft demo` prints at the end."""
    names = [a.name for a in result.adapters]
    width = max(12, *(len(a["prompt"]) for a in result.answers))
    cols = ["base (no adapter)", *names]
    lines = ["", "Same prompts, adapter chosen per request on one int4 base (device runtime):",
             f"  {'prompt':<{width}}  " + "  ".join(f"{c:<18}" for c in cols)]  # fmt: skip
    for row in result.answers:
        cells = [row["base"], *(f"{row[n]} {'ok' if row[n] == row['expected'][n] else 'x'}" for n in names)]
        lines.append(f"  {row['prompt']:<{width}}  " + "  ".join(f"{c:<18}" for c in cells))
    lines.append(f"  the base writes text: {result.base_text['prompt']!r} -> "
                 f"{result.base_text['continuation']!r}")  # fmt: skip
    lines += ["", "Accuracy on words never seen in training: case-sensitive exact match (chars: mean "
              "character similarity)", f"  {'adapter':<8} {'method':<19} {'before':>13} {'after':>13} "
              f"{'device int4':>13} {'steps':>6} {'train':>6}"]  # fmt: skip
    for a in result.adapters:
        cells = [f"{e:.0%} ({c:.2f})" for e, c in ((a.accuracy_before, a.chars_before),
                 (a.accuracy_after, a.chars_after), (a.accuracy_device, a.chars_device))]  # fmt: skip
        lines.append(f"  {a.name:<8} {a.method:<19} " + " ".join(f"{c:>13}" for c in cells)
                     + f" {a.steps:>6} {a.train_seconds:>5.0f}s")  # fmt: skip
    loads = ", ".join(f"{n} {ms:.2f} ms" for n, ms in result.load_ms.items())
    lines += ["", f"Adapter switch (take a request slot bound to another adapter): {result.switch_ms:.3f} ms "
              f"median; loading an adapter file into the running engine: {loads}",
              f"Decode: {result.decode_tok_s:.0f} tok/s (batch 1, this machine)", "",
              result.verify_text, "",  # fmt: skip
              f"Artifacts: {result.export_dir} (model.onnx, adapters/, edgepeft.json)",
              f"Reports:   {result.out_dir / REPORT_FILE}, {result.export_dir / 'verify.md'}",
              "Loss plots: " + ", ".join(a.loss_plot for a in result.adapters),
              f"Total: {result.seconds:.0f}s"]  # fmt: skip
    return "\n".join(lines)
