"""Train/deploy parity: does the device compute what was trained, per weight format?

    tiny random Llama (edgepeft.tiny config) ──load_base(nf4)──► + LoRA r=8 all-linear
        ──edgepeft.train on the built-in "reverse" task (edgepeft.tasks, seed 0)──►
        training-time model: bitsandbytes NF4 base + LoRA active (PyTorch)
            │ task EM: edgepeft.train.evaluate (HF generate, greedy, stop at EOS)
            ▼ adapter folder (PEFT format)
    edgepeft.export per row:  merged  fp32 | fp16 | int8 | int4 | nf4    (LoRA folded in)
                              separate int4 | nf4    (base graph + reverse.onnx_adapter)
    per row:
        bytes / parameter   model.onnx.data bytes / base parameter count
        decode tok/s        batch 1, plain onnxruntime session.run loop, 2 threads, median
        max |Δlogit|, top-1 verify's check_graph against the training-time model, on
                            task prompts (teacher-forced prefill + decode)
        task EM (ONNX)      greedy through onnxruntime on the test split, stop at EOS
    ─► BENCHMARKS.md section "parity" (scripts/benchmarks_md.py), or --output FILE; --json FILE

Exact rows: separate nf4 runs bitsandbytes' own NF4 codes (MatMulBnb4) with the adapter as
graph inputs, so it is judged against the trained model (<= 1e-3). Every merged row folds the
LoRA into the dequantized base and then rounds the sum again (fp16, int8, int4 RTN, or NF4
re-quantized with bitsandbytes): not the trained weights. merged fp32 holds the trained
weights unrounded (judged <= 1e-4); separate int4 rounds the base only.

    python scripts/bench_parity.py                         full run (~5 min on 2 quiet cores)
    python scripts/bench_parity.py --quick --output /tmp/parity.md     smoke run (seconds)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ADAPTER = "reverse"
THREADS = 2
ROWS = (  # (mode, weights)
    ("merged", "fp32"),
    ("merged", "fp16"),
    ("merged", "int8"),
    ("merged", "int4"),
    ("merged", "nf4"),
    ("separate", "int4"),
    ("separate", "nf4"),
)
NOTES = {
    ("merged", "fp32"): "trained weights, unrounded",
    ("merged", "fp16"): "merged, rounded to fp16",
    ("merged", "int8"): "merged, re-quantized (int8 RTN)",
    ("merged", "int4"): "merged, re-quantized (int4 default: fitted blocks, int8 mix)",
    ("merged", "nf4"): "merged, re-quantized to NF4",
    ("separate", "int4"): "base re-quantized (int4 default), LoRA exact",
    ("separate", "nf4"): "exact: the trained NF4 codes + LoRA",
}


@dataclass(frozen=True)
class Setup:
    """Model size, training length and measurement size of one run."""

    model: dict
    """Overrides of edgepeft.tiny's llama config."""
    steps: int
    train_rows: int
    test_rows: int
    check_prompts: int
    decode_tokens: int
    decode_runs: int


# A short rotary table: the graph stores cos/sin caches of max_position_embeddings rows, which
# would otherwise outweigh a tiny model's layers in bytes/param (the task needs 12 positions).
_POSITIONS = dict(max_position_embeddings=256)
# edgepeft.tiny's llama: LoRA learns "reverse" on it in 300 CPU steps (tests/test_train_quality.py
# measured exact match 1.0). Decode speed on a model this small is per-step overhead, not
# matmuls; compare the rows with each other, and see the "export" section for model speed.
FULL = Setup(
    model=_POSITIONS, steps=300, train_rows=512, test_rows=128, check_prompts=16,
    decode_tokens=64, decode_runs=5,
)  # fmt: skip
QUICK = Setup(
    model=_POSITIONS, steps=8, train_rows=64, test_rows=8, check_prompts=2, decode_tokens=4,
    decode_runs=1,
)  # fmt: skip


def log(line: str) -> None:
    print(f"bench_parity: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- training


def train_adapter(setup: Setup, work: Path) -> tuple:
    """(training-time model, tokenizer, adapter folder, base folder, test rows, PyTorch EM, s)."""
    import torch

    import edgepeft as ep
    from edgepeft.tasks import make_splits
    from edgepeft.tiny import tiny_model, tiny_tokenizer
    from edgepeft.train.evaluate import evaluate

    base_dir = work / "base"
    tiny_model("llama", 0, **setup.model).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)

    train_rows, test_rows = make_splits("reverse", (setup.train_rows, setup.test_rows), seed=0)
    model, tokenizer = ep.load_base(base_dir, quant="nf4")
    torch.manual_seed(0)
    ep.add_adapter(model, ep.LoraConfig(r=8, alpha=16, target_modules="all-linear"), name=ADAPTER)
    log(f"training LoRA over the NF4 base, {setup.steps} steps")
    started = time.perf_counter()
    train_config = ep.TrainConfig(
        max_steps=setup.steps, lr=5e-3, batch_size=16, max_seq_len=32, val_fraction=0.0,
        warmup_steps=10, eval_every=None, save_every=None, quiet=True,
    )  # fmt: skip
    ep.train(model, tokenizer, train_rows, train_config, work / "run", adapter=ADAPTER)
    seconds = time.perf_counter() - started
    model.eval()
    adapter_dir = ep.save_adapter(model, work / "adapter", name=ADAPTER)
    report = evaluate(
        model, tokenizer, test_rows, adapters=[ADAPTER], max_new_tokens=6, batch_size=64,
        include_base=False, progress=False,
    )  # fmt: skip
    return model, tokenizer, adapter_dir, base_dir, test_rows, report[ADAPTER].metrics, seconds


# ---------------------------------------------------------------- onnxruntime side


class Graph:
    """One exported graph (+ its adapter file) behind a plain session.run step."""

    def __init__(self, folder: Path, adapter_file: Path | None):
        import onnxruntime as ort

        from edgepeft.export.graph_info import input_names
        from edgepeft.export.manifest import read_manifest

        self.manifest = read_manifest(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = folder / self.manifest.model_file
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = input_names(self.manifest.num_layers)
        self.run_options = self.adapter = None
        if adapter_file is not None:
            self.adapter = ort.LoraAdapter()  # kept alive as long as the run options
            self.adapter.Load(str(adapter_file))
            self.run_options = ort.RunOptions()
            self.run_options.add_active_adapter(self.adapter)

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        feeds = dict(zip(self.names, [ids, mask, *past], strict=True))
        logits, *present = self.session.run(None, feeds, self.run_options)
        return logits, present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        shape = (batch, m.num_kv_heads, 0, m.head_dim)
        return [np.zeros(shape, np.dtype(m.kv_dtype)) for _ in range(2 * m.num_layers)]

    def greedy(self, prompts: list[list[int]], new_tokens: int, pad: int) -> np.ndarray:
        """(B, new_tokens) greedy continuations of left-padded prompts (no stop token)."""
        width = max(len(p) for p in prompts)
        ids = np.array([[pad] * (width - len(p)) + p for p in prompts], np.int64)  # (B, T)
        mask = (np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None])
        mask = mask.astype(np.int64)
        logits, past = self.step(ids, mask, self.empty_past(len(prompts)))
        tokens = []
        for _ in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1))  # (B,)
            if len(tokens) == new_tokens:
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            logits, past = self.step(tokens[-1][:, None].astype(np.int64), mask, past)
        return np.stack(tokens, axis=1)

    def decode_speed(self, prompt: list[int], new_tokens: int, runs: int) -> float:
        """Median tok/s of the decode steps alone (prefill excluded), batch 1."""
        speeds = []
        for _ in range(runs + 1):  # the first run warms the session up and is not counted
            ids = np.array([prompt], np.int64)
            logits, past = self.step(ids, np.ones_like(ids), self.empty_past(1))
            token = int(logits[0, -1].argmax())
            started = time.perf_counter()
            for t in range(new_tokens):
                mask = np.ones((1, len(prompt) + t + 1), np.int64)
                logits, past = self.step(np.array([[token]], np.int64), mask, past)
                token = int(logits[0, -1].argmax())
            speeds.append(new_tokens / (time.perf_counter() - started))
        return statistics.median(speeds[1:])


def prompt_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Prompt token ids as edgepeft.train.evaluate builds them: [BOS] + prompt."""
    from edgepeft.train.data import bos_to_add

    bos = bos_to_add(tokenizer)
    return [bos + list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]


def task_exact_match(graph: Graph, tokenizer, rows: list[dict], new_tokens: int) -> float:
    """Mean exact match of onnxruntime's greedy answers, cut at the first EOS."""
    from edgepeft.metrics import exact_match

    tokens = graph.greedy(prompt_ids(tokenizer, rows), new_tokens, tokenizer.pad_token_id or 0)
    eos = tokenizer.eos_token_id
    scores = []
    for row, generated in zip(rows, tokens.tolist(), strict=True):
        stop = generated.index(eos) if eos in generated else len(generated)
        answer = tokenizer.decode(generated[:stop], skip_special_tokens=True).strip()
        scores.append(exact_match(answer, row["completion"]))
    return float(np.mean(scores))


# ---------------------------------------------------------------- one row


@dataclass(frozen=True)
class Row:
    mode: str
    weights: str
    bytes_per_param: float
    data_bytes: int
    adapter_bytes: int | None
    decode_tok_s: float
    max_abs_diff: float
    mean_kl: float
    top1_agree: int
    top1_total: int
    greedy_match: int
    greedy_prompts: int
    judged: bool
    passed: bool
    task_em_onnx: float
    note: str


def measure_row(mode, weights, model, tokenizer, adapter_dir, base_dir, rows, setup, work, params):
    from edgepeft.export.api import export
    from edgepeft.export.verify import check_graph

    out = work / f"{mode}-{weights}"
    export(
        base_dir, out, adapters={ADAPTER: adapter_dir}, weights=weights, mode=mode,
        quant="nf4", verify=False, quiet=True, overwrite=True,
    )  # fmt: skip
    folder = out / ADAPTER if mode == "merged" else out
    adapter_file = out / "adapters" / f"{ADAPTER}.onnx_adapter" if mode == "separate" else None
    prompts = prompt_ids(tokenizer, rows[: setup.check_prompts])
    # Against the training-time model: the NF4 base with the LoRA active, in PyTorch.
    check = check_graph(
        folder, model, name=ADAPTER, prompts=prompts, max_new_tokens=6, adapter_file=adapter_file
    )
    graph = Graph(folder, adapter_file)
    data = folder / f"{graph.manifest.model_file}.data"
    data_bytes = data.stat().st_size
    speed = graph.decode_speed(prompts[0], setup.decode_tokens, setup.decode_runs)
    return Row(
        mode=mode,
        weights=weights,
        bytes_per_param=data_bytes / params,
        data_bytes=data_bytes,
        adapter_bytes=None if adapter_file is None else adapter_file.stat().st_size,
        decode_tok_s=speed,
        max_abs_diff=check.max_abs_diff,
        mean_kl=check.mean_kl,
        top1_agree=check.top1_agree,
        top1_total=check.top1_total,
        greedy_match=check.greedy_match,
        greedy_prompts=check.greedy_prompts,
        judged=check.exact,  # held to the exact (relative |Δlogit|) criteria
        passed=check.passed,
        task_em_onnx=task_exact_match(graph, tokenizer, rows, 6),
        note=NOTES[(mode, weights)],
    )


# ---------------------------------------------------------------- report


def markdown(rows: list[Row], info: dict, quick: bool) -> str:
    lines = [
        "## Train/deploy parity: does the device compute what was trained?",
        "",
        f"{'Smoke run (--quick): tiny model, few steps; numbers mean nothing. ' if quick else ''}"
        f"A {info['params'] / 1e6:.2f}M-parameter random Llama ({info['model']}), NF4 base, "
        f"LoRA r=8 on every linear layer trained {info['steps']} steps ({info['train_s']:.0f} s) "
        f"on the built-in `reverse` task (edgepeft.tasks, {info['train_rows']} train rows); "
        f"exact match on {info['test_rows']} held-out words: **PyTorch training-time model "
        f"(bitsandbytes NF4 + LoRA) {info['torch_em']:.3f}**. Each row exports that adapter; "
        f"Δlogit, top-1 and greedy compare the ONNX graph with the training-time model "
        f"(verify's check_graph, {info['check_prompts']} task prompts, 6 tokens each, "
        "teacher-forced). Decode: batch 1, plain `session.run` loop, "
        f"{THREADS} threads, {info['decode_tokens']} tokens, median of {info['decode_runs']}.",
        "",
        "| mode | weights | bytes/param | decode tok/s | max \\|Δlogit\\| vs bnb | mean KL | "
        "top-1 | greedy equal | task EM (ONNX) | task EM (PyTorch) | judged | what the graph holds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        judged = ("pass" if r.passed else "**FAIL**") if r.judged else "reported"
        lines.append(
            f"| {r.mode} | {r.weights} | {r.bytes_per_param:.3f} | {r.decode_tok_s:.0f} | "
            f"{r.max_abs_diff:.2e} | {r.mean_kl:.1e} | {r.top1_agree}/{r.top1_total} | "
            f"{r.greedy_match}/{r.greedy_prompts} | {r.task_em_onnx:.3f} | "
            f"{info['torch_em']:.3f} | {judged} | {r.note} |"
        )
    lines += [
        "",
        "bytes/param: model.onnx.data over the base's parameter count (embeddings and lm_head "
        "included; fp32 = 4). Separate rows also ship the adapter file "
        + ", ".join(f"{r.adapter_bytes / 1024:.0f} KiB ({r.weights})" for r in rows if r.adapter_bytes)
        + ". Judged: merged fp32 <= 1e-4 and separate nf4 <= 1e-3 with every top-1 equal "
        "(edgepeft.export.verify); the other rows round weights at export and are reported.",
    ]
    return "\n".join(lines)


def base_parameter_count(base_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return sum(p.numel() for p in model.parameters())


def run(setup: Setup, work: Path, quick: bool) -> tuple[list[Row], dict]:
    import torch

    # 64-wide matmuls only wait on a thread pool: PyTorch trains and checks on one thread
    # (onnxruntime sessions get THREADS).
    torch.set_num_threads(1)
    model, tokenizer, adapter_dir, base_dir, test_rows, metrics, seconds = train_adapter(setup, work)
    params = base_parameter_count(base_dir)
    rows = []
    for mode, weights in ROWS:
        log(f"export {mode} {weights}, check, decode, task EM")
        rows.append(
            measure_row(
                mode, weights, model, tokenizer, adapter_dir, base_dir, test_rows, setup, work, params
            )
        )
    info = {
        "model": ", ".join(["edgepeft.tiny llama", *(f"{k}={v}" for k, v in setup.model.items())]),
        "params": params,
        "steps": setup.steps,
        "train_s": seconds,
        "train_rows": setup.train_rows,
        "test_rows": setup.test_rows,
        "check_prompts": setup.check_prompts,
        "decode_tokens": setup.decode_tokens,
        "decode_runs": setup.decode_runs,
        "torch_em": metrics["exact_match"],
        "quick": quick,
    }
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    parser.add_argument("--output", type=Path, help="write the markdown here instead of BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the models and graphs here")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_parity."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows, info = run(QUICK if args.quick else FULL, work, args.quick)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, info, args.quick)
    if args.json:
        from edgepeft.atomic import write_json

        write_json(args.json, {"info": info, "rows": [asdict(r) for r in rows]})
    from benchmarks_md import publish

    log(f"wrote {publish('parity', text, args.output)}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
