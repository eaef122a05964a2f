"""`edgepeft train CONFIG [--resume] [--quiet] [KEY=VALUE ...]`: one run from one file.

    CONFIG (.toml/.yaml/.json) + overrides ──► load_base ──► add_adapter ──► memory plan
        ──► train (progress; data-parallel under torchrun) ──► evaluate ──► output_dir/
"""

from __future__ import annotations

import argparse

from edgepeft.cli.common import UserError

FLAGS = {"--resume": "resume", "--quiet": "quiet"}
"""Options that may also follow the overrides (argparse.REMAINDER takes those as overrides)."""
INTERRUPTED = 130
"""128 + SIGINT, as shells report it: the run stopped at a checkpoint."""


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
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
    # REMAINDER, so flags may also follow the overrides; `run` takes them out.
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="override")
    return parser


def run(args: argparse.Namespace) -> int:
    # lazy: training imports torch; `edgepeft --help` and the device commands stay free of it
    from edgepeft.train.memory import MemoryPlanError
    from edgepeft.train.run import run as run_config
    from edgepeft.train.run_config import load_run_config

    overrides = []
    for item in args.overrides:
        if item in FLAGS:
            setattr(args, FLAGS[item], True)
        elif item.startswith("-"):
            raise UserError(f"unknown option {item!r} for `edgepeft train` (options: --resume, --quiet)")
        else:
            overrides.append(item)
    if args.quiet:
        overrides.append("train.quiet=true")
    config = load_run_config(args.config, overrides)
    try:
        outcome = run_config(config, resume=args.resume)
    except MemoryPlanError as e:
        raise UserError(str(e).splitlines()[0]) from e
    return INTERRUPTED if outcome.result.interrupted else 0
