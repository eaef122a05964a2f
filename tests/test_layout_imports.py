"""The layout's one-way arrows, held by imports: runtime ──► artifacts ◄── export.

    import edgepeft.runtime[.x] / edgepeft.artifacts[.x]   in a fresh interpreter each
        ──► sys.modules holds no torch, transformers, bitsandbytes, onnx, peft (bare_install's
            BLOCKED; onnxruntime is fine) and no edgepeft.export module
    the source of edgepeft/artifacts/*.py (function-level imports included)
        ──► only stdlib, numpy, safetensors, onnxruntime, edgepeft.{vocab, settings, atomic,
            finite, artifacts}
    the source of edgepeft/runtime/*.py ──► never edgepeft.export, never a BLOCKED package

A fresh interpreter per module, so that what an earlier import loaded cannot hide what this
one pulls in. test_runtime_torch_free.py runs the engine itself with those packages blocked.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bare_install import BLOCKED

PACKAGE = Path(importlib.util.find_spec("edgepeft").origin).parent
ARTIFACTS_MAY_IMPORT = ("numpy", "safetensors", "onnxruntime")
EDGEPEFT_ARTIFACTS_MAY_IMPORT = frozenset(
    {"edgepeft", "edgepeft.vocab", "edgepeft.settings", "edgepeft.atomic", "edgepeft.finite"}
)
"""`edgepeft` itself: its __init__ is lazy (artifacts takes only __version__ from it)."""


def modules(package: str) -> list[str]:
    """The package and each of its modules, by name (found on disk, none imported)."""
    folder = PACKAGE / package
    return [f"edgepeft.{package}"] + [
        f"edgepeft.{package}.{path.stem}"
        for path in sorted(folder.glob("*.py"))
        if path.stem != "__init__"
    ]


def loaded_by(module: str) -> list[str]:
    """sys.modules after `import module` in a fresh interpreter."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def forbidden(loaded: list[str]) -> list[str]:
    """The BLOCKED packages and edgepeft.export modules among `loaded`."""
    return [n for n in loaded if n.split(".")[0] in BLOCKED or f"{n}.".startswith("edgepeft.export.")]


def imported_names(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the same package
                names.add(f"edgepeft.{path.parent.name}")
            elif node.module == "edgepeft":  # `from edgepeft import atomic, __version__`
                for alias in node.names:
                    module = PACKAGE / alias.name
                    is_module = module.with_suffix(".py").is_file() or module.is_dir()
                    names.add(f"edgepeft.{alias.name}" if is_module else "edgepeft")
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("module", modules("runtime") + modules("artifacts"))
def test_import_pulls_in_no_torch_and_no_exporter(module):
    assert forbidden(loaded_by(module)) == [], f"import {module} loads them"


def test_the_check_sees_the_exporter():
    """The old path is an alias into the exporter package, so the check above can fail."""
    assert "edgepeft.export.manifest" in forbidden(loaded_by("edgepeft.export.manifest"))


@pytest.mark.parametrize("path", sorted((PACKAGE / "artifacts").glob("*.py")), ids=lambda p: p.name)
def test_artifacts_import_only_the_contracts_dependencies(path):
    def allowed(name: str) -> bool:
        root = name.split(".")[0]
        if root == "edgepeft":
            return name in EDGEPEFT_ARTIFACTS_MAY_IMPORT or name.startswith("edgepeft.artifacts")
        return root in sys.stdlib_module_names or root in ARTIFACTS_MAY_IMPORT

    assert sorted(n for n in imported_names(path) if not allowed(n)) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_runtime_source_never_imports_the_exporter(path):
    assert forbidden(sorted(imported_names(path))) == []
