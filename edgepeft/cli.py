"""The `edgepeft` command line: one subcommand per task, user errors as one line and exit 2.

    edgepeft inspect MODEL
    edgepeft merge --base MODEL --adapter DIR --out DIR [--quant Q] [--base-quant Q] [--dtype D]

        adapter metadata ──► base quant ──► load_base ──► load_adapter (fingerprint checked)
            ──► merge inplace, layer by layer ──► .<out>.XXXX/ (safetensors, config,
            tokenizer, merge_report.json) ──rename──► <out>/

Heavy imports (torch, transformers) happen inside the subcommands, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from edgepeft import __version__
from edgepeft.atomic import staging_folder

QUANT_CHOICES = ("none", "nf4", "fp4", "int8")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
REPORT_FILE = "merge_report.json"
TRAIN_MODULES = ("torch", "transformers", "bitsandbytes", "onnx", "matplotlib", "yaml", "tqdm")
"""What `pip install 'edgepeft[train]'` adds; the bare install (plan, run, chat, eval of an
export) needs none of it."""


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# ---------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    try:
        from edgepeft.inspect_model import inspect_model
    except ImportError as e:
        raise UserError(f"`edgepeft inspect` is not available in this install ({e})") from e
    print(inspect_model(args.model))
    return 0


# ---------------------------------------------------------------- merge


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).exists()


def _bnb_config(model, quant: str):
    """The quantization_config transformers needs to reload the bitsandbytes layers."""
    import torch
    from transformers import BitsAndBytesConfig

    from edgepeft.base import is_linear_like, is_quantized

    info = model.edgepeft_base
    full_precision = [
        n for n, m in model.named_modules() if is_linear_like(m) and not is_quantized(m)
    ]
    if quant == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=full_precision
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=info.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, info.compute_dtype),
        llm_int8_skip_modules=full_precision,
    )


def _write_atomically(out: Path, write) -> None:
    """Run write(staging_dir), then rename the staging folder to `out`; no partial output."""
    with staging_folder(out) as staging:  # removed on failure and on SIGTERM / SIGINT
        write(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from edgepeft.adapters.peft_format import load_adapter, read_adapter
    from edgepeft.base import load_base
    from edgepeft.merge import merge

    adapter_dir, out = Path(args.adapter), Path(args.out)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist")
    if _looks_like_path(args.base) and not Path(args.base).expanduser().is_dir():
        raise UserError(f"base model folder {args.base} does not exist")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")

    _, _, metadata = read_adapter(adapter_dir)
    base_quant = args.base_quant or metadata.get("edgepeft_base_quant")
    if base_quant is None:
        base_quant = "none"
        print(
            f"note: {adapter_dir} records no base quantization (written by HF peft?); loading the "
            "base unquantized. Pass --base-quant if the adapter was trained over a quantized base.",
            file=sys.stderr,
        )
    name = metadata.get("edgepeft_adapter_name") or "default"
    dtype = getattr(torch, args.dtype)

    model, tokenizer = load_base(
        Path(args.base).expanduser() if _looks_like_path(args.base) else args.base,
        quant=base_quant,
        compute_dtype=dtype,
    )
    load_adapter(model, adapter_dir, name=name)
    model, report = merge(model, name, quant=args.quant, inplace=True, keep_original=False)
    if args.quant != "none":
        # transformers 5 saves and reloads bitsandbytes layers given this config.
        model.config.quantization_config = _bnb_config(model, args.quant)

    document = {
        **report.to_dict(),
        "base": str(args.base),
        "base_quant": base_quant,
        "adapter_dir": str(adapter_dir),
        "dtype": args.dtype,
        "saved_as": "full precision" if args.quant == "none" else f"bitsandbytes {args.quant}",
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(json.dumps(document, indent=2) + "\n")

    _write_atomically(out, write)
    print(report)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- eval


def _add_eval_parser(sub) -> None:
    """`edgepeft eval MODEL --adapter [NAME=]DIR ... --data TEST.jsonl`: score base and adapters.

        adapter metadata ──► base quant ──► load_base(MODEL) ──► load_adapter per --adapter
            ──► evaluate (greedy) ──► table on stdout, --out report.json (atomic)
        MODEL an export folder (edgepeft.json) ──► edgepeft.runtime.cli.eval_export: the
            same table through the device engine; --adapter NAME picks its loaded adapters
    """
    parser = sub.add_parser(
        "eval",
        help="score the base and each adapter on a test set (EM, token F1, ROUGE-L)",
        description="Generate greedily for every prompt of a test set with the base and with each "
        "adapter, and print exact match, token F1 and ROUGE-L per model. MODEL is a local HF "
        "model folder (config.json, weights, tokenizer), or a folder `edgepeft export` wrote: "
        "then the device runtime generates, and --adapter NAME picks the export's adapters "
        "(default: all of them).",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="HF model folder the adapters were trained on, or an export folder (EXPORT_DIR)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder, named NAME in the table (default: the folder's name); repeatable. "
        "For an EXPORT_DIR: an adapter name of the export, or an adapter file",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="TEST.jsonl",
        help='JSONL rows of {"prompt", "completion"} or {"messages"} (last: the assistant answer)',
    )
    parser.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="base quantization (default: the one the adapters record; else none)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="default: 8")
    parser.add_argument("--out", metavar="report.json", help="also write the full report as JSON")
    parser.add_argument("--no-base", action="store_true", help="skip the base-alone row")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_eval)


def _eval_adapters(values: list[str], include_base: bool) -> dict[str, Path]:
    """name -> folder for every --adapter value ("NAME=DIR", or "DIR" named after its folder)."""
    adapters: dict[str, Path] = {}
    for value in values:
        if "=" in value and not Path(value).expanduser().is_dir():
            name, folder = value.split("=", 1)
            folder = Path(folder).expanduser()
        else:
            folder = Path(value).expanduser()
            name = folder.resolve().name
        if not folder.is_dir():
            raise UserError(f"adapter folder {folder} does not exist")
        if not name or "." in name:
            raise UserError(
                f"adapter name {name!r} (for {folder}) must be non-empty and contain no '.'; "
                "name it with --adapter NAME=DIR"
            )
        if name in adapters:
            raise UserError(
                f"two adapters are named {name!r} ({adapters[name]} and {folder}); "
                "name them apart with --adapter NAME=DIR"
            )
        if include_base and name == "base":
            raise UserError(
                f"adapter {folder} would be named 'base', the base model's row; "
                "name it with --adapter NAME=DIR, or pass --no-base"
            )
        adapters[name] = folder
    return adapters


def _run_eval(args: argparse.Namespace) -> int:
    from edgepeft.runtime.cli import eval_export, is_export_folder

    if is_export_folder(args.model):  # before the torch imports: a device may have no torch
        return eval_export(args)
    from edgepeft.adapters.peft_format import load_adapter, read_adapter
    from edgepeft.base import load_base
    from edgepeft.train.evaluate import evaluate, read_examples

    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        found = "is not a folder" if not model_dir.is_dir() else "holds no config.json"
        raise UserError(
            f"MODEL {args.model} {found}; `edgepeft eval` takes a local HF model folder "
            "(config.json, weights, tokenizer): the base the adapters were trained on"
        )
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data} is not a file (expected a JSONL test set)")
    read_examples(args.data)  # bad rows fail here, before minutes of model loading
    adapters = _eval_adapters(args.adapter, include_base=not args.no_base)
    if not adapters and args.no_base:
        raise UserError("nothing to evaluate: --no-base and no --adapter")

    quant = args.quant
    if quant is None:
        recorded = {
            name: read_adapter(folder)[2].get("edgepeft_base_quant") for name, folder in adapters.items()
        }
        quants = {q for q in recorded.values() if q is not None}
        if len(quants) > 1:
            listed = ", ".join(f"{name}: {q or 'unrecorded'}" for name, q in recorded.items())
            raise UserError(
                f"the adapters were trained over differently quantized bases ({listed}); "
                "evaluate them in separate runs, or pass --quant"
            )
        quant = next(iter(quants), "none")
        if adapters and not quants:
            print(
                "note: the adapters record no base quantization (written by HF peft?); loading the "
                "base unquantized. Pass --quant if they were trained over a quantized base.",
                file=sys.stderr,
            )

    model, tokenizer = load_base(model_dir, quant=quant)
    if tokenizer is None:
        raise UserError(f"{model_dir} holds no tokenizer; `edgepeft eval` needs one to read prompts")
    for name, folder in adapters.items():
        load_adapter(model, folder, name=name)
    report = evaluate(
        model,
        tokenizer,
        args.data,
        adapters=list(adapters),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        include_base=not args.no_base,
        progress=not args.quiet,
    )
    print(report)
    if args.out:
        extra = {
            "model": str(model_dir),
            "base_quant": quant,
            "adapter_dirs": {name: str(folder) for name, folder in adapters.items()},
        }
        report.save(args.out, extra=extra)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- export


def _add_export_parser(sub) -> None:
    """`edgepeft export --base MODEL [--adapter NAME=DIR ...] --out DIR`: onnxruntime graphs.

        --recipe TOML (weights, block_size, accuracy_level, mode, max_context) < explicit flags
            ──► edgepeft.export.export ──► <out>/ (model.onnx + .data, tokenizer,
            edgepeft.json, genai_config.json, verify.json; one folder per adapter in merged mode)
    """
    parser = sub.add_parser(
        "export",
        help="export a base and its adapters as ONNX graphs for onnxruntime",
        description="Export a base model, alone or with adapters merged in (one graph per "
        "adapter), as onnxruntime decoder graphs with a KV cache, then check them against "
        "PyTorch. Explicit flags override the --recipe file.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="adapter folder, exported as NAME (default: the folder's name); repeatable",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--weights",
        choices=("int4", "int8", "nf4", "fp4", "fp16", "fp32"),
        help="default: int4; nf4/fp4: the base's own bitsandbytes codes (MatMulBnb4)",
    )
    parser.add_argument("--mode", choices=("merged", "separate"), help="default: merged")
    parser.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="how to load the base (default: what the adapters record; else none)",
    )
    parser.add_argument("--block-size", type=int, metavar="N", help="int4/int8 block (default 32)")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        metavar="N",
        help="MatMulNBits compute type, 0-4 (default 4: int8 activations)",
    )
    parser.add_argument(
        "--int4-method",
        choices=("search", "rtn"),
        help="int4 rounding (default search: fitted scales, uint8 zero points; "
        "rtn: symmetric round-to-nearest, the old format)",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int4: store tied embedding/lm_head, v_proj and some down_proj in int8 (default on)",
    )
    parser.add_argument("--max-context", type=int, metavar="N", help="default: the model's limit")
    parser.add_argument(
        "--recipe", metavar="NAME|TOML", help="a shipped recipe (cpu-int4, ...) or a .toml file"
    )
    parser.add_argument(
        "--graph",
        choices=("auto", "fused", "generic"),
        default="auto",
        help="graph builder (default auto: fused where the architecture has one)",
    )
    parser.add_argument(
        "--lora-everywhere",
        action="store_true",
        help="separate mode: rank-0 LoRA inputs on every linear layer (not lm_head), so a LoRA "
        "trained later over this base (same --quant) is added without a new base graph "
        "(edgepeft.export.separate.export_adapter); needs no --adapter",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from edgepeft.export.api import export

    adapters: dict[str, str] = {}
    for value in args.adapter:
        name, sep, folder = value.partition("=")
        if not sep or Path(value).expanduser().is_dir():
            name, folder = Path(value).expanduser().resolve().name, value
        if name in adapters:
            raise UserError(f"adapter name {name!r} given twice; name them with --adapter NAME=DIR")
        adapters[name] = folder
    if _looks_like_path(args.base) and not Path(args.base).expanduser().is_dir():
        raise UserError(f"base model folder {args.base} does not exist")
    result = export(
        args.base,
        args.out,
        adapters or None,
        weights=args.weights,
        mode=args.mode,
        quant=args.quant,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        int4_method=args.int4_method,
        mixed_precision=args.mixed_precision,
        max_context=args.max_context,
        recipe=args.recipe,
        verify=not args.no_verify,
        graph=args.graph,
        overwrite=args.overwrite,
        quiet=args.quiet,
        lora_everywhere=args.lora_everywhere,
    )
    print(result)
    return 0


# ---------------------------------------------------------------- verify


def _add_verify_parser(sub) -> None:
    """`edgepeft verify EXPORT_DIR`: the export against PyTorch; exit 1 if any check fails
    (every weight format is judged, see verify.CRITERIA)."""
    parser = sub.add_parser(
        "verify",
        help="check an exported folder against PyTorch (logits, greedy tokens)",
        description="Reload the export's base (and merged adapters) in PyTorch, run fixed prompts "
        "through both, print max |logit diff|, KL, top-1 and greedy agreement, and write "
        "verify.json and verify.md. Exit code 1 when a check fails (every weight format is "
        "judged; the report prints the criteria).",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by edgepeft export")
    parser.add_argument("--max-new-tokens", type=int, default=8, metavar="N", help="default: 8")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="prompt to compare on (repeatable; default: drawn from the vocabulary, seed 0)",
    )
    parser.add_argument("--text", metavar="FILE", help="text file whose perplexity both sides report")
    parser.add_argument(
        "--files",
        action="store_true",
        help="only check every file's size and sha256 against the manifest (no PyTorch, no "
        "base needed); exit 1 naming the first file that differs",
    )
    parser.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from edgepeft.export.verify import verify

    if not Path(args.export_dir).is_dir():
        raise UserError(f"export folder {args.export_dir} does not exist")
    if args.files:
        return _verify_files(args.export_dir)
    if args.text is not None and not Path(args.text).is_file():
        raise UserError(f"--text {args.text} is not a file")
    report = verify(
        args.export_dir,
        max_new_tokens=args.max_new_tokens,
        prompts=args.prompt,
        text=Path(args.text).read_text() if args.text else None,
    )
    print(report)
    return 0 if report.passed else 1


def _verify_files(export_dir: str) -> int:
    """`edgepeft verify EXPORT_DIR --files`: every recorded file's size and sha256."""
    from edgepeft.export.files import FileIntegrityError, check_export

    try:
        checked = check_export(export_dir, hashes=True)
    except FileIntegrityError as e:
        print(f"verify --files: FAILED: {e}", file=sys.stderr)
        return 1
    if checked == 0:
        raise UserError(
            f"{export_dir} records no file sizes or hashes (exported by an older edgepeft); "
            "re-export it to check its files"
        )
    print(f"verify --files: {checked} file(s) of {export_dir} match their size and sha256")
    return 0


# ---------------------------------------------------------------- train


def _add_train_parser(sub) -> None:
    """`edgepeft train CONFIG [--resume] [--quiet] [KEY=VALUE ...]`: one run from one file.

        CONFIG (.toml/.yaml/.json) + overrides ──► load_base ──► add_adapter ──► memory plan
            ──► train (progress; data-parallel under torchrun) ──► evaluate ──► output_dir/
    """
    parser = sub.add_parser(
        "train",
        help="train an adapter as a config file says (data-parallel under torchrun)",
        description="Train one adapter over a frozen (quantized) base as CONFIG says: model, "
        "quant, adapter, method, data, train, output_dir, max_memory, eval (see "
        "edgepeft/train/run_config.py and examples/). KEY=VALUE arguments override the file "
        "with dotted keys (train.lr=1e-4 method.r=16); values are TOML (strings may be bare). "
        "Under `torchrun --nproc_per_node N` each process trains on its share of every batch.",
    )
    parser.add_argument("config", metavar="CONFIG", help="run config: .toml, .yaml or .json")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress, no summary")
    # REMAINDER, so flags may also follow the overrides; _run_train takes them out.
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="override")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from edgepeft.train.memory import MemoryPlanError
    from edgepeft.train.run_config import load_run_config, run

    flags = {"--resume": "resume", "--quiet": "quiet"}
    overrides = []
    for item in args.overrides:
        if item in flags:
            setattr(args, flags[item], True)
        elif item.startswith("-"):
            raise UserError(f"unknown option {item!r} for `edgepeft train` (options: --resume, --quiet)")
        else:
            overrides.append(item)
    if args.quiet:
        overrides.append("train.quiet=true")
    config = load_run_config(args.config, overrides)
    try:
        outcome = run(config, resume=args.resume)
    except MemoryPlanError as e:
        raise UserError(str(e).splitlines()[0]) from e
    return 130 if outcome.result.interrupted else 0  # 128 + SIGINT, as shells report it


# ---------------------------------------------------------------- entry point


# Commands that live beside the code they drive: each module has `add_parser(commands)`,
# which adds its subparser(s) with `set_defaults(run=...)`; importing it must stay light.
_COMMAND_MODULES: tuple[str, ...] = ("edgepeft.runtime.cli", "edgepeft.plan", "edgepeft.demo.cli", "edgepeft.bench_cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepeft", description="Adapt LLMs for constrained hardware."
    )
    parser.add_argument("--version", action="version", version=f"edgepeft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a model folder and what it can run")
    inspect.add_argument("model", metavar="MODEL", help="HF model folder")
    inspect.set_defaults(run=_inspect)

    merge = commands.add_parser(
        "merge",
        help="fold an adapter into its base and write a standard HF model folder",
        description="Fold an adapter into its base and write a standard HF model folder "
        f"(safetensors, config, tokenizer, {REPORT_FILE}).",
    )
    merge.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    merge.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter folder (edgepeft or HF peft)"
    )
    merge.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    merge.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="none",
        help="storage of the merged linear layers (default: none = full precision)",
    )
    merge.add_argument(
        "--base-quant",
        choices=QUANT_CHOICES,
        default=None,
        help="quantization the adapter was trained over (default: read from the adapter; "
        "'none' for HF peft folders)",
    )
    merge.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype (default: float32)"
    )
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.set_defaults(run=_merge)
    _add_eval_parser(commands)
    _add_export_parser(commands)
    _add_verify_parser(commands)
    _add_train_parser(commands)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_parser(commands)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised so that `finally` blocks (staged outputs) run; like KeyboardInterrupt."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated


def _interrupted(args: argparse.Namespace, signum: int) -> int:
    """One line for an interrupted command; 128 + the signal, as shells report it."""
    out = getattr(args, "out", None)
    untouched = f", {out} was not written" if out and not Path(out).exists() else ""
    name = signal.Signals(signum).name
    print(
        f"edgepeft {args.command}: interrupted ({name}); unfinished files were removed{untouched}",
        file=sys.stderr,
    )
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C (staged outputs are removed on the way); signal() works
    # only in the main thread, and a handler someone else set stays.
    terminate = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if terminate:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.run(args)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in TRAIN_MODULES:
            raise
        print(
            f"edgepeft {args.command}: error: this command needs {missing}, which this install "
            "lacks; pip install 'edgepeft[train]'",
            file=sys.stderr,
        )
        return 2
    except (UserError, OSError, ValueError, KeyError) as e:
        # KeyError's str() is the repr of its argument; print the message itself.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"edgepeft {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args, signal.SIGINT)
    except Terminated:
        return _interrupted(args, signal.SIGTERM)
    finally:
        if terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
