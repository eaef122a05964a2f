"""Run every benchmark and regenerate BENCHMARKS.md: machine, tables, PNG plots, what was skipped.

    scripts/bench_*.py (discovered) ∪ EXPECTED        one fresh process each:
        python scripts/bench_<name>.py [--quick] --output <tmp>/<name>.md --json <tmp>/<name>.json
        ──► status: ok | failed (exit code + last lines of its output) | missing (no script)
    peers (peft, onnxruntime-genai, ...) ──importable?──► table: version, or "not installed"
    each section's markdown tables ──plot_tables──► docs/bench/<name>-<n>.png (bar charts of
        the speed / memory / latency columns), linked under the section
    ──► BENCHMARKS.md (atomic): header, machine, run summary, peers, one section per script

    python scripts/bench.py                 # everything, full size: rewrites BENCHMARKS.md
    python scripts/bench.py --quick         # every script in its smoke mode, into a temp folder
    python scripts/bench.py --only train,export --output /tmp/B.md

Exit code 0 when every script present ran to its end (a missing script is reported in the
file); 1 when one failed (also reported). Each runs alone: `python scripts/bench_<name>.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from benchmarks_md import machine  # noqa: E402

EXPECTED = ("train", "export", "runtime", "plan", "parity", "quality")
"""Benchmarks the project has (issues 1-6, 12); one missing from scripts/ is reported, not dropped."""
PEERS = {
    "peft": "HF peft: adapter reference in bench_train / bench_parity",
    "onnxruntime_genai": "onnxruntime-genai: export and decode peer in bench_export / bench_runtime",
    "onnx_ir": "onnx-ir: needed by onnxruntime-genai's model builder (bench_export)",
    "transformers": "transformers: every benchmark that builds a model",
    "bitsandbytes": "bitsandbytes: NF4 bases in bench_train",
    "llama_cpp": "llama-cpp-python: llama.cpp GGUF quality and decode peer in bench_quality",
    "matplotlib": "matplotlib: the PNG plots of this file",
}
PLOT_DIR = Path("docs") / "bench"
_TAIL = 12
_PLOTS_PER_TABLE = 2
_PLOTTED = re.compile(r"tok(ens)?/s|\bms\b|MiB|GiB|\bs\)|seconds|x$", re.I)


@dataclass
class Run:
    name: str
    status: str
    """"ok", "failed", "missing"."""
    seconds: float = 0.0
    markdown: str = ""
    note: str = ""
    plots: list[Path] = field(default_factory=list)


def discover(scripts: Path, only: list[str] | None, expected=EXPECTED) -> list[str]:
    """Benchmark names: every <scripts>/bench_<name>.py plus `expected`, or just `only`."""
    found = sorted(p.stem.removeprefix("bench_") for p in scripts.glob("bench_*.py"))
    names = list(dict.fromkeys([*expected, *found]))
    return names if not only else only


def run_one(name: str, quick: bool, work: Path, timeout: float | None, scripts: Path = SCRIPTS) -> Run:
    script = scripts / f"bench_{name}.py"
    if not script.is_file():
        return Run(name, "missing", note=f"{script} does not exist")
    output, numbers = work / f"{name}.md", work / f"{name}.json"
    command = [sys.executable, str(script), "--output", str(output), "--json", str(numbers),
               "--workdir", str(work / f"{name}-work")] + ["--quick"] * quick  # fmt: skip
    print(f"bench: running {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=scripts.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(name, "failed", time.perf_counter() - start, note=f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-_TAIL:])
    if done.returncode != 0 or not output.is_file():
        why = f"exit code {done.returncode}" if done.returncode else "it wrote no --output file"
        return Run(name, "failed", seconds, note=f"{why}; last lines:\n\n```\n{tail}\n```")
    print(f"bench: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return Run(name, "ok", seconds, markdown=output.read_text())


def peers(wanted: dict[str, str] = PEERS) -> list[tuple[str, str, str]]:  # noqa: B006 - read only
    """(module, version or "not installed", what it is for) per peer."""
    rows = []
    for module, purpose in wanted.items():
        if importlib.util.find_spec(module) is None:
            rows.append((module, "not installed: the benchmarks that need it skip it", purpose))
            continue
        try:
            version = getattr(__import__(module), "__version__", "installed")
        except Exception as e:  # importable spec, broken import: say why
            version = f"fails to import ({type(e).__name__}: {e})"
        rows.append((module, str(version), purpose))
    return rows


def tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table in `markdown`."""
    found, lines, i = [], markdown.splitlines(), 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[\s:|-]+\|?$", lines[i + 1].strip()):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def _number(cell: str) -> float | None:
    match = re.match(r"^[~≈]?\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)", cell.replace(",", "").replace("**", ""))
    return float(match.group(1)) if match else None


def plot_tables(name: str, markdown: str, folder: Path) -> list[Path]:
    """One horizontal bar chart per table column of speeds, times or memory; the PNG paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from edgepeft.atomic import atomic_path

    paths = []
    for t, (header, rows) in enumerate(tables(markdown)):
        plotted = 0
        for c, column in enumerate(header[1:], 1):
            values = [(" / ".join(r[:1]), _number(r[c])) for r in rows if c < len(r)]
            values = [(label[:40], v) for label, v in values if v is not None]
            if not _PLOTTED.search(column) or len(values) < 2 or plotted == _PLOTS_PER_TABLE:
                continue
            plotted += 1
            fig, ax = plt.subplots(figsize=(7, 0.4 * len(values) + 1.2))
            ax.barh([label for label, _ in values][::-1], [v for _, v in values][::-1], color="#4477aa")
            ax.set_xlabel(column)
            ax.set_title(f"{name}, table {t + 1}: {column} by {header[0] or 'row'}", fontsize=10)
            fig.tight_layout()
            path = folder / f"{name}-{t + 1}-{re.sub(r'[^a-z0-9]+', '-', column.lower()).strip('-')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def render(runs: list[Run], quick: bool, seconds: float, plot_base: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `python scripts/bench.py` (or `edgepeft bench`), every benchmark in a "
        "fresh process, one after the other, on one machine. Each section names its script; "
        "run one alone with `python scripts/bench_<name>.py`. Numbers from a shared or loaded "
        "machine vary; ratios within one table are what to compare.",
        "",
        f"**Machine:** {machine()}",
        "",
    ]
    if quick:
        lines += ["**Smoke run (`--quick`): tiny shapes, numbers check the scripts, not speed.**", ""]
    lines += ["| benchmark | status | time | note |", "|---|---|---|---|"]
    for r in runs:
        note = r.note.splitlines()[0] if r.note else ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} s | {note} |")
    lines += ["", f"Total: {seconds:.0f} s.", "", "## Peers", "",
              "| package | version | used for |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {m} | {v} | {p} |" for m, v, p in peers()]
    for r in runs:
        lines += ["", f"<!-- section:{r.name} -->"]
        if r.status == "ok":
            lines.append(r.markdown.strip())
            for path in r.plots:
                lines += ["", f"![{path.stem}]({os.path.relpath(path, plot_base)})"]
        elif r.status == "missing":
            lines += [f"## {r.name}", "", f"Not run: {r.note}."]
        else:
            lines += [f"## {r.name}", "", f"**Failed** after {r.seconds:.0f} s: {r.note}"]
        lines.append(f"<!-- /section:{r.name} -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script in its smoke mode")
    parser.add_argument("--only", help="comma-separated names, e.g. train,export")
    parser.add_argument("--output", type=Path,
                        help="BENCHMARKS.md to write (default: the repository's; with --quick a temp file)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="every script's numbers, as one JSON file")
    parser.add_argument("--workdir", type=Path, help="keep each script's output and models here")
    parser.add_argument("--timeout", type=float, help="seconds per script (default: none)")
    parser.add_argument("--scripts", type=Path, default=SCRIPTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    work = Path(tempfile.mkdtemp(prefix="edgepeft-bench.")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    output = args.output or (work / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")
    plot_dir = output.parent / PLOT_DIR
    start = time.perf_counter()
    runs = []
    expected = EXPECTED if args.scripts == SCRIPTS else ()
    for name in discover(args.scripts, only, expected):
        run = run_one(name, args.quick, work, args.timeout, args.scripts)
        if run.status == "ok":
            run.plots = plot_tables(name, run.markdown, plot_dir)
        elif run.status == "failed":
            print(f"bench: {name} FAILED: {run.note}", file=sys.stderr, flush=True)
        runs.append(run)

    from edgepeft.atomic import write_bytes, write_json

    write_bytes(output, render(runs, args.quick, time.perf_counter() - start, output.parent))
    if args.json:
        numbers = {}
        for r in runs:
            path = work / f"{r.name}.json"
            numbers[r.name] = {"status": r.status, "seconds": r.seconds, "note": r.note,
                               "results": json.loads(path.read_text()) if path.is_file() else None}  # fmt: skip
        write_json(args.json, numbers)
    bad = [f"{r.name} ({r.status})" for r in runs if r.status != "ok"]
    print(f"wrote {output}" + (f"; not ok: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if any(r.status == "failed" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
