"""`edgepeft plan --model MODEL --device PROFILE [...]`: its parser and what it runs.

edgepeft.cli calls `add_parser(commands)` for every command line, so this module imports
only the torch-free planner; --train reaches torch through plan_training when it runs.
"""

from __future__ import annotations

import argparse
import json

from edgepeft.plan.budget import DEFAULT_PREFILL
from edgepeft.plan.planner import plan
from edgepeft.plan.rank import fit_rank
from edgepeft.plan.shape import model_shape
from edgepeft.plan.text import render_training
from edgepeft.plan.training import plan_training
from edgepeft.plan.weights import FORMATS
from edgepeft.vocab import QUANTS


def add_parser(commands) -> None:
    """`edgepeft plan --model MODEL --device PROFILE [...]`: will it fit, how fast."""
    parser = commands.add_parser(
        "plan",
        help="memory and decode speed of a model on a device profile; the recipe to use",
        description="Plan a model (a folder or just its config.json: no weights needed) on a "
        "device profile (a shipped or user profile's name, 'local' for this machine, or a "
        ".toml path): memory per weight format as the exporter stores it, KV cache, activations, adapters, "
        "runtime; predicted decode tok/s; whether it fits and the export recipe to use. "
        "--train plans a training run instead.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL", help="model folder or config.json")
    parser.add_argument("--device", required=True, metavar="PROFILE", help="profile name or .toml path")
    parser.add_argument("--context", type=int, metavar="L", help="tokens per sequence (default 2048)")
    parser.add_argument("--adapters", type=int, default=0, metavar="N", help="LoRA adapters loaded")
    parser.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    parser.add_argument("--weights", choices=FORMATS, help="plan one weight format only")
    parser.add_argument("--block-size", type=int, default=32, metavar="N", help="int4/int8 block")
    parser.add_argument(
        "--prefill", type=int, default=DEFAULT_PREFILL, metavar="N",
        help=f"prompt tokens per forward (default {DEFAULT_PREFILL})",
    )  # fmt: skip
    parser.add_argument(
        "--adapter", metavar="DIR",
        help="a LoRA folder (DyLoRA: nested ranks): the largest of its ranks that fits, with "
        "--adapters N copies loaded (default 1)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    train = parser.add_argument_group("training (--train)")
    train.add_argument("--train", action="store_true", help="plan training on the device instead")
    train.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    train.add_argument("--quant", default="nf4", choices=QUANTS)
    train.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "adamw8bit", "paged_adamw8bit")
    )
    train.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the plan (or with --train the training plan) of `args`; 0 on success."""
    if args.train:
        shape = model_shape(args.model)
        seq_len = args.context or min(512, shape.max_positions or 512)
        result = plan_training(
            args.model, args.device, seq_len=seq_len, batch_size=args.batch, rank=args.rank,
            quant=args.quant, optimizer=args.optimizer, checkpointing=args.checkpointing,
        )  # fmt: skip
        print(json.dumps(result, indent=2) if args.json else render_training(result, args.model))
        return 0
    if args.adapter is not None:
        fit = fit_rank(
            args.model, args.device, args.adapter, adapters=max(args.adapters, 1),
            context=args.context, prefill=args.prefill, weights=args.weights,
            block_size=args.block_size,
        )  # fmt: skip
        print(json.dumps(fit.to_dict(), indent=2) if args.json else fit)
        return 0
    result = plan(
        args.model,
        args.device,
        context=args.context,
        prefill=args.prefill,
        adapters=args.adapters,
        rank=args.rank,
        weights=args.weights,
        block_size=args.block_size,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


__all__ = ["add_parser", "run"]
