"""Training speed and peak memory: HF peft + transformers.Trainer against edgepeft.train.

    random Llama (seeded) ──save──► HF folder, data.jsonl (text rows), tokens.json (their ids)
        │
        ▼  one fresh `python bench_train.py --worker NAME --mode MODE` per contender and mode
    speed : warmup + timed optimizer steps; a global optimizer-step hook stamps every step
            (one clock for all contenders); RSS high-water mark minus RSS before training
    memory: a short run inside `measure_peak` (live tensor bytes: the planner's own meter)
        │
        ▼  + `estimate_memory` for each setup
    two markdown tables ──write_section("train")──► BENCHMARKS.md

Contenders: HF peft + Trainer and edgepeft, each over a float32 and an NF4 base, with
the same LoRA config, batch, steps, optimizer (torch AdamW), schedule and clipping;
and full fine-tuning as a plain torch loop (edgepeft has no full fine-tuning mode).
Every row of the data is longer than the sequence length and cut to it, so every
batch is the same (B, T) with no padding and tokens/s does not depend on sample order.

    python scripts/bench_train.py      # a few minutes on 2 quiet cores; rewrites section "train"
    python scripts/bench_train.py --smoke --in-process --benchmarks-file /tmp/B.md   # seconds
    python scripts/bench_train.py --quick --output /tmp/train.md --json /tmp/train.json
        # the flags every bench_*.py shares (scripts/bench.py drives them): --quick is
        # --smoke --in-process; --output writes the section there instead of BENCHMARKS.md

The real-model memory check (`--real`, its own section "train-real", not part of the run
above): SmolLM2-135M-Instruct (scripts/real_model.py) over an NF4 base with LoRA r=16 on
every linear layer, a few `edgepeft.train` steps per case in a fresh process; the run's
own report: planned peak, measured live-tensor peak (the planner's measure), process RSS.

    python scripts/bench_train.py --real   # a few minutes; rewrites section "train-real"

The DyLoRA quality curve (`--dylora`, its own section "dylora"): on the demo base (NF4) and
its "reverse" task, one DyLoRA adapter (ranks 1-16, one rank sampled per step) evaluated at
each rank of DYLORA_RANKS against a plain LoRA trained at that rank alone, same alpha, steps
and data: test exact match (greedy) and test loss per label token. A second DyLoRA adapter
trains as many steps as the plain LoRAs together (the same total compute).

    python scripts/bench_train.py --dylora   # ~5 minutes on one core; section "dylora"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import benchmarks_md  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA = 16, 32
LR, MAX_GRAD_NORM = 2e-4, 1.0
MiB = 2**20


@dataclass(frozen=True)
class Size:
    """Model shape and run length."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq_len: int
    batch: int
    warmup_steps: int
    """Steps run before the clock starts (allocator warm-up, optimizer state creation)."""
    timed_steps: int
    memory_steps: int
    """Steps of the metered run: from the second on, the optimizer state is live."""
    threads: int = 2

    def model_overrides(self) -> dict:
        return dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
        )


FULL = Size(
    hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=8192,
    seq_len=256, batch=4, warmup_steps=2, timed_steps=10, memory_steps=3,
)  # fmt: skip
SMOKE = Size(
    hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
    seq_len=32, batch=2, warmup_steps=1, timed_steps=2, memory_steps=2, threads=1,
)  # fmt: skip


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    library: str
    """"hf", "edgepeft" or "torch" (full fine-tuning)."""
    quant: str
    """Base as loaded: "none" (float32) or "nf4"."""


CONTENDERS = (
    Contender("hf-lora", "HF peft + Trainer, LoRA (fp32 base)", "hf", "none"),
    Contender("edgepeft-lora", "edgepeft, LoRA (fp32 base)", "edgepeft", "none"),
    Contender("hf-qlora", "HF peft + Trainer, QLoRA (NF4 base)", "hf", "nf4"),
    Contender("edgepeft-qlora", "edgepeft, QLoRA (NF4 base)", "edgepeft", "nf4"),
    Contender("full-ft", "full fine-tuning, plain torch loop (fp32)", "torch", "none"),
)
BY_NAME = {c.name: c for c in CONTENDERS}
MODES = ("speed", "memory")


@dataclass(frozen=True)
class RealCase:
    """One training setup of the real-model memory check."""

    batch: int
    seq_len: int
    checkpointing: bool
    padding: bool
    """Rows of unequal length (every other row half as long), so batches carry padding."""

    @property
    def label(self) -> str:
        extras = [x for x, on in (("checkpointing", self.checkpointing), ("padded", self.padding)) if on]
        return f"batch {self.batch} x {self.seq_len}" + "".join(f", {x}" for x in extras)


REAL_CASES = (
    RealCase(batch=8, seq_len=128, checkpointing=False, padding=True),  # the reported run
    RealCase(batch=4, seq_len=256, checkpointing=True, padding=True),
    RealCase(batch=8, seq_len=128, checkpointing=True, padding=False),
)
REAL_STEPS = 2
"""Optimizer steps per case: the run meters both (the second with the optimizer state live)."""
REAL_THREADS = 2


# ---------------------------------------------------------------- setup (parent process)


WORDS = (
    "the quick brown fox jumps over the lazy dog edge devices run small models adapters "
    "switch per request select name from users where id translate to french hello bonjour"
).split()


def make_rows(count: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of words the tokenizer knows, each longer than `seq_len` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choices(WORDS, k=max(2, seq_len // 16)))  # leaves room for labels
        completion = " " + " ".join(rng.choices(WORDS, k=seq_len))  # >= 1 token per word
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def prepare(size: Size, workdir: Path) -> dict:
    """Write the model folder, the rows and their token ids; returns the run plan."""
    from edgepeft.config import TrainConfig
    from edgepeft.tiny import tiny_model, tiny_tokenizer
    from edgepeft.train.data import prepare_data

    model_dir = workdir / "model"
    model = tiny_model("llama", seed=0, **size.model_overrides())
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    del model

    steps = size.warmup_steps + size.timed_steps
    rows = make_rows(size.batch * steps, size.seq_len)
    data_path = workdir / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The ids edgepeft trains on, given to the other contenders so all see the same tokens.
    config = TrainConfig(max_seq_len=size.seq_len, val_fraction=0.0)
    examples = prepare_data(str(data_path), tokenizer, config).train
    lengths = {len(e.input_ids) for e in examples}
    if lengths != {size.seq_len} or len(examples) != len(rows):
        raise RuntimeError(
            f"every row should tokenize to {size.seq_len} tokens (cut), got lengths {sorted(lengths)} "
            f"for {len(examples)} of {len(rows)} rows; make the synthetic completions longer"
        )
    tokens = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    (workdir / "tokens.json").write_text(json.dumps(tokens))
    plan = {
        "size": dataclasses.asdict(size),
        "model_dir": str(model_dir),
        "data": str(data_path),
        "tokens": str(workdir / "tokens.json"),
        "params": params,
        "label_tokens_per_row": sum(e.label_tokens for e in examples) / len(examples),
    }
    (workdir / "plan.json").write_text(json.dumps(plan))
    return plan


def run_worker(contender: str, mode: str, workdir: Path, threads: int) -> dict:
    """One measurement in a fresh interpreter, threads pinned the same way for all."""
    return _child(["--worker", contender, "--mode", mode], workdir / f"{contender}-{mode}.json",
                  workdir, threads)  # fmt: skip


def _child(args: list[str], out: Path, workdir: Path, threads: int) -> dict:
    """Run this script with `args` in a fresh interpreter; returns the JSON it left at `out`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, str(Path(__file__).resolve()), *args, "--workdir", str(workdir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def run_in_process(contender: str, mode: str, workdir: Path, threads: int) -> dict:
    """`worker` in this interpreter: quick, but earlier runs' allocations and imports
    stay here, so the numbers are not comparable (for --in-process, i.e. tests)."""
    import torch

    saved = torch.get_num_threads()
    try:
        return worker(contender, mode, workdir)
    finally:
        torch.set_num_threads(saved)
        gc.collect()


def planner_estimates(plan: dict) -> dict[str, int]:
    """The planner's peak for each contender's setup (HF and edgepeft share one per base)."""
    from transformers import AutoConfig

    from edgepeft.config import LoraConfig
    from edgepeft.train.memory import estimate_memory

    size = Size(**plan["size"])
    config = AutoConfig.from_pretrained(plan["model_dir"])
    lora = LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS)
    out = {}
    for c in CONTENDERS:
        estimate = estimate_memory(
            config,
            quant=c.quant,
            adapter_config=None if c.library == "torch" else lora,
            batch_size=size.batch,
            seq_len=size.seq_len,
            precision="fp32",
            device="cpu",
            padding=False,  # every row is exactly seq_len tokens
        )
        out[c.name] = estimate.total
    return out


# ---------------------------------------------------------------- workers (child processes)


def _proc_status(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def rss_growth():
    """Yields a dict whose "bytes" is, afterwards, peak RSS inside the block minus RSS before."""
    gc.collect()
    try:  # resets the high-water mark VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    before = _proc_status("VmRSS")
    result: dict = {"bytes": None}
    yield result
    peak = _proc_status("VmHWM")
    if resettable and before is not None and peak is not None:
        result["bytes"] = peak - before


@contextlib.contextmanager
def optimizer_step_clock():
    """Yields a list that gets `perf_counter()` after every optimizer step in the block.

    A global hook, so HF's wrapped optimizer, edgepeft's and the plain loop's are timed
    at the same point of their step.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        yield stamps
    finally:
        handle.remove()


def _token_batches(plan: dict, steps: int):
    import torch

    size = Size(**plan["size"])
    rows = json.loads(Path(plan["tokens"]).read_text())
    for step in range(steps):
        chunk = [rows[(step * size.batch + i) % len(rows)] for i in range(size.batch)]
        ids = torch.tensor([r["input_ids"] for r in chunk])  # (B, T)
        yield ids, torch.ones_like(ids), torch.tensor([r["labels"] for r in chunk])


def _hf_runner(plan: dict, quant: str, steps: int, workdir: Path) -> Callable[[], None]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    size = Size(**plan["size"])
    kwargs: dict = {"dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # as edgepeft.load_base
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], **kwargs)
    for module in model.modules():
        # bnb would otherwise repack NF4 weights and compute in bf16 on AVX512-BF16 CPUs;
        # edgepeft.load_base turns this off too, so both compute in fp32.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
        ),
    )  # fmt: skip
    rows = json.loads(Path(plan["tokens"]).read_text())
    dataset = [
        {
            "input_ids": torch.tensor(r["input_ids"]),
            "attention_mask": torch.ones(len(r["input_ids"]), dtype=torch.long),
            "labels": torch.tensor(r["labels"]),
        }
        for r in rows
    ]
    args = TrainingArguments(
        output_dir=str(workdir / "hf-out"),
        per_device_train_batch_size=size.batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        seed=0,
    )

    def run() -> None:
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator
        )
        trainer.train()

    return run


def _edgepeft_runner(plan: dict, quant: str, steps: int, workdir: Path) -> Callable[[], None]:
    import torch

    import edgepeft as ep

    size = Size(**plan["size"])
    model, tokenizer = ep.load_base(plan["model_dir"], quant=quant, device="cpu")
    torch.manual_seed(0)
    ep.add_adapter(model, ep.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
    config = ep.TrainConfig(
        max_seq_len=size.seq_len,
        batch_size=size.batch,
        max_steps=steps,
        lr=LR,
        scheduler="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optimizer="adamw",
        precision="fp32",
        val_fraction=0.0,
        eval_every=None,
        save_every=None,
        quiet=True,
    )
    return lambda: ep.train(model, tokenizer, plan["data"], config, workdir / "edgepeft-out")


def _full_ft_runner(plan: dict, steps: int) -> Callable[[], None]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], dtype=torch.float32)

    def run() -> None:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        for ids, mask, labels in _token_batches(plan, steps):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def worker(name: str, mode: str, workdir: Path) -> dict:
    """Load the contender, then time its training steps ("speed") or meter them ("memory")."""
    import torch

    from edgepeft.train.memory import measure_peak

    plan = json.loads((workdir / "plan.json").read_text())
    size = Size(**plan["size"])
    torch.set_num_threads(size.threads)
    contender = BY_NAME[name]
    steps = size.warmup_steps + size.timed_steps if mode == "speed" else size.memory_steps
    run_dir = workdir / f"{name}-{mode}"
    if contender.library == "hf":
        run = _hf_runner(plan, contender.quant, steps, run_dir)
    elif contender.library == "edgepeft":
        run = _edgepeft_runner(plan, contender.quant, steps, run_dir)
    else:
        run = _full_ft_runner(plan, steps)

    if mode == "memory":
        return {"peak_bytes": measure_peak(run), "steps": steps}
    with rss_growth() as rss, optimizer_step_clock() as stamps:
        run()
    if len(stamps) != steps:
        raise RuntimeError(f"{name}: expected {steps} optimizer steps, the clock saw {len(stamps)}")
    start = stamps[size.warmup_steps - 1]  # end of the last warm-up step
    seconds = stamps[-1] - start
    tokens = size.timed_steps * size.batch * size.seq_len  # no padding: every row is seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / size.timed_steps,
        "rss_growth_bytes": rss["bytes"],
        "steps": steps,
    }


# ---------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def _mib(nbytes: float) -> str:
    """MiB with 3+ significant digits (small models in smoke runs included)."""
    mib = nbytes / MiB
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.3f}"


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    value = round(value, 2)  # judge the ratio the table shows, so the sentence agrees with it
    met = value >= target if higher_is_better else value <= target
    gap = abs(value - target)
    return f"{'met' if met else 'missed'} ({value:.2f}x vs target {'≥' if higher_is_better else '≤'} {target:.1f}x, {'margin' if met else 'short by'} {gap:.2f}x)"


def render(
    plan: dict,
    results: dict[str, dict],
    estimates: dict[str, int],
    command: str,
    trial: bool = False,
) -> str:
    """The section's markdown, every number taken from `results` / `estimates`.

    Args:
        trial: A smoke or in-process run: says so above the tables.
    """
    size = Size(**plan["size"])
    hf_peer = {"edgepeft-lora": "hf-lora", "edgepeft-qlora": "hf-qlora"}

    lines = [
        "## Training: HF peft + Trainer vs edgepeft (CPU, fp32 compute)",
        "",
        *(
            [
                "**Trial run (--smoke / --in-process): checks the script; the numbers mean nothing.**",
                "",
            ]
            if trial
            else []
        ),
        f"Llama with random weights: hidden {size.hidden}, {size.layers} layers, "
        f"{size.heads}/{size.kv_heads} heads, intermediate {size.intermediate}, vocab {size.vocab} "
        f"({plan['params'] / 1e6:.1f} M parameters). LoRA r={LORA_R}, alpha={LORA_ALPHA} on "
        f"{', '.join(LORA_TARGETS)}; batch {size.batch} x {size.seq_len} tokens (no padding; "
        f"{plan['label_tokens_per_row'] / size.seq_len:.0%} of them completion tokens with a loss); torch "
        f"AdamW lr {LR}, constant schedule, grad-norm clip {MAX_GRAD_NORM}; "
        f"{size.timed_steps} timed steps after {size.warmup_steps} warm-up; {size.threads} torch "
        "threads; every contender and measurement in a fresh process. Tokens/s: tokens of the timed "
        "steps over the time between the optimizer steps that bound them. Peak: `measure_peak` "
        f"(live tensor bytes, weights and optimizer state included) around a {size.memory_steps}-step "
        "run, model loading excluded; planner: `estimate_memory` for the same setup; RSS growth: "
        "peak resident set during the timed run minus before it (allocator caching included).",
        "",
        "| contender | tokens/s | vs HF | peak MiB | vs HF | planner MiB | RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONTENDERS[:4]:
        r = results[c.name]
        peer = results[hf_peer.get(c.name, c.name)]
        rss = r["speed"]["rss_growth_bytes"]
        lines.append(
            f"| {c.label} | {_rate(r['speed']['tokens_per_s'])} "
            f"| {_ratio(r['speed']['tokens_per_s'], peer['speed']['tokens_per_s']):.2f}x "
            f"| {_mib(r['memory']['peak_bytes'])} "
            f"| {_ratio(r['memory']['peak_bytes'], peer['memory']['peak_bytes']):.2f}x "
            f"| {_mib(estimates[c.name])} | {'n/a' if rss is None else _mib(rss)} |"
        )
    lines.append("")
    for ours, theirs, base in (
        ("edgepeft-lora", "hf-lora", "fp32"),
        ("edgepeft-qlora", "hf-qlora", "NF4"),
    ):
        speed = _ratio(
            results[ours]["speed"]["tokens_per_s"], results[theirs]["speed"]["tokens_per_s"]
        )
        memory = _ratio(
            results[ours]["memory"]["peak_bytes"], results[theirs]["memory"]["peak_bytes"]
        )
        lines.append(
            f"- {base} base: speed target {_verdict(speed, 1.2, True)}; "
            f"memory target {_verdict(memory, 1.0, False)}."
        )
    lines += [
        "",
        "Peak memory of the three ways to train this model (edgepeft for the adapters, the same "
        "batch for all), and the planner's estimate beside each:",
        "",
        "| setup | tokens/s | measured peak MiB | planner MiB | planner / measured |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("edgepeft-qlora", "QLoRA (NF4 base, edgepeft)"),
        ("edgepeft-lora", "LoRA (fp32 base, edgepeft)"),
        ("full-ft", "full fine-tuning (fp32, plain torch loop)"),
    ):
        r = results[name]
        lines.append(
            f"| {label} | {_rate(r['speed']['tokens_per_s'])} | {_mib(r['memory']['peak_bytes'])} "
            f"| {_mib(estimates[name])} | {estimates[name] / r['memory']['peak_bytes']:.2f} |"
        )
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines)


# ---------------------------------------------------------------- real model memory


def real_rows(case: RealCase, count: int) -> list[dict]:
    """Text rows longer than `case.seq_len` tokens (cut to it); with padding every other
    row is about half as long."""
    rows = make_rows(count, case.seq_len, seed=1)
    texts = [r["prompt"] + r["completion"] for r in rows]
    if case.padding:
        texts = [t if i % 2 == 0 else t[: len(t) // 3] for i, t in enumerate(texts)]
    return [{"text": t} for t in texts]


def real_memory(case: RealCase, workdir: Path, model_dir: Path | None = None) -> dict:
    """A few `edgepeft.train` steps of SmolLM2-135M (NF4, LoRA r=16 all-linear): the run's
    own planned peak, live-tensor peak and process RSS peak."""
    import torch
    from real_model import smollm2_dir

    import edgepeft as ep

    model_dir = model_dir or smollm2_dir()
    torch.set_num_threads(REAL_THREADS)
    model, tokenizer = ep.load_base(model_dir, quant="nf4", device="cpu")
    torch.manual_seed(0)
    ep.add_adapter(model, ep.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear"))
    config = ep.TrainConfig(
        max_seq_len=case.seq_len, batch_size=case.batch, max_steps=REAL_STEPS, lr=LR,
        gradient_checkpointing=case.checkpointing, optimizer="adamw", precision="fp32",
        val_fraction=0.0, eval_every=None, save_every=None, quiet=True,
    )  # fmt: skip
    rows = real_rows(case, case.batch * REAL_STEPS)
    result = ep.train(model, tokenizer, rows, config, workdir / "real-out")
    return {
        "case": dataclasses.asdict(case),
        "planned_peak_bytes": result.planned_peak_bytes,
        "peak_tensor_bytes": result.peak_tensor_bytes,
        "peak_rss_bytes": result.peak_rss_bytes,
        "seconds": result.seconds,
    }


def render_real(results: Sequence[dict], command: str) -> str:
    """The "train-real" section: per case, planned vs measured live peak, and RSS apart."""
    lines = [
        "## Training memory on a real model: planner vs measured (SmolLM2-135M, CPU)",
        "",
        "SmolLM2-135M-Instruct (scripts/real_model.py: 30 layers, hidden 576, GQA 9/3, vocab "
        f"49,152, tied embeddings), NF4 base (double quant), LoRA r={LORA_R} alpha={LORA_ALPHA} "
        f"on every linear layer, fp32 compute, torch AdamW; {REAL_STEPS} `edgepeft.train` steps "
        f"per case, {REAL_THREADS} threads, each case in a fresh process. Every number is the "
        "run's own report (`TrainResult`): planned = `estimate_memory` for the run; live tensors "
        "= the peak of live tensor bytes over the metered steps (`TensorPeak`, what the planner "
        "estimates and what `max_memory` budgets); RSS = the process's peak resident set, model "
        "load included (Python, torch, the NF4 load's freed fp32 pages, allocator caching).",
        "",
        "| case | planned MiB | live tensors MiB | planned / live | process RSS MiB | RSS / live |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        case, live = RealCase(**r["case"]), r["peak_tensor_bytes"]
        lines.append(
            f"| {case.label} | {_mib(r['planned_peak_bytes'])} | {_mib(live)} "
            f"| {r['planned_peak_bytes'] / live:.2f} | {_mib(r['peak_rss_bytes'])} "
            f"| {r['peak_rss_bytes'] / live:.2f} |"
        )
    worst = max(abs(r["planned_peak_bytes"] / r["peak_tensor_bytes"] - 1) for r in results)
    lines += [
        "",
        f"- planner vs live-tensor peak: worst {worst:.0%} off (target ±15%: "
        f"{'met' if worst <= 0.15 else 'missed'}).",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def run_real(args) -> str:
    """Measure every REAL_CASES case (fresh processes unless --in-process); the markdown."""
    from real_model import smollm2_dir

    smollm2_dir()  # build the cached folder once, before the workers (prints progress)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_real.") as tmp:
        workdir = Path(tmp)
        for i, case in enumerate(REAL_CASES):
            tick = time.perf_counter()
            if args.in_process:
                r = real_memory(case, workdir / str(i))
            else:
                r = _child(["--real-case", str(i)], workdir / f"real-{i}.json", workdir, REAL_THREADS)
            results.append(r)
            print(
                f"[{i + 1}/{len(REAL_CASES)}] {case.label}: planned {_mib(r['planned_peak_bytes'])} "
                f"MiB, live {_mib(r['peak_tensor_bytes'])} MiB, RSS {_mib(r['peak_rss_bytes'])} MiB "
                f"({time.perf_counter() - tick:.0f} s)",
                flush=True,
            )
    command = "python scripts/bench_train.py --real" + " --in-process" * args.in_process
    return render_real(results, command)


# ---------------------------------------------------------------- DyLoRA: quality per rank


@dataclass(frozen=True)
class DyloraSize:
    """One DyLoRA curve run: the task's size, the schedule, the ranks compared."""

    steps: int
    n_train: int
    n_test: int
    ranks: tuple[int, ...]


DYLORA_FULL = DyloraSize(steps=150, n_train=2000, n_test=32, ranks=(1, 2, 4, 8, 16))
DYLORA_SMOKE = DyloraSize(steps=2, n_train=32, n_test=4, ranks=(1, 2))
DYLORA_TASK = "reverse"
DYLORA_ALPHA = 32
"""alpha at every rank: DyLoRA at rank b scales by alpha / b, as a plain rank-b LoRA with the
same alpha does, so both sides of each row parametrize the same model."""


def dylora_train(config, steps: int, rows: list[dict], workdir: Path):
    """(model, tokenizer, seconds): `config` trained `steps` steps on the demo task, as the
    demo trains its LoRA."""
    import torch

    import edgepeft as ep
    from edgepeft.demo.paths import BASE_DIR

    model, tokenizer = ep.load_base(BASE_DIR, quant="nf4", device="cpu")
    torch.manual_seed(0)
    ep.add_adapter(model, config, name="task")
    train = ep.TrainConfig(
        max_steps=steps, lr=5e-3, warmup_steps=min(10, steps - 1), batch_size=32,
        max_seq_len=24, val_fraction=0.0, eval_every=None, save_every=None, quiet=True,
    )  # fmt: skip
    tick = time.perf_counter()
    ep.train(model, tokenizer, rows, train, workdir)
    return model.eval(), tokenizer, time.perf_counter() - tick


def dylora_score(model, tokenizer, test_rows: list[dict]) -> dict:
    """Exact match of greedy answers and the loss per label token on the test rows."""
    import edgepeft as ep
    from edgepeft.train import load_rows, tokenize_rows
    from edgepeft.train.data import pad_id_of
    from edgepeft.train.loss import evaluate_loss

    report = ep.evaluate(model, tokenizer, test_rows, adapters=["task"], max_new_tokens=8,
                         include_base=False, progress=False)  # fmt: skip
    rows, _ = load_rows(test_rows)
    examples = tokenize_rows(rows, tokenizer, ep.TrainConfig(max_seq_len=24))
    loss, _ = evaluate_loss(model, examples, batch_size=32, pad_id=pad_id_of(tokenizer))
    return {"exact_match": report["task"].metrics["exact_match"], "loss": loss}


def run_dylora(args) -> str:
    """One DyLoRA adapter at every rank against a plain LoRA per rank; the markdown."""
    import torch

    import edgepeft as ep
    from edgepeft.demo import corpus

    size = DYLORA_SMOKE if args.smoke else DYLORA_FULL
    torch.set_num_threads(1)
    train_rows, test_rows = corpus.task_splits(DYLORA_TASK, size.n_train, size.n_test)
    top = max(size.ranks)
    lora = dict(alpha=DYLORA_ALPHA, target_modules="all-linear")
    results: dict = {"size": dataclasses.asdict(size), "plain": {}}
    with tempfile.TemporaryDirectory(prefix="bench_dylora.") as tmp:
        workdir = Path(tmp)
        config = ep.LoraConfig(r=top, dylora_min_rank=min(size.ranks), **lora)
        for key, steps in (("dylora", size.steps), ("dylora_long", size.steps * len(size.ranks))):
            model, tok, seconds = dylora_train(config, steps, train_rows, workdir / key)
            results[key] = {"steps": steps, "seconds": seconds, "ranks": {}}
            for rank in size.ranks:
                ep.set_active_rank(model, rank, name="task")
                results[key]["ranks"][rank] = dylora_score(model, tok, test_rows)
                print(f"{key} at rank {rank}: {results[key]['ranks'][rank]}", flush=True)
        for rank in size.ranks:
            plain, tok, seconds = dylora_train(
                ep.LoraConfig(r=rank, **lora), size.steps, train_rows, workdir / f"lora-{rank}"
            )
            results["plain"][rank] = {**dylora_score(plain, tok, test_rows), "seconds": seconds}
            print(f"plain LoRA r={rank}: {results['plain'][rank]}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    command = "python scripts/bench_train.py --dylora" + " --smoke" * args.smoke
    return render_dylora(results, command, trial=args.smoke)


def render_dylora(results: dict, command: str, trial: bool = False) -> str:
    """The "dylora" section: per rank, the DyLoRA adapter cut there vs a LoRA of that rank."""
    size = DyloraSize(**{**results["size"], "ranks": tuple(results["size"]["ranks"])})
    plain_seconds = sum(r["seconds"] for r in results["plain"].values())
    lines = [
        "## DyLoRA: one adapter at every rank vs a LoRA trained per rank (demo task, CPU)",
        "",
        *(["**Trial run (--smoke): checks the script; the numbers mean nothing.**", ""] * trial),
        f"The demo base (edgepeft/demo/base_model, NF4) and its {DYLORA_TASK!r} task: "
        f"{size.n_train} training words, {size.n_test} held-out test words. LoRA alpha "
        f"{DYLORA_ALPHA} on every linear layer, {size.steps} steps of batch 32, lr 5e-3, cosine, "
        f"one thread. DyLoRA: r={max(size.ranks)}, dylora_min_rank={min(size.ranks)}, one rank "
        "drawn uniformly per step and all its leading rows/columns updated (the paper's "
        "'all first b' variant), evaluated with `set_active_rank` (equal to its `truncate_rank` "
        f"folder); 'x{len(size.ranks)} steps': the same trained "
        f"{size.steps * len(size.ranks)} steps, as many as the plain LoRAs together. Plain: a "
        "separate LoRA trained at that rank alone. EM: greedy exact match on "
        "the test words; loss: mean cross-entropy per completion token on them.",
        "",
        f"| rank | plain LoRA EM | DyLoRA EM | DyLoRA x{len(size.ranks)} steps EM | plain LoRA "
        f"loss | DyLoRA loss | DyLoRA x{len(size.ranks)} steps loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank in size.ranks:
        p = results["plain"][rank]
        d, long = results["dylora"]["ranks"][rank], results["dylora_long"]["ranks"][rank]
        lines.append(
            f"| {rank} | {p['exact_match']:.3f} | {d['exact_match']:.3f} "
            f"| {long['exact_match']:.3f} | {p['loss']:.3f} | {d['loss']:.3f} | {long['loss']:.3f} |"
        )
    lines += [
        "",
        f"Training time: DyLoRA {results['dylora']['seconds']:.0f} s ({size.steps} steps), "
        f"{results['dylora_long']['seconds']:.0f} s ({results['dylora_long']['steps']} steps); "
        f"the {len(size.ranks)} plain LoRAs {plain_seconds:.0f} s together.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few steps: checks the script, not speed"
    )
    parser.add_argument(
        "--benchmarks-file", type=Path, default=None,
        help="write the section into this file instead of the repository's BENCHMARKS.md",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--quick", action="store_true", help="smoke run in one process (seconds)")
    parser.add_argument("--output", type=Path, help="write the markdown here instead of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run every measurement in this process (fast; numbers not comparable: for tests)",
    )  # fmt: skip
    parser.add_argument(
        "--real", action="store_true",
        help="only the real-model memory check (SmolLM2-135M; section train-real)",
    )  # fmt: skip
    parser.add_argument(
        "--dylora", action="store_true",
        help="only the DyLoRA quality-per-rank curve (demo task; section dylora)",
    )  # fmt: skip
    parser.add_argument("--real-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; returns the section's markdown (also written unless --no-write)."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.smoke = args.in_process = True
    if args.worker:
        result = worker(args.worker, args.mode, args.workdir)
        out = args.workdir / f"{args.worker}-{args.mode}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)
        return ""
    if args.real_case is not None:
        result = real_memory(REAL_CASES[args.real_case], args.workdir / f"real-{args.real_case}")
        out = args.workdir / f"real-{args.real_case}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)
        return ""
    if args.real:
        return _publish(args, "train-real", run_real(args))
    if args.dylora:
        return _publish(args, "dylora", run_dylora(args))

    size = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        workdir = Path(tmp)
        plan = prepare(size, workdir)
        results: dict[str, dict] = {c.name: {} for c in CONTENDERS}
        jobs = [(c, mode) for c in CONTENDERS for mode in MODES]
        measure = run_in_process if args.in_process else run_worker
        for i, (c, mode) in enumerate(jobs, start=1):
            tick = time.perf_counter()
            results[c.name][mode] = r = measure(c.name, mode, workdir, size.threads)
            shown = (
                f"{r['tokens_per_s']:.0f} tokens/s" if mode == "speed"
                else f"peak {r['peak_bytes'] / MiB:.1f} MiB"
            )  # fmt: skip
            print(
                f"[{i}/{len(jobs)}] {c.name} {mode}: {shown} ({time.perf_counter() - tick:.0f} s)",
                flush=True,
            )
        estimates = planner_estimates(plan)
    command = (
        "python scripts/bench_train.py"
        + " --smoke" * args.smoke
        + " --in-process" * args.in_process
    )
    markdown = render(plan, results, estimates, command, trial=args.smoke or args.in_process)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json is not None:
        payload = {"size": dataclasses.asdict(size), "results": results, "estimates": estimates}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return _publish(args, "train", markdown)


def _publish(args, section: str, markdown: str) -> str:
    """Write `markdown` where the flags say (--output, --no-write, --benchmarks-file, or
    section `section` of BENCHMARKS.md); returns it."""
    if args.output is not None:
        args.output.write_text(f"{markdown}\n\n_Measured on: {benchmarks_md.machine()}_\n")
        print(f"wrote {args.output}", flush=True)
        return markdown
    if args.no_write:
        print(markdown)
        return markdown
    if args.benchmarks_file is not None:
        # write_section writes the module's BENCHMARKS path; point it elsewhere for this call.
        saved = benchmarks_md.BENCHMARKS
        benchmarks_md.BENCHMARKS = args.benchmarks_file.resolve()
        try:
            path = benchmarks_md.write_section(section, markdown)
        finally:
            benchmarks_md.BENCHMARKS = saved
    else:
        path = benchmarks_md.write_section(section, markdown)
    print(f"wrote section {section!r} of {path}", flush=True)
    return markdown


if __name__ == "__main__":
    main()
