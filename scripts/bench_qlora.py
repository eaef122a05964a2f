"""QLoRA on a real model: one adapter's task accuracy on the device in every export format,
beside llama.cpp Q4_K_M with the same adapter.

    a seeded JSON extraction task (task(): names, ages, cities, jobs; train and test share
    no first name, last name, city or job) ─► chat messages ─► SmolLM2's chat template
        prompts as token ids: the same ids go to PyTorch, the Engine and llama.cpp
    load_base(SmolLM2-135M-Instruct, "nf4") + LoRA r=16 on every linear layer
        ──edgepeft.train──► workdir/adapter (a PEFT folder; --reuse skips training)
    ├─ PyTorch, the training model (NF4 base + LoRA): greedy EM on the test prompts (and
    │  the base alone); logits on measure_int4.text("docs"): the reference of every KL
    ├─ edgepeft  ep.export(separate: fp32, int8, int4 default, nf4; merged: int4 default)
    │      ─► Engine: greedy EM, batch 1 ─► its session with the adapter's tensors fed:
    │      KL / top-1 ─► decode tok/s, adapter on and off (child processes)
    └─ llama.cpp convert_hf_to_gguf.py ─► F32 ─► Q4_K_M, Q8_0; convert_lora_to_gguf.py of
           the same PEFT folder ─► LoRA GGUF ─► Llama(lora_path=), each run in a child
           process: EM, logits, decode tok/s with and without the LoRA
    ─► BENCHMARKS.md section "qlora", or --output FILE

A contender that fails is a row marked "skipped" with the reason.

    python scripts/bench_qlora.py --workdir /tmp/qlora   # ~30 min on 2 cores, training included
    python scripts/bench_qlora.py --workdir /tmp/qlora --reuse   # the cached adapter
    python scripts/bench_qlora.py --quick --output /tmp/qlora.md   # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO))

import bench_quality as bq  # noqa: E402
import measure_int4  # noqa: E402
from benchmarks_md import run_worker  # noqa: E402
from real_model import smollm2_dir  # noqa: E402

THREADS = bq.THREADS
ADAPTER = "task"
SEED = 0
SYSTEM = "Extract name, age, city and job as JSON."
PYTORCH = "PyTorch: NF4 base + LoRA (the training model)"
PYTORCH_BASE = "PyTorch: NF4 base alone (before training)"
TRAINING_MODEL = "(the training model)"
"""Ends the PyTorch training model's label, whatever the base quantization."""
DEFAULT = "edgepeft separate int4 (default)"
PEER = "llama.cpp Q4_K_M + LoRA"
EXPORTS = {
    "fp32": ("edgepeft separate fp32", {"weights": "fp32", "mode": "separate"}),
    "int8": ("edgepeft separate int8", {"weights": "int8", "mode": "separate"}),
    "int4": (DEFAULT, {"weights": "int4", "mode": "separate"}),
    "nf4": ("edgepeft separate nf4 (exact)", {"weights": "nf4", "mode": "separate"}),
    "merged-int4": ("edgepeft merged int4 (default)", {"weights": "int4", "mode": "merged"}),
    "int4-exact": ("edgepeft separate int4, accuracy level 1",
                   {"weights": "int4", "mode": "separate", "accuracy_level": 1}),
    "merged-int4-exact": ("edgepeft merged int4, accuracy level 1",
                          {"weights": "int4", "mode": "merged", "accuracy_level": 1}),
}  # fmt: skip
"""Row label and ep.export keywords per edgepeft row (every other option the default)."""


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    train_rows: int
    test_rows: int
    steps: int
    """Optimizer steps of training."""
    batch_size: int
    lr: float
    kl_tokens: int
    """Tokens of measure_int4.text("docs") scored for KL and top-1."""
    window: int
    """Each window is scored alone, from an empty cache."""
    new_tokens: int
    """Decode-speed tokens per run (no early stop)."""
    runs: int
    """Decode-speed runs (median), after one warm-up."""
    exports: tuple[str, ...]
    """EXPORTS keys."""
    gguf: tuple[str, ...]
    """llama.cpp file types (bench_quality.GGUF_TYPES keys)."""
    base_quant: str = "nf4"
    """What the adapter trains over: "nf4" (QLoRA), or "int4", the export's own codes."""
    qalora: bool = False
    """QA-LoRA (int4 only): the LoRA input average-pooled per quantization group, so the
    update folds into the int4 zero points and the merged graph is plain int4."""

    def labels(self) -> tuple[str, str]:
        """(the PyTorch training model's row, the base alone's row)."""
        q = self.base_quant.upper()
        lora = "QA-LoRA" if self.qalora else "LoRA"
        return (
            f"PyTorch: {q} base + {lora} {TRAINING_MODEL}",
            f"PyTorch: {q} base alone (before training)",
        )

    @property
    def section(self) -> str:
        """BENCHMARKS.md section: "qlora", "qlora-int4", "qlora-qalora"."""
        return (
            "qlora-qalora" if self.qalora else "qlora" if self.base_quant == "nf4" else "qlora-int4"
        )


FULL = Plan(192, 50, 32, 6, 2e-3, 512, 256, 64, 3, tuple(EXPORTS), ("Q4_K_M", "Q8_0"))
QUICK = Plan(8, 3, 2, 4, 1e-3, 64, 64, 8, 1, ("int4",), ("Q4_K_M",))
INT4 = replace(FULL, exports=("int4", "int4-exact"), gguf=("Q4_K_M",), base_quant="int4")
"""--base-quant int4: train over the device's own int4 codes (issue 13); the separate int4
graph then runs those codes, at the CPU recipe's accuracy level 4 and at the exact level 1."""
QALORA = replace(INT4, exports=("merged-int4", "merged-int4-exact"), gguf=(), qalora=True)
"""--qalora: QA-LoRA over the int4 codes, deployed merged (separate mode is refused for it).
No llama.cpp row: its LoRA format has no group pooling (a QA-LoRA A is (r, in / group)), so
the peer sits in the qlora-int4 section, beside the same adapter trained without pooling."""
QALORA_GROUP = 32
"""QA-LoRA's pooling group: the int4 export's block size."""


def log(line: str) -> None:
    print(f"bench_qlora: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the task

FIRST = ("Maria", "James", "Aiko", "Omar", "Lena", "Tomas", "Priya", "Kofi", "Elena", "Hugo",
         "Sofia", "Mateo", "Ingrid", "Ravi", "Chloe", "Diego", "Yara", "Felix", "Nadia", "Oscar",
         "Leila", "Bruno", "Hana", "Ivan", "Zara", "Pablo", "Mei", "Emil", "Amara", "Lucas",
         "Freya", "Tariq", "Alma", "Jonas", "Noor", "Viktor", "Selin", "Arjun", "Clara",
         "Dmitri")  # fmt: skip
LAST = ("Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Novak", "Sharma", "Mensah", "Rossi",
        "Martin", "Silva", "Garcia", "Larsen", "Patel", "Dubois", "Moreno", "Costa", "Weber",
        "Petrova", "Berg", "Nasser", "Romano", "Kim", "Sokolov", "Ahmed", "Ruiz", "Chen", "Jensen",
        "Okafor", "Meyer", "Holm", "Aziz", "Vargas", "Koch", "Rahman", "Horvat", "Yilmaz", "Iyer",
        "Keller", "Popov")  # fmt: skip
CITIES = ("Lyon", "Osaka", "Cairo", "Porto", "Bergen", "Quito", "Dublin", "Accra", "Krakow",
          "Seville", "Leeds", "Hanoi", "Tartu", "Graz", "Nantes", "Cusco", "Malmo", "Izmir", "Pune",
          "Bremen", "Turin", "Cebu", "Ghent", "Split", "Basel", "Perth", "Lagos", "Rennes",
          "Bilbao", "Aarhus", "Kyoto", "Tunis", "Brno", "Cork", "Utrecht", "Leipzig")  # fmt: skip
JOBS = ("nurse", "baker", "pilot", "teacher", "plumber", "architect", "chemist", "librarian",
        "carpenter", "dentist", "electrician", "journalist", "pharmacist", "tailor", "surveyor",
        "translator", "mechanic", "florist", "geologist", "paramedic", "photographer", "welder",
        "accountant", "veterinarian", "chef", "gardener", "optician", "lawyer", "potter",
        "economist")  # fmt: skip
TEMPLATES = (
    "{name}, a {age}-year-old {job} from {city}, joined the team last spring.",
    "Meet {name}: {age} years old, works as {a_job} in {city}.",
    "In {city}, {name} ({age}) has worked as {a_job} for years.",
    "{name} is {a_job}. Age: {age}. Lives in {city}.",
    "Our new neighbour {name} moved here from {city}; the {age}-year-old is {a_job}.",
    "Profile: {job}, {age}, based in {city}. Name: {name}.",
)
AGES = range(20, 80)
"""Ages a template's "a {age}-year-old" reads right with (no "an 80-year-old")."""


@dataclass(frozen=True)
class Person:
    """One example: a sentence about a person and the JSON the model should answer."""

    name: str
    age: int
    city: str
    job: str
    sentence: str

    @property
    def answer(self) -> str:
        """The exact JSON wanted, keys in a fixed order."""
        fields = {"name": self.name, "age": self.age, "city": self.city, "job": self.job}
        return json.dumps(fields)

    def messages(self) -> list[dict]:
        """The prompt as chat messages (system, user)."""
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.sentence}]

    def row(self) -> dict:
        """A training row: the messages and the answer as the assistant turn."""
        return {"messages": [*self.messages(), {"role": "assistant", "content": self.answer}]}


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _split(values: tuple[str, ...], rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = list(values)
    rng.shuffle(shuffled)
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def _people(n: int, pools: tuple[list[str], ...], rng: random.Random) -> list[Person]:
    first, last, cities, jobs = pools
    people = []
    for _ in range(n):
        name = f"{rng.choice(first)} {rng.choice(last)}"
        age, city, job = rng.choice(AGES), rng.choice(cities), rng.choice(jobs)
        template = rng.choice(TEMPLATES)
        sentence = template.format(name=name, age=age, city=city, job=job, a_job=_article(job))
        people.append(Person(name, age, city, job, sentence))
    return people


def task(n_train: int, n_test: int, seed: int = SEED) -> tuple[list[Person], list[Person]]:
    """(train, test) people; every first name, last name, city and job list is split in two
    halves, one per side, so no test entity was seen in training. Same seed, same task."""
    rng = random.Random(seed)
    pools = [_split(values, rng) for values in (FIRST, LAST, CITIES, JOBS)]
    train = _people(n_train, tuple(p[0] for p in pools), rng)
    test = _people(n_test, tuple(p[1] for p in pools), rng)
    return train, test


def exact_match(prediction: str, answer: str) -> bool:
    """The generated text is the answer, character for character (outer whitespace aside)."""
    return prediction.strip() == answer


def em(predictions: list[str], people: list[Person]) -> float:
    """Share of predictions that exactly match their person's answer."""
    if len(predictions) != len(people) or not people:
        raise ValueError(f"{len(predictions)} predictions for {len(people)} test prompts")
    return sum(exact_match(p, q.answer) for p, q in zip(predictions, people, strict=True)) / len(
        people
    )


def agreement(predictions: list[str], reference: list[str]) -> float:
    """Share of predictions identical to the training model's on the same prompt."""
    return sum(a.strip() == b.strip() for a, b in zip(predictions, reference, strict=True)) / len(
        reference
    )


def prompt_ids(tokenizer, person: Person) -> list[int]:
    """The prompt's token ids as training tokenizes its prefix: [BOS if the tokenizer adds one
    to plain text] + the chat template with a generation prompt."""
    from edgepeft.train.data import bos_to_add

    text = tokenizer.apply_chat_template(
        person.messages(), tokenize=False, add_generation_prompt=True
    )
    return bos_to_add(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_budget(tokenizer, people: list[Person]) -> int:
    """max_new_tokens for the test: the longest answer's tokens, its end token and a margin."""
    return max(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in people) + 8


# ---------------------------------------------------------------- the rows and the table


@dataclass(frozen=True)
class Row:
    """One contender's numbers; None where it has none (shown as –)."""

    contender: str
    em: float | None = None
    same: float | None = None
    """Share of test outputs identical to the training model's."""
    kl: float | None = None
    """Mean KL(training model || contender) in nats on the scored text, adapter active."""
    top1: float | None = None
    tok_s: float | None = None
    """Decode tok/s with the adapter active."""
    base_tok_s: float | None = None
    """Decode tok/s of the same runtime and weights without the adapter."""
    mib: float | None = None
    """Base weights file(s) on disk, MiB."""
    adapter_mib: float | None = None
    """The adapter file, MiB (separate rows and llama.cpp's LoRA GGUF)."""
    skipped: str = ""


def _num(value: float | None, form: str) -> str:
    return "–" if value is None else format(value, form)


def _ratio(value: float | None, peer: float | None) -> str:
    return "–" if value is None or not peer else f"{value / peer:.2f}"


def find(rows: list[Row], contender: str) -> Row | None:
    return next((r for r in rows if r.contender == contender and not r.skipped), None)


def table(rows: list[Row]) -> list[str]:
    """The markdown table; decode speed also as a ratio to llama.cpp Q4_K_M + LoRA's."""
    peer = find(rows, PEER)
    lines = [
        "| contender | task EM | same output as PyTorch | KL vs training model | top-1 "
        "| decode tok/s, adapter on | vs llama.cpp Q4_K_M + LoRA, x | decode tok/s, no adapter "
        "| weights MiB | adapter MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.contender} | skipped: {r.skipped} | | | | | | | | |")
            continue
        same = "–" if r.same is None else f"{100 * r.same:.0f}%"
        top1 = "–" if r.top1 is None else f"{100 * r.top1:.1f}%"
        lines.append(
            f"| {r.contender} | {_num(r.em, '.3f')} | {same} | {_num(r.kl, '.4f')} | {top1} "
            f"| {_num(r.tok_s, '.1f')} | {_ratio(r.tok_s, peer and peer.tok_s)} "
            f"| {_num(r.base_tok_s, '.1f')} | {_num(r.mib, '.1f')} | {_num(r.adapter_mib, '.2f')} |"
        )
    return lines


def reading(rows: list[Row], merged_default: bool = False) -> str:
    """The issue's two goals, met or missed with the numbers: device EM == PyTorch EM in the
    default int4 format, and its decode >= 1.0x llama.cpp Q4_K_M's with the adapter.
    `merged_default`: the default format is merged int4 (QA-LoRA, which has no separate form)."""
    torch_row = next((r for r in rows if r.contender.endswith(TRAINING_MODEL)), None)
    form = "merged" if merged_default else "separate"
    ours = find(rows, EXPORTS["merged-int4"][0] if merged_default else DEFAULT)
    peer = find(rows, PEER)
    if ours is None or torch_row is None:
        return "**Reading**: not judged, no " + ("int4 row." if ours is None else "PyTorch row.")
    equal = ours.em == torch_row.em
    parts = [
        f"**Reading**: device EM in the default int4 format ({form}) is {ours.em:.3f} against "
        f"PyTorch's {torch_row.em:.3f}: **{'equal' if equal else 'not equal'}** "
        f"({100 * ours.same:.0f}% of the outputs are the training model's, character for "
        "character)."
    ]
    merged = find(rows, EXPORTS["merged-int4"][0])
    if merged is not None and merged is not ours:
        parts.append(f"Merged int4: EM {merged.em:.3f}.")
    if peer is None or not peer.tok_s or not ours.tok_s:
        parts.append("Decode speed against llama.cpp Q4_K_M + LoRA: not judged (no peer number).")
    else:
        ratio = ours.tok_s / peer.tok_s
        parts.append(
            f"Decode with the adapter active: {ours.tok_s:.1f} tok/s against llama.cpp Q4_K_M + "
            f"LoRA's {peer.tok_s:.1f}, **{ratio:.2f}x** (goal >= 1.0x: "
            f"**{'met' if ratio >= 1.0 else 'missed'}**)"
            + (
                f"; merged int4 {merged.tok_s / peer.tok_s:.2f}x."
                if merged and merged.tok_s
                else "."
            )
        )
        if peer.em is not None:
            parts.append(f"llama.cpp Q4_K_M + LoRA's EM: {peer.em:.3f}.")
    return " ".join(parts)


TITLES = {
    "qlora": "## QLoRA on a real model: the trained adapter's task EM on the device, every format",
    "qlora-int4": "## QLoRA over the device's own int4 codes: the same task, trained over "
    "load_base(quant='int4')",
    "qlora-qalora": "## QA-LoRA over the device's own int4 codes, merged into plain int4: the "
    "same task",
}


def markdown(rows: list[Row], info: dict, plan: Plan, quick: bool) -> str:
    t = info["train"]
    memory = (
        f", peak {t['peak_tensor_bytes'] / 2**20:.0f} MiB of live tensors "
        f"({t['peak_rss_bytes'] / 2**20:.0f} MiB process RSS)"
        if t.get("peak_tensor_bytes")
        else ""
    )
    lora = (
        f"one QA-LoRA (r=16, alpha=32, every linear layer, its input average-pooled over "
        f"groups of {QALORA_GROUP} inputs: `LoraConfig(use_qalora=True, qalora_group_size="
        f"{QALORA_GROUP})`; the {t.get('skipped_8bit_layers', 0)} linear layers the "
        "mixed-precision base stores 8-bit keep none, since QA-LoRA folds into 4-bit float "
        "zero points only)"
        if plan.qalora
        else "one LoRA (r=16, alpha=32, every linear layer)"
    )
    lines = [
        TITLES[plan.section],
        "",
        "`python scripts/bench_qlora.py`"
        + (" --quick (smoke run: the numbers check the script, not quality)" if quick else "")
        + f". SmolLM2-135M-Instruct (scripts/real_model.py) loaded with `load_base(quant='{plan.base_quant}')`; "
        f"{lora} trained with `edgepeft.train` on a seeded "
        f"synthetic JSON extraction task ({plan.train_rows} sentences about a person, e.g. "
        f'"{info["example"]["sentence"]}" ─► `{info["example"]["answer"]}`; chat template, '
        "loss on the answer): "
        f"{t['steps']} steps of {plan.batch_size} rows, lr {plan.lr:g}, {t['seconds']:.0f} s, "
        f"{t['tokens_per_s']:.0f} training tok/s on {THREADS} threads{memory}, final loss "
        f"{t['final_loss']:.3f}. Task EM: exact string match of the greedy answer on "
        f"{info['test_rows']} held-out prompts (no first name, last name, city or job of the "
        f"test is in training), at most {info['max_new_tokens']} new tokens; every contender gets "
        f"the same prompt token ids. KL (nats) and top-1 against the training model (PyTorch, {plan.base_quant.upper()} "
        f"base + {'QA-LoRA' if plan.qalora else 'LoRA'}) on the first {info['kl_tokens']} tokens of measure_int4.text('docs') in "
        f"windows of {plan.window}, the adapter active. Decode: batch 1, {THREADS} threads, the "
        f"first test prompt ({info['speed_prompt_tokens']} tokens), {plan.new_tokens} new tokens, "
        f"no early stop, median of {plan.runs} runs after a warm-up, each contender in a fresh "
        "process. edgepeft rows: `ep.export(base, out, {'task': adapter}, weights=..., "
        f"mode=...)` from the HF folder (the base loaded as the adapter was trained: {plan.base_quant.upper()}) and "
        "`edgepeft.runtime.Engine`; separate rows switch the adapter in at run time (its file "
        "beside the base graph), merged folds it into the weights (its no-adapter speed: the "
        "base exported alone with the same options). llama.cpp rows: "
        "convert_hf_to_gguf.py of the fp32 HF folder (not the NF4 base the adapter was trained "
        "on) ─► llama_model_quantize, and the same PEFT folder through convert_lora_to_gguf.py "
        "(f32), applied with `Llama(lora_path=...)`."
        + (
            " This llama-cpp-python build has AMX kernels, which segfault here on quantized "
            "GGUFs: its weights are loaded as stored (`use_extra_bufts=False`, no repacking), "
            "which can cost it decode speed."
            if info.get("llama_as_stored")
            else ""
        ),
        "",
        *table(rows),
        "",
        reading(rows, merged_default=plan.qalora),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- training and PyTorch


def plan_key(plan: Plan) -> dict:
    """What makes a cached adapter this plan's: its data and training, not its measuring."""
    return {"seed": SEED, "system": SYSTEM, "train_rows": plan.train_rows, "steps": plan.steps,
            "batch_size": plan.batch_size, "lr": plan.lr, "base_quant": plan.base_quant,
            "qalora": plan.qalora}  # fmt: skip


def trained_model(plan: Plan, train: list[Person], work: Path, reuse: bool):
    """(model with the adapter active, tokenizer, training numbers, reused): trained, or the
    cached workdir/adapter loaded over a fresh NF4 base when --reuse finds one of the same plan."""
    import edgepeft as ep

    folder, record = work / "adapter", work / "train.json"
    model, tokenizer = ep.load_base(smollm2_dir(), quant=plan.base_quant)
    if reuse and record.is_file() and (folder / "adapter_config.json").is_file():
        saved = json.loads(record.read_text())
        if saved["plan"] == plan_key(plan):
            log(f"reusing the adapter in {folder}")
            ep.load_adapter(model, folder, name=ADAPTER)
            return model.eval(), tokenizer, saved, True
        log(f"{folder} was trained with {saved['plan']}, not {plan_key(plan)}: training again")
    torch.manual_seed(SEED)
    qalora, skipped_8bit = {}, ()
    if plan.qalora:
        # QA-LoRA folds into 4-bit float zero points only: the 8-bit layers of the mixed
        # precision base keep no adapter (add_adapter refuses them, naming each).
        skipped_8bit = tuple(eight_bit_layers(model))
        qalora = {"use_qalora": True, "qalora_group_size": QALORA_GROUP,
                  "exclude_modules": skipped_8bit or None}  # fmt: skip
    lora = ep.LoraConfig(r=16, alpha=32, target_modules="all-linear", **qalora)
    ep.add_adapter(model, lora, name=ADAPTER)
    config = ep.TrainConfig(max_steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr,
                            warmup_steps=min(3, plan.steps - 1), val_fraction=0.0,
                            eval_every=None, save_every=None, seed=SEED, quiet=True)  # fmt: skip
    log(f"training {plan.steps} steps of {plan.batch_size} rows")
    shutil.rmtree(work / "run", ignore_errors=True)
    result = ep.train(model, tokenizer, [p.row() for p in train], config, work / "run",
                      adapter=ADAPTER)  # fmt: skip
    ep.save_adapter(model, folder, name=ADAPTER)
    numbers = {"plan": plan_key(plan), "steps": result.steps, "seconds": result.seconds,
               "tokens_per_s": result.tokens_per_s, "final_loss": result.final_train_loss,
               "first_loss": result.train_losses[0],
               "peak_tensor_bytes": result.peak_tensor_bytes,
               "peak_rss_bytes": result.peak_rss_bytes,
               "skipped_8bit_layers": len(skipped_8bit)}  # fmt: skip
    from edgepeft.atomic import write_json

    write_json(record, numbers)
    log(f"trained in {result.seconds:.0f} s, {result.tokens_per_s:.0f} tok/s, "
        f"loss {result.train_losses[0]:.3f} -> {result.final_train_loss:.3f}")  # fmt: skip
    return model.eval(), tokenizer, numbers, False


def eight_bit_layers(model) -> list[str]:
    """Names of the int4 base's linear layers stored 8-bit (its mixed precision)."""
    from edgepeft.int4_base import Int4Linear

    return [n for n, m in model.named_modules() if isinstance(m, Int4Linear) and m.bits == 8]


def torch_generate(model, prompts: list[list[int]], max_new_tokens: int, eos: int,
                   batch: int = 64) -> list[list[int]]:  # fmt: skip
    """Greedy new token ids per prompt (left-padded batches; cut before the first eos)."""
    out = []
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in group])  # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos,
                                       pad_token_id=eos)  # fmt: skip
        out += [until_eos(row, eos) for row in generated[:, width:].tolist()]
    return out


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def torch_logits(model, chunks: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0].float().numpy() for w in chunks]


def pytorch_side(model, tok, prompts, chunks, max_new: int, work: Path, cached: bool):
    """(base alone's texts, training model's texts, its (T, V) logits per window); kept in
    workdir/pytorch.json + pytorch-logits.npy, reused when `cached` (the adapter was reused)
    and they were made for the same prompts, windows and budget."""
    import edgepeft as ep
    from edgepeft.atomic import write_json

    key = {"prompts": prompts, "chunks": chunks, "max_new": max_new}
    record, scores = work / "pytorch.json", work / "pytorch-logits.npy"
    if cached and record.is_file() and scores.is_file():
        saved = json.loads(record.read_text())
        if saved["key"] == key:
            log(f"reusing the PyTorch outputs in {record}")
            return saved["base"], saved["adapter"], list(np.load(scores))
    eos = tok.eos_token_id
    with ep.disable_adapters(model):
        base = [tok.decode(g, skip_special_tokens=True)
                for g in torch_generate(model, prompts, max_new, eos)]  # fmt: skip
    adapted = [tok.decode(g, skip_special_tokens=True)
               for g in torch_generate(model, prompts, max_new, eos)]  # fmt: skip
    logits = torch_logits(model, chunks)
    np.save(scores, np.stack(logits))  # every window has the same length
    write_json(record, {"key": key, "base": base, "adapter": adapted})
    return base, adapted, logits


# ---------------------------------------------------------------- edgepeft


def export_one(key: str, adapter: Path, work: Path) -> tuple[Path, str | None, Path | None]:
    """(graph folder, adapter name to pass the Engine or None, adapter file or None)."""
    from edgepeft.export.api import export

    out = work / f"export-{key}"
    result = export(smollm2_dir(), out, {ADAPTER: adapter}, **EXPORTS[key][1], verify=False,
                    quiet=True, overwrite=True)  # fmt: skip
    if EXPORTS[key][1]["mode"] == "merged":
        return result.graphs[ADAPTER], None, None
    return result.graphs[""], ADAPTER, out / "adapters" / f"{ADAPTER}.onnx_adapter"


def export_base_alone(key: str, plan: Plan, work: Path) -> Path:
    """A merged row's no-adapter graph: the base alone, as the adapter trained over it, with
    that row's weight options (what the merged graph's speed is compared with)."""
    from edgepeft.export.api import export

    options = {k: v for k, v in EXPORTS[key][1].items() if k != "mode"}
    out = work / f"export-{key}-base-alone"
    quant = plan.base_quant if plan.base_quant == "int4" else None
    return export(smollm2_dir(), out, None, **options, quant=quant, verify=False, quiet=True,
                  overwrite=True).graphs[""]  # fmt: skip


def engine_outputs(
    engine, prompts: list[list[int]], adapter: str | None, max_new: int
) -> list[str]:
    return [engine.generate(p, adapter=adapter, max_new_tokens=max_new) for p in prompts]


def engine_logits(engine, adapter_file: Path | None, chunks: list[list[int]], head_size: int):
    """(T, V) logits per window through the Engine's own session, the adapter's tensors fed
    as the graph inputs they override (as the Engine binds them)."""
    from edgepeft.runtime.adapters import read_adapter

    session, extra = engine.session, {}
    if adapter_file is not None:
        m = engine.manifest
        loaded = read_adapter(
            adapter_file, name=ADAPTER, base_fingerprint=m.base_fingerprint,
            graph_inputs={i.name for i in session.get_overridable_initializers()},
            kv_shape=(m.num_layers, m.num_kv_heads, m.head_dim),
        )  # fmt: skip
        extra = {name: value.numpy() for name, value in loaded.parameters.items()}
    feeds = (dict(bq.ort_feeds(session, w, head_size), **extra) for w in chunks)
    return [session.run(["logits"], f)[0][0] for f in feeds]


def speed(kind: str, path: Path, prompt: list[int], plan: Plan, **extra) -> float | None:
    """Decode tok/s measured in a fresh process; None (logged) when it fails."""
    spec = {"kind": kind, "path": str(path), "prompt": prompt, "new_tokens": plan.new_tokens,
            "runs": plan.runs, **extra}  # fmt: skip
    try:
        return run_worker(__file__, spec)["tok_s"]
    except Exception as e:
        log(f"{kind} speed of {path.name}: {bq.reason(e)}")
        return None


def edgepeft_row(key, adapter, work, prompts, people, reference_text, ref, wanted, info, plan):
    from edgepeft.runtime import Engine

    label = EXPORTS[key][0]
    started = time.perf_counter()
    try:
        folder, name, adapter_file = export_one(key, adapter, work)
        engine = Engine(folder, threads=THREADS)
        outputs = engine_outputs(engine, prompts, name, info["max_new_tokens"])
        logits = engine_logits(engine, adapter_file, info["chunks"], bq.head_dim(smollm2_dir()))
        del engine
    except Exception as e:  # a format that fails is reported in its row
        log(f"{label}: skipped, {bq.reason(e)}")
        return Row(label, skipped=bq.reason(e))
    q = measure_int4.score(ref, bq.scored(logits), wanted)
    info["outputs"][label] = outputs
    prompt = prompts[0]
    on = speed("engine", folder, prompt, plan, adapter=name)
    if name:  # separate: the same graph with the adapter off
        off = speed("engine", folder, prompt, plan, adapter=None)
    else:  # merged: the base exported alone with the same options
        off = speed("engine", export_base_alone(key, plan, work), prompt, plan, adapter=None)
    row = Row(label, em(outputs, people), agreement(outputs, reference_text), q.kl, q.top1, on,
              off, bq.mib(bq.weights_mb(folder)),
              bq.mib(adapter_file.stat().st_size / 1e6) if adapter_file else None)  # fmt: skip
    log(f"{label}: EM {row.em:.3f}, same {row.same:.2f}, KL {q.kl:.4f}, {on} tok/s "
        f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return row


# ---------------------------------------------------------------- llama.cpp


def llama_generate(path: Path, lora: Path | None, prompts: list[list[int]], max_new: int,
                   eos: int) -> list[list[int]]:  # fmt: skip
    """Greedy new token ids per prompt from llama.cpp (our ids fed as they are)."""
    model = bq.llama(path, max(len(p) for p in prompts) + max_new + 1, True, lora_path=lora)
    out = []
    for prompt in prompts:
        model.reset()
        model.eval(prompt)
        ids = []
        for _ in range(max_new):
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            if token == eos:
                break
            ids.append(token)
            model.eval([token])
        out.append(ids)
    model.close()
    return out


def llama_rows(adapter, work, prompts, people, reference_text, ref, wanted, info, plan, tok):
    labels = {kind: f"llama.cpp {kind} + LoRA" for kind in plan.gguf}
    missing = bq.installed("llama_cpp")
    if missing:
        return [Row(label, skipped=missing) for label in labels.values()]
    try:
        f32 = work / "F32.gguf"
        if not f32.is_file():
            bq.gguf_f32(smollm2_dir(), f32)
        lora = bq.gguf_lora(adapter, smollm2_dir(), work / "lora-f32.gguf")
    except Exception as e:
        return [Row(label, skipped=bq.reason(e)) for label in labels.values()]
    info["llama_as_stored"] = amx_build()
    rows = []
    for kind, label in labels.items():
        started = time.perf_counter()
        path = work / f"{kind}.gguf"
        common = {"path": str(path), "lora": str(lora)}
        try:
            if not path.is_file():
                bq.gguf_quantized(f32, kind, path)
            job = {**common, "kind": "llama_generate", "prompts": prompts,
                   "max_new": info["max_new_tokens"], "eos": info["eos"]}  # fmt: skip
            generated = run_worker(__file__, job)["ids"]
            scores = work / f"logits-{kind}.npy"
            run_worker(__file__, {**common, "kind": "llama_logits", "chunks": info["chunks"],
                                  "out": str(scores)})  # fmt: skip
            logits = list(np.load(scores))
        except Exception as e:  # a crashed child is this row's reason, not the benchmark's end
            log(f"{label}: skipped, {bq.reason(e)}")
            rows.append(Row(label, skipped=bq.reason(e)))
            continue
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in generated]
        info["outputs"][label] = texts
        q = measure_int4.score(ref, bq.scored(logits), wanted)
        on = speed("llama", path, prompts[0], plan, lora=str(lora))
        off = speed("llama", path, prompts[0], plan, lora=None)
        rows.append(Row(label, em(texts, people), agreement(texts, reference_text), q.kl, q.top1,
                        on, off, bq.mib(path.stat().st_size / 1e6),
                        bq.mib(lora.stat().st_size / 1e6)))  # fmt: skip
        log(f"{label}: EM {rows[-1].em:.3f}, KL {q.kl:.4f}, {on} / {off} tok/s "
            f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    return rows


# ---------------------------------------------------------------- workers


def amx_build() -> bool:
    """Whether the installed llama-cpp-python was built with its AMX kernels."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def no_extra_buffers() -> None:
    """Make an AMX build of llama-cpp-python load weights as stored, not repacked into its
    extra CPU buffer types: 0.3.36 segfaults there on quantized GGUFs on this AMX CPU, with or
    without a LoRA. Llama() takes no argument for it, so the defaults it starts from are
    patched, in this (worker) process only. A build without AMX keeps its repacking."""
    import llama_cpp.llama_cpp as bindings

    default = bindings.llama_model_default_params
    if getattr(default, "as_stored", False) or not amx_build():
        return

    def as_stored():
        params = default()
        params.use_extra_bufts = False
        return params

    as_stored.as_stored = True
    bindings.llama_model_default_params = as_stored


def worker(spec: dict) -> dict:
    """`--worker SPEC`: one measurement alone in its process; JSON printed as the last line."""
    kind, path = spec["kind"], Path(spec["path"])
    lora = Path(spec["lora"]) if spec.get("lora") else None
    if kind.startswith("llama"):
        no_extra_buffers()
    if kind in ("engine", "llama"):
        size = bq.Size(0, 0, spec["new_tokens"], spec["runs"], (), (), False)
        if kind == "engine":
            return {"tok_s": bq.engine_speed(path, spec["prompt"], size, adapter=spec["adapter"])}
        return {"tok_s": bq.llama_speed(path, spec["prompt"], size, lora_path=lora)}
    if kind == "llama_generate":
        return {"ids": llama_generate(path, lora, spec["prompts"], spec["max_new"], spec["eos"])}
    if kind == "llama_logits":
        logits = bq.llama_logits(path, spec["chunks"], lora_path=lora)
        np.save(spec["out"], np.stack(logits))  # every window has the same length here
        return {"out": spec["out"]}
    raise ValueError(f"unknown worker kind {kind!r}")


# ---------------------------------------------------------------- main


def run(plan: Plan, work: Path, reuse: bool) -> tuple[list[Row], dict]:
    train, test = task(plan.train_rows, plan.test_rows)
    model, tok, numbers, reused = trained_model(plan, train, work, reuse)
    prompts = [prompt_ids(tok, p) for p in test]
    eos = tok.eos_token_id
    max_new = answer_budget(tok, test)
    ids = bq.text_ids(smollm2_dir(), plan.kl_tokens)
    chunks = [w for w in bq.windows(ids, plan.window) if len(w) == plan.window] or [ids]
    wanted = bq.targets(chunks)
    info = {"train": numbers, "test_rows": len(test), "max_new_tokens": max_new, "eos": eos,
            "chunks": chunks, "kl_tokens": sum(len(w) for w in chunks),
            "speed_prompt_tokens": len(prompts[0]),
            "example": {"sentence": train[0].sentence, "answer": train[0].answer}}  # fmt: skip

    started = time.perf_counter()
    base_text, reference_text, logits = pytorch_side(model, tok, prompts, chunks, max_new, work,
                                                     reused)  # fmt: skip
    ref = bq.scored(logits)
    trained_label, base_label = plan.labels()
    rows = [Row(base_label, em(base_text, test), agreement(base_text, reference_text)),
            Row(trained_label, em(reference_text, test), 1.0, 0.0, 1.0)]  # fmt: skip
    log(f"PyTorch EM: base {rows[0].em:.3f}, adapter {rows[1].em:.3f} "
        f"({time.perf_counter() - started:.0f} s); e.g. {reference_text[0]!r}")  # fmt: skip
    info["outputs"] = {base_label: base_text, trained_label: reference_text}
    del model
    gc.collect()

    adapter = work / "adapter"
    common = (prompts, test, reference_text, ref, wanted, info, plan)
    rows += [edgepeft_row(key, adapter, work, *common) for key in plan.exports]
    rows += llama_rows(adapter, work, *common, tok)
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few prompts and steps (smoke)")
    parser.add_argument("--output", type=Path, help="write the markdown here, not BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the adapter, exports and GGUFs here")
    parser.add_argument("--reuse", action="store_true",
                        help="use the adapter a run of the same plan left in --workdir")  # fmt: skip
    parser.add_argument("--base-quant", choices=("nf4", "int4"), default="nf4",
                        help="train over NF4 (QLoRA; section qlora) or over the int4 export's own "
                        "codes (section qlora-int4)")  # fmt: skip
    parser.add_argument(
        "--qalora",
        action="store_true",
        help="QA-LoRA over the int4 codes, deployed merged (section qlora-qalora)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.reuse and args.workdir is None:
        parser.error("--reuse needs --workdir (where the adapter was kept)")
    if args.qalora:
        args.base_quant = "int4"
    plan = (
        QUICK
        if args.quick
        else QALORA
        if args.qalora
        else INT4
        if args.base_quant == "int4"
        else FULL
    )
    if args.quick and args.base_quant == "int4":
        plan = replace(QUICK, base_quant="int4", qalora=args.qalora)
        if args.qalora:
            plan = replace(plan, exports=("merged-int4",), gguf=())
    torch.set_num_threads(THREADS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_qlora."))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        rows, info = run(plan, work, args.reuse)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, info, plan, args.quick)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        from edgepeft.atomic import write_json

        kept = {k: v for k, v in info.items() if k != "chunks"}
        write_json(args.json, {"plan": asdict(plan), "info": kept,
                               "rows": [asdict(r) for r in rows]})  # fmt: skip
    from benchmarks_md import publish

    log(f"wrote {publish(plan.section, text, args.output)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
