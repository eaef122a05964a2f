"""BENCHMARKS.md is shared by every bench_*.py: each owns one section between markers.

    <!-- section:train -->  ...  <!-- /section:train -->

`write_section` replaces (or appends) one section and refreshes nothing else, so
benchmarks can run separately. `machine()` describes where numbers were measured.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
_HEADER = """# Benchmarks

Every table below was measured by the script named in its section, in one run on
one machine, with peers measured in the same run. Re-run with `python scripts/bench_<name>.py`.
Numbers from a shared or loaded machine vary; ratios within one table are what to compare.
"""


def machine() -> str:
    """One line: CPU model, cores, memory, OS, Python and key package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    versions = []
    # Installed distributions' metadata: importing torch & co. only to read a version costs
    # seconds per benchmark run.
    for pkg in ("torch", "transformers", "bitsandbytes", "peft", "onnxruntime", "onnxruntime-genai"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; {', '.join(versions)}"
    )


def write_section(name: str, markdown: str) -> Path:
    """Replace section `name` of BENCHMARKS.md with `markdown` (+ a machine/date line), atomically."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = f"<!-- section:{name} -->\n{markdown.strip()}\n\n_Measured {stamp} on: {machine()}_\n<!-- /section:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else _HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else f"{text.rstrip()}\n\n{body}\n"
    fd, tmp = tempfile.mkstemp(dir=BENCHMARKS.parent, prefix=".BENCHMARKS.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, BENCHMARKS)
    return BENCHMARKS


def publish(name: str, markdown: str, output: Path | None) -> Path:
    """Section `name` into `output` (a file of its own, with the machine line), else into
    BENCHMARKS.md; atomically either way. Returns the file written."""
    if output is None:
        return write_section(name, markdown)
    fd, tmp = tempfile.mkstemp(dir=Path(output).parent, prefix=f".{Path(output).name}.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{markdown}\n\n_Measured on: {machine()}_\n")
    os.replace(tmp, output)
    return Path(output)


def run_worker(script: str | os.PathLike, spec: dict, timeout: float = 1800) -> dict:
    """`python SCRIPT --worker SPEC` in a fresh process (a measurement alone in its process);
    the worker prints its JSON result as the last stdout line."""
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"{spec['kind']} worker failed ({how}): {tail[0]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
