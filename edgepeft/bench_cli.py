"""`edgepeft bench`: run the repository's benchmarks (scripts/bench.py) and rewrite BENCHMARKS.md.

    edgepeft bench [--quick] [--only a,b] [--output F] [--json F] [--workdir D]
        ──► <repo>/scripts/bench.py in a fresh Python (same interpreter) ──► its exit code

The benchmark scripts live in the repository, not in the installed package: from a
wheel install there is no scripts/ folder, and the command says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import edgepeft

_FLAGS = ("quick", "only", "output", "json", "workdir", "timeout")


def bench_script() -> Path:
    """scripts/bench.py of the checkout this package runs from.

    Raises:
        FileNotFoundError: an installed package with no repository beside it.
    """
    script = Path(edgepeft.__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"`edgepeft bench` runs the repository's scripts/bench.py, and this edgepeft "
            f"(installed at {Path(edgepeft.__file__).resolve().parent}) has no scripts/ folder "
            "beside it: clone the repository, `pip install -e .[train,test]` there, and run "
            "`edgepeft bench` or `python scripts/bench.py` from it"
        )
    return script


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="run every benchmark (scripts/bench_*.py) and regenerate BENCHMARKS.md",
        description="Run every scripts/bench_*.py of the repository in a fresh process and "
        "rewrite BENCHMARKS.md with machine details, tables, PNG plots (docs/bench/) and the "
        "peers that were skipped. Needs a repository checkout (editable install).",
    )
    parser.add_argument("--quick", action="store_true", help="every script in its smoke mode, into a temp folder")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated benchmarks, e.g. train,export")
    parser.add_argument("--output", metavar="FILE", help="BENCHMARKS.md to write (default: the repository's)")
    parser.add_argument("--json", metavar="FILE", help="every number as JSON")
    parser.add_argument("--workdir", metavar="DIR", help="keep intermediate models and outputs here")
    parser.add_argument("--timeout", type=float, metavar="S", help="seconds per script")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    command = [sys.executable, str(bench_script())]
    for flag in _FLAGS:
        value = getattr(args, flag)
        if value is True:
            command.append(f"--{flag}")
        elif value not in (None, False):
            command += [f"--{flag}", str(value)]
    return subprocess.run(command).returncode
