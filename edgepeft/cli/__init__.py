"""The `edgepeft` command line: one subcommand per task, user errors as one line and exit 2.

    edgepeft COMMAND ...
        COMMANDS          inspect, merge (cli/model.py) · eval (cli/eval.py)
                          · export, verify (cli/export.py) · train (cli/train.py)
        COMMAND_MODULES   run, chat (edgepeft.runtime.cli) · plan (edgepeft.plan)
                          · demo (edgepeft.demo.cli) · bench (edgepeft.bench_cli)
                          · serve (edgepeft.serve.cli; FastAPI loads when it runs)
    main ──parse──► args.run(args) ──► exit code
        UserError, OSError, ValueError, KeyError ──► "edgepeft CMD: error: ..." (exit 2)
        a module of the [train] extra missing ──► "pip install 'edgepeft[train]'" (exit 2)
        Ctrl-C, SIGTERM ──► staged outputs removed, one line, 128 + the signal

Heavy imports (torch, transformers) happen inside the commands, so `--help` is fast and
the device commands (run, chat, plan, eval of an export) never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from edgepeft import __version__
from edgepeft.cli import eval as evaluation
from edgepeft.cli import export, model, train
from edgepeft.cli.common import DTYPE_CHOICES, QUANT_CHOICES, UserError
from edgepeft.cli.model import REPORT_FILE

AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
Run = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[AddParser, Run]] = {
    "inspect": (model.add_inspect_parser, model.run_inspect),
    "merge": (model.add_merge_parser, model.run_merge),
    "eval": (evaluation.add_parser, evaluation.run),
    "export": (export.add_export_parser, export.run_export),
    "verify": (export.add_verify_parser, export.run_verify),
    "train": (train.add_parser, train.run),
}
"""The commands of this package: name -> (adds its subparser, runs it)."""

COMMAND_MODULES: tuple[str, ...] = (
    "edgepeft.runtime.cli", "edgepeft.plan", "edgepeft.demo.cli", "edgepeft.bench_cli",
    "edgepeft.serve.cli",
)  # fmt: skip
"""Commands that live beside the code they drive: each module has `add_parser(commands)`,
which adds its subparser(s) with `set_defaults(run=...)`; importing it must stay light."""

TRAIN_MODULES = ("torch", "transformers", "bitsandbytes", "onnx", "matplotlib", "yaml", "tqdm")
"""What `pip install 'edgepeft[train]'` adds; the bare install (plan, run, chat, eval of an
export) needs none of it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepeft", description="Adapt LLMs for constrained hardware."
    )
    parser.add_argument("--version", action="version", version=f"edgepeft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_parser, run) in COMMANDS.items():
        command = add_parser(commands)
        if commands.choices.get(name) is not command:
            raise RuntimeError(f"COMMANDS[{name!r}] added a command of another name")
        command.set_defaults(run=run)
    for module in COMMAND_MODULES:
        # lazy: these modules load when a command line is parsed, not when edgepeft.cli is
        # imported; each keeps its own heavy imports inside its commands
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
    parser = build_parser()
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


__all__ = [
    "COMMANDS",
    "COMMAND_MODULES",
    "DTYPE_CHOICES",
    "QUANT_CHOICES",
    "REPORT_FILE",
    "TRAIN_MODULES",
    "Terminated",
    "UserError",
    "build_parser",
    "main",
]
