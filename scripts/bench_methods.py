"""Every adapter family, trained and deployed the same way: task quality and device parity.

    tiny random Llama (edgepeft.tiny, seeded) ──load_base(nf4)──► + one adapter per row
        ──edgepeft.train on the built-in "reverse" task (edgepeft.tasks, seed 0)──►
        training-time model (bitsandbytes NF4 base + the adapter, PyTorch)
            │ PyTorch EM / ROUGE-L: edgepeft.train.evaluate (greedy, stop at EOS)
            ▼ adapter folder
    export separate, weights "nf4" (the trained NF4 codes as MatMulBnb4 + the adapter file
        or KV prefix) ──verify──► max |Δlogit|, mean KL, top-1, verdict against PyTorch
        ──Engine.generate (the device runtime, adapter chosen per request)──► device EM
    mergeable families: also export merged fp32 ──verify──► the merged graph's verdict
        ─► BENCHMARKS.md section "methods" (scripts/benchmarks_md.py), or --output FILE

One row per family, each with its usual settings (learning rates differ: prompt-like
methods need larger ones). The base is random, not pre-trained: methods that leave the
network's weights as they are (prompt, P-tuning, prefix, IA3) cannot learn the letter
mapping here, and their exact match stays near the base's 0 (tests/test_train_quality.py
says why); their rows show that they train, save, export and run exactly on the device.

    python scripts/bench_methods.py                              ~5 min on 2 quiet cores
    python scripts/bench_methods.py --quick --output /tmp/m.md   smoke run (a minute)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NEW_TOKENS = 6
THREADS = 2


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[], object]
    """The adapter config (a factory: configs import edgepeft, which the parser must not)."""
    lr: float
    note: str


def methods() -> tuple[Method, ...]:
    import edgepeft as ep

    lora = dict(r=8, alpha=16, target_modules="all-linear")
    return (
        Method("lora", lambda: ep.LoraConfig(**lora), 5e-3, "LoRA r=8, all linear layers"),
        Method("dora", lambda: ep.LoraConfig(**lora, use_dora=True), 5e-3, "DoRA r=8, all linear"),
        Method(
            "dylora",
            lambda: ep.LoraConfig(**lora, dylora_min_rank=1),
            5e-3,
            "DyLoRA ranks 1-8 (nested), deployed at r=8",
        ),
        Method("ia3", lambda: ep.IA3Config(), 2e-2, "IA3, peft's default targets"),
        Method(
            "selective",
            lambda: ep.SelectiveConfig(patterns=(r"norm\.weight$",), mask="importance", budget=0.25),
            5e-3,
            "importance-masked (Fisher), 25% of the norm weights",
        ),
        Method(
            "bottleneck",
            lambda: ep.BottleneckConfig(style="pfeiffer", reduction_factor=4),
            5e-3,
            "sequential bottleneck (Pfeiffer), rf 4",
        ),
        Method(
            "parallel",
            lambda: ep.ParallelAdapterConfig(),
            5e-3,
            "parallel adapter (ParBn), rf 2, scaling 4",
        ),
        Method(
            "prompt",
            lambda: ep.PromptTuningConfig(num_virtual_tokens=8),
            3e-2,
            "prompt tuning, 8 virtual tokens",
        ),
        Method(
            "p_tuning",
            lambda: ep.PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=64),
            1e-2,
            "P-tuning, 8 tokens, MLP encoder (dropped at save)",
        ),
        Method(
            "prefix",
            lambda: ep.PrefixTuningConfig(num_virtual_tokens=8),
            3e-2,
            "prefix tuning, 8 positions",
        ),
        Method(
            "mam",
            lambda: ep.MAMConfig(num_virtual_tokens=8, prefix_bottleneck=64),
            5e-3,
            "MAM: prefix 8 (MLP 64) + parallel adapter rf 2",
        ),
        *_unipelt(ep),
    )


def _unipelt(ep) -> tuple[Method, ...]:
    config = getattr(ep, "UniPELTConfig", None)
    if config is None:
        return ()
    return (
        Method("unipelt", config, 5e-3, "UniPELT: gated LoRA r=8 + prefix 10 + bottleneck rf 16"),
    )


@dataclass(frozen=True)
class Setup:
    model: dict
    steps: int
    train_rows: int
    test_rows: int
    check_prompts: int


_MODEL = dict(max_position_embeddings=256)
FULL = Setup(model=_MODEL, steps=300, train_rows=512, test_rows=64, check_prompts=8)
QUICK = Setup(model=_MODEL, steps=4, train_rows=32, test_rows=4, check_prompts=2)


@dataclass(frozen=True)
class Row:
    method: str
    note: str
    device_mode: str
    """"separate" (the adapter switchable per request) or "merged" (no separate form)."""
    trainable: int
    train_s: float
    torch_em: float
    torch_rouge: float
    device_em: float
    device_equal: int
    """Test prompts whose device answer equals PyTorch's."""
    test_rows: int
    device_passed: bool
    device_diff: float
    device_kl: float
    top1: str
    adapter_kib: float
    merged_passed: bool | None
    merged_diff: float | None
    error: str = ""


def log(line: str) -> None:
    print(f"bench_methods: {line}", file=sys.stderr, flush=True)


def measure(method: Method, setup: Setup, base_dir: Path, work: Path, splits) -> Row:
    import torch

    import edgepeft as ep
    from edgepeft.runtime import Engine
    from edgepeft.train.evaluate import evaluate

    train_rows, test_rows = splits
    model, tokenizer = ep.load_base(base_dir, quant="nf4")
    torch.manual_seed(0)
    ep.add_adapter(model, method.config(), name=method.name)
    started = time.perf_counter()
    config = ep.TrainConfig(
        max_steps=setup.steps, lr=method.lr, batch_size=16, max_seq_len=32, val_fraction=0.0,
        warmup_steps=10, eval_every=None, save_every=None, quiet=True,
    )  # fmt: skip
    ep.train(model, tokenizer, train_rows, config, work / f"run-{method.name}", adapter=method.name)
    train_s = time.perf_counter() - started
    model.eval()
    trainable = sum(p.numel() for p in ep.adapter_parameters(model, method.name))
    adapter_dir = ep.save_adapter(model, work / f"adapter-{method.name}", name=method.name)
    report = evaluate(
        model, tokenizer, test_rows, adapters=[method.name], max_new_tokens=NEW_TOKENS,
        batch_size=16, include_base=False, progress=False,
    )  # fmt: skip
    torch_result = report[method.name]
    prompts = [r["prompt"] for r in test_rows[: setup.check_prompts]]

    spec = method_spec(method.name, model)
    # The device export: separate (switchable) where the method has a separate form, else
    # merged; both over the trained NF4 codes.
    mode = "separate" if spec.separate_file is not None else "merged"
    device_dir = work / f"{mode}-{method.name}"
    ep.export(
        base_dir, device_dir, adapters={method.name: adapter_dir}, weights="nf4", mode=mode,
        verify=False, quiet=True,
    )  # fmt: skip
    device_dir = only_graph(device_dir)
    checks = ep.verify(device_dir, prompts=prompts, max_new_tokens=NEW_TOKENS).graphs
    check = next(g for g in checks if g.name == method.name) if mode == "separate" else checks[0]
    adapter_bytes = sum(
        f.stat().st_size for f in (device_dir / "adapters").glob(f"{method.name}.*")
    )

    engine = Engine(device_dir, threads=THREADS)
    device_answers = device_predictions(
        engine, method.name if mode == "separate" else None, test_rows
    )
    from edgepeft.metrics import exact_match

    device_em = sum(
        exact_match(a, r["completion"]) for a, r in zip(device_answers, test_rows, strict=True)
    ) / len(test_rows)
    equal = sum(a == p for a, p in zip(device_answers, torch_result.predictions, strict=True))

    merged_passed = merged_diff = None
    if spec.mergeable:
        merged = only_graph(
            ep.export(
                base_dir,
                work / f"merged-fp32-{method.name}",
                adapters={method.name: adapter_dir},
                weights="fp32",
                mode="merged",
                verify=False,
                quiet=True,
            ).out_dir  # fmt: skip
        )
        graph = ep.verify(merged, prompts=prompts, max_new_tokens=NEW_TOKENS).graphs[0]
        merged_passed = graph.passed
        merged_diff = max(graph.prefill_max_abs_diff, graph.decode_max_abs_diff)
    return Row(
        method=method.name,
        note=method.note,
        device_mode=mode,
        trainable=trainable,
        train_s=train_s,
        torch_em=torch_result.metrics["exact_match"],
        torch_rouge=torch_result.metrics["rouge_l"],
        device_em=device_em,
        device_equal=equal,
        test_rows=len(test_rows),
        device_passed=check.passed,
        device_diff=max(check.prefill_max_abs_diff, check.decode_max_abs_diff),
        device_kl=check.mean_kl,
        top1=f"{check.top1_agree}/{check.top1_total}",
        adapter_kib=adapter_bytes / 1024,
        merged_passed=merged_passed,
        merged_diff=merged_diff,
    )


def method_spec(name: str, model):
    from edgepeft.adapters import METHODS
    from edgepeft.adapters.inject import list_adapters

    return METHODS[list_adapters(model)[name].peft_type]


def only_graph(folder: Path) -> Path:
    """A merged export of one adapter: the folder of its one graph (a set lists it)."""
    from edgepeft.artifacts.manifest import ExportIndex, read_manifest

    manifest = read_manifest(Path(folder))
    if isinstance(manifest, ExportIndex):
        (graph,) = manifest.graphs.values()
        return Path(folder) / graph
    return Path(folder)


def device_predictions(engine, adapter: str, rows: list[dict]) -> list[str]:
    """The device's greedy answers, prompts as edgepeft.train.evaluate builds them."""
    from edgepeft.train.data import bos_to_add

    tokenizer = engine_tokenizer(engine)
    bos = bos_to_add(tokenizer)
    answers = []
    for row in rows:
        ids = bos + list(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        result = engine.generate(
            ids, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True
        )
        answers.append(result.text.strip())
    return answers


def engine_tokenizer(engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine.export_dir)


def failed_row(method: Method, error: BaseException) -> Row:
    return Row(
        method.name, method.note, "-", 0, 0.0, 0.0, 0.0, 0.0, 0, 0, False, float("nan"), float("nan"),
        "-", 0.0, None, None, error=f"{type(error).__name__}: {error}",
    )  # fmt: skip


def run(setup: Setup, work: Path, only: set[str] | None) -> tuple[list[Row], dict]:
    import torch

    from edgepeft.tasks import make_splits
    from edgepeft.tiny import tiny_model, tiny_tokenizer

    torch.set_num_threads(1)  # 64-wide matmuls only wait on a thread pool
    base_dir = work / "base"
    tiny_model("llama", 0, **setup.model).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    splits = make_splits("reverse", (setup.train_rows, setup.test_rows), seed=0)
    rows = []
    for method in methods():
        if only and method.name not in only:
            continue
        log(f"{method.name}: train {setup.steps} steps, export, verify, device EM")
        try:
            rows.append(measure(method, setup, base_dir, work, splits))
        except Exception as error:  # a family that fails is a row that says so, not a lost run
            log(f"{method.name} failed: {type(error).__name__}: {error}")
            rows.append(failed_row(method, error))
    params = sum(p.numel() for p in tiny_model("llama", 0, **setup.model).parameters())
    return rows, {"params": params, "setup": asdict(setup)}


def _verdict(passed: bool | None, diff: float | None) -> str:
    if passed is None:
        return "—"
    return f"{'pass' if passed else 'FAIL'} ({diff:.1e})"


def markdown(rows: list[Row], info: dict, quick: bool) -> str:
    setup = info["setup"]
    lines = [
        "## Adapter families: task quality and device parity, one protocol",
        "",
        f"A {info['params'] / 1e6:.2f}M-parameter random Llama (edgepeft.tiny), NF4 base; each "
        f"family trains {setup['steps']} steps on the built-in `reverse` task "
        f"({setup['train_rows']} rows), is scored on {setup['test_rows']} held-out words "
        "(greedy, PyTorch), then exported over the trained NF4 codes (MatMulBnb4): in "
        "separate mode where the family switches per request, else merged; verify checks "
        "that graph against the training-time model "
        f"({setup['check_prompts']} prompts, {NEW_TOKENS} tokens). Device EM: the same test "
        "words through `edgepeft.runtime.Engine` with the adapter chosen per request."
        + (" **Smoke run (--quick): numbers mean nothing.**" if quick else ""),
        "",
        "| family | setting | trainable | train s | EM PyTorch | ROUGE-L | EM device | "
        "answers equal | device graph | verify (max \\|Δlogit\\|) | KL | top-1 | adapter file | "
        "merged fp32 verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.note} | failed: {r.error} |" + " |" * 10)
            continue
        adapter_file = f"{r.adapter_kib:.0f} KiB" if r.device_mode == "separate" else "— (merged)"
        lines.append(
            f"| {r.method} | {r.note} | {r.trainable:,} | {r.train_s:.0f} | {r.torch_em:.3f} | "
            f"{r.torch_rouge:.3f} | {r.device_em:.3f} | {r.device_equal}/{r.test_rows} | "
            f"{r.device_mode} nf4 | {_verdict(r.device_passed, r.device_diff)} | "
            f"{r.device_kl:.1e} | {r.top1} | {adapter_file} | "
            f"{_verdict(r.merged_passed, r.merged_diff)} |"
        )
    lines += [
        "",
        "Merged fp32: the families whose update folds into the weights (— where the math does "
        "not allow it: the branch is non-linear in its input or holds positions). The random "
        "base cannot learn the mapping without changing weights, so prompt-like rows stay near "
        "EM 0 (see tests/test_train_quality.py).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    parser.add_argument(
        "--output", type=Path, help="write the markdown here instead of BENCHMARKS.md"
    )
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the models and graphs here")
    parser.add_argument("--only", nargs="+", help="run only these families (names as in the table)")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_methods."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows, info = run(QUICK if args.quick else FULL, work, set(args.only or ()))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, info, args.quick)
    if args.json:
        from edgepeft.atomic import write_json

        write_json(args.json, {"info": info, "rows": [asdict(r) for r in rows]})
    from benchmarks_md import publish

    log(f"wrote {publish('methods', text, args.output)}")
    print(text)
    return 0 if all(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
