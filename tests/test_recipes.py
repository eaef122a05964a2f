"""Export recipes: every shipped file loads, and `edgepeft export --recipe` uses one with
explicit flags winning over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepeft.cli import main
from edgepeft.export.api import load_recipe
from edgepeft.export.manifest import read_manifest

RECIPES = Path(__file__).resolve().parent.parent / "export"


@pytest.mark.parametrize("name", ["cpu-int4", "cpu-int8", "cuda-nf4-exact", "cuda-fp16", "cuda-int4"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    assert recipe["weights"] in name and recipe["providers"][-1] == "CPUExecutionProvider"
    assert all(p.endswith("ExecutionProvider") for p in recipe["providers"])
    assert ("CUDAExecutionProvider" in recipe["providers"]) == name.startswith("cuda")


def test_export_uses_the_recipe_and_flags_override_it(tiny_dir, tmp_path, capsys):
    base = str(tiny_dir("llama"))
    recipe = str(RECIPES / "cpu-int4.toml")
    assert main(["export", "--base", base, "--out", str(tmp_path / "a"), "--recipe", recipe,
                 "--no-verify", "--quiet"]) == 0  # fmt: skip
    m = read_manifest(tmp_path / "a")
    assert (m.weights, m.block_size, m.accuracy_level) == ("int4", 32, 4)
    assert list(m.providers) == ["CPUExecutionProvider"]
    assert main(["export", "--base", base, "--out", str(tmp_path / "b"), "--recipe", recipe,
                 "--weights", "int8", "--block-size", "16", "--no-verify", "--quiet"]) == 0  # fmt: skip
    m = read_manifest(tmp_path / "b")
    assert (m.weights, m.block_size, m.accuracy_level) == ("int8", 16, 4)  # level from the recipe
    capsys.readouterr()
