"""`edgepeft demo [--out DIR] [--quick]`: the whole idea in a few CPU minutes, offline.

    parse ─► check the output folder ─► edgepeft.demo.pipeline.run_demo ─► printed table
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from edgepeft.vocab import QUANTS

QUICK_STEPS = 40
_OWNED = ("data", "runs", "export", "demo_report.json")
"""What the demo writes in its folder; --overwrite removes only these."""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="train two adapters on a shipped base, export int4, switch them per request",
        description="Offline, on a CPU: load the demo base shipped in the package (a 0.5M-parameter "
        "Llama pre-trained on text and instructed string operations), train a LoRA (reverse a "
        "word: a new skill) and a prompt-tuning adapter (upper-case a word with no instruction "
        "word), export the base once in int4 with both as separate files, verify it, and answer "
        "the same prompts on the device runtime with no adapter and with each.",
    )
    parser.add_argument("--out", default="edgepeft-demo", metavar="DIR", help="default: ./edgepeft-demo")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps per adapter")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: {QUICK_STEPS} steps per adapter, small data (accuracy stays low)",
    )  # fmt: skip
    parser.add_argument("--quant", choices=QUANTS, default="nf4",
                        help="how the frozen base is held while training (default nf4)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    # lazy: the pipeline imports torch; `edgepeft --help` and the device commands stay free of it
    from edgepeft.demo.pipeline import DemoOptions, format_result, run_demo

    out = Path(args.out).expanduser()
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"{out} is not empty; pass --overwrite to replace an earlier demo there, "
                             "or choose another --out")  # fmt: skip
        for name in _OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    options = DemoOptions(out_dir=out, steps=args.steps, quant=args.quant)
    if args.quick:
        options = DemoOptions(out_dir=out, steps=args.steps or QUICK_STEPS, n_train=256, n_test=16,
                              examples=3, quant=args.quant)  # fmt: skip
    print(format_result(run_demo(options)))
    return 0
