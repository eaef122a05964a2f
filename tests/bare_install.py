"""A device with the bare install (`pip install edgepeft`, no extras), simulated. Not a test module.

    PRELUDE                 source that makes torch, transformers, bitsandbytes, onnx and peft
                            unimportable (ModuleNotFoundError, as where they are not installed)
    build_wheel(dest)       the wheel pip builds from pyproject.toml, README.md and edgepeft/
                            alone (copied out first, so nothing else of the repo is near it)
    unpack(wheel, dest)     the wheel's files, as pip lays them out in site-packages
    run_bare(code, ...)     `python -c PRELUDE + code` in a subprocess, optionally importing
                            edgepeft from an unpacked wheel instead of this checkout
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "transformers", "bitsandbytes", "onnx", "peft")

PRELUDE = f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed on this device", name=name)

sys.meta_path.insert(0, Refuse())
"""
"""Put first in a script: every later import of a BLOCKED package (or a submodule) fails."""


def build_wheel(dest: Path) -> Path:
    """The wheel of this checkout's package, built without network or build isolation."""
    src = dest / "src"
    src.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "edgepeft", src / "edgepeft", ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(dest / "wheel")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (dest / "wheel").glob("edgepeft-*.whl")
    return wheel


def unpack(wheel: Path, dest: Path) -> Path:
    """`dest` holding the wheel's files (a pure-Python wheel unpacks to site-packages as is)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dest)
    return dest


def run_bare(
    code: str, *, cwd: Path, site: Path | None = None, env: dict | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    """Run `code` after PRELUDE in a fresh interpreter in `cwd`; with `site`, edgepeft is
    imported from that folder (PYTHONPATH comes before the checkout's editable install)."""
    environ = {**os.environ, **(env or {})}
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
