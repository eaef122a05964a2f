"""constraints.txt, the lock CI and the README install with, covers what the project depends on."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _name(name: str) -> str:
    """A distribution name as pip compares them ("onnx_ir" and "ONNX-IR" are "onnx-ir")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (NAME==VERSION)"
            pins[_name(name)] = version
    return pins


def test_every_dependency_ci_installs_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["train"] + extras["test"]]
    here = {_name(r.name) for r in wanted if r.marker is None or r.marker.evaluate()}
    missing = sorted(here - set(_pins()))
    assert not missing, (
        f"constraints.txt does not pin {missing}: CI would install whatever is newest. "
        "Refresh the lock with scripts/check_latest.sh --write"
    )


def test_ci_and_the_readme_install_with_the_lock():
    readme = (ROOT / "README.md").read_text().split("```")[1]  # the first code block
    commands = [line for line in readme.splitlines() if "pip install" in line]
    assert len(commands) == 2 and all("-c constraints.txt" in c for c in commands)
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
