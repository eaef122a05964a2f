"""`edgepeft eval MODEL --adapter [NAME=]DIR ... --data TEST.jsonl`: score base and adapters.

    adapter metadata ──► base quant ──► load_base(MODEL) ──► load_adapter per --adapter
        ──► evaluate (greedy) ──► table on stdout, --out report.json (atomic)
    MODEL an export folder (edgepeft.json) ──► edgepeft.runtime.cli.eval_export: the
        same table through the device engine; --adapter NAME picks its loaded adapters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepeft.cli.common import QUANT_CHOICES, UserError, parse_named_folders

BASE_ROW = "base"
"""The name of the base model's row in the table."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
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
    return parser


def eval_adapters(values: list[str], include_base: bool) -> dict[str, Path]:
    """name -> folder for every --adapter value ("NAME=DIR", or "DIR" named after its folder)."""

    def check(name: str, folder: Path) -> None:
        if not folder.is_dir():
            raise UserError(f"adapter folder {folder} does not exist")
        if not name or "." in name:
            raise UserError(
                f"adapter name {name!r} (for {folder}) must be non-empty and contain no '.'; "
                "name it with --adapter NAME=DIR"
            )
        if include_base and name == BASE_ROW:
            raise UserError(
                f"adapter {folder} would be named 'base', the base model's row; "
                "name it with --adapter NAME=DIR, or pass --no-base"
            )

    named = parse_named_folders(
        values,
        duplicate="two adapters are named {name!r} ({first} and {second}); "
        "name them apart with --adapter NAME=DIR",
        check=check,
    )
    return {name: Path(folder).expanduser() for name, folder in named.items()}


def run(args: argparse.Namespace) -> int:
    # lazy: the device runtime's side needs no torch (a device may have none), so the
    # export check comes before any torch import
    from edgepeft.runtime.cli import eval_export, is_export_folder

    if is_export_folder(args.model):
        return eval_export(args)
    # lazy: torch and transformers, only for a PyTorch evaluation
    from edgepeft.adapters.peft_format import load_adapter, read_adapter
    from edgepeft.base import load_base
    from edgepeft.evaluation.report import print_report
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
    adapters = eval_adapters(args.adapter, include_base=not args.no_base)
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
    extra = {
        "model": str(model_dir),
        "base_quant": quant,
        "adapter_dirs": {name: str(folder) for name, folder in adapters.items()},
    }
    print_report(report, args.out, extra)
    return 0
