"""Export recipes: every shipped file loads by name, by the repo's old `export/NAME.toml`
spelling or by path, a user's file works, and `edgepeft export --recipe` uses one with
explicit flags winning over it."""

from __future__ import annotations

import pytest

from edgepeft.cli import main
from edgepeft.export.api import load_recipe
from edgepeft.export.manifest import read_manifest

SHIPPED = ["cpu-int4", "cpu-int8", "cuda-nf4-exact", "cuda-fp16", "cuda-int4"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe["weights"] in name and recipe["providers"][-1] == "CPUExecutionProvider"
    assert all(p.endswith("ExecutionProvider") for p in recipe["providers"])
    assert ("CUDAExecutionProvider" in recipe["providers"]) == name.startswith("cuda")


@pytest.mark.parametrize("name", SHIPPED)
def test_name_old_spelling_and_path_find_the_same_recipe(name, tmp_path, monkeypatch):
    from edgepeft.export.api import recipe_path

    monkeypatch.chdir(tmp_path)  # no export/ folder here: the old spelling means the shipped file
    by_name = load_recipe(name)
    assert load_recipe(f"export/{name}.toml") == by_name == load_recipe(f"{name}.toml")
    assert load_recipe(recipe_path(name)) == by_name and recipe_path(name).is_absolute()


def test_a_user_file_wins_over_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "cpu-int4.toml").write_text('weights = "int8"\n')
    (tmp_path / "mine.toml").write_text('weights = "fp16"\nmode = "separate"\n')
    assert load_recipe("export/cpu-int4.toml") == {"weights": "int8"}  # the file that exists
    assert load_recipe(tmp_path / "mine.toml") == {"weights": "fp16", "mode": "separate"}
    with pytest.raises(FileNotFoundError, match="shipped recipes: cpu-int4, cpu-int8"):
        load_recipe("cpu-int9")
    with pytest.raises(FileNotFoundError, match="recipe elsewhere/cpu-int4.toml not found"):
        load_recipe("elsewhere/cpu-int4.toml")  # only the old export/ folder falls back


def test_export_uses_the_recipe_and_flags_override_it(tiny_dir, tmp_path, capsys):
    base = str(tiny_dir("llama"))
    recipe = "cpu-int4"
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


def test_int4_recipe_keys_are_checked(tmp_path):
    """int4_method / mixed_precision: typed like the other keys, the method one of METHODS."""
    from edgepeft.export.api import export

    (tmp_path / "ok.toml").write_text('int4_method = "rtn"\nmixed_precision = false\n')
    assert load_recipe(tmp_path / "ok.toml") == {"int4_method": "rtn", "mixed_precision": False}
    (tmp_path / "typed.toml").write_text('mixed_precision = "yes"\n')
    with pytest.raises(ValueError, match=r"typed.toml: mixed_precision must be a bool, got 'yes'"):
        load_recipe(tmp_path / "typed.toml")
    (tmp_path / "bool.toml").write_text("block_size = true\n")
    with pytest.raises(ValueError, match="block_size must be a int, got True"):
        load_recipe(tmp_path / "bool.toml")
    (tmp_path / "method.toml").write_text('int4_method = "gptq"\n')
    with pytest.raises(ValueError, match=r"int4_method must be one of \('rtn', 'search'\).*'gptq'"):
        export("unused", tmp_path / "out", recipe=tmp_path / "method.toml")


def test_cli_int4_flags_reach_the_manifest(tiny_dir, tmp_path, capsys):
    """Default: search, asymmetric, mixed; --int4-method rtn --no-mixed-precision: the old
    symmetric RTN format (no zero points, no int8 tensor), recorded in the manifest."""
    base = str(tiny_dir("llama"))
    assert main(["export", "--base", base, "--out", str(tmp_path / "a"), "--no-verify", "--quiet"]) == 0
    m = read_manifest(tmp_path / "a")
    assert (m.quantization["method"], m.quantization["symmetric"], m.quantization["mixed"]) == (
        "search",
        False,
        True,
    )
    assert "lm_head" in m.quantization["int8_tensors"]
    assert main(["export", "--base", base, "--out", str(tmp_path / "b"), "--int4-method", "rtn",
                 "--no-mixed-precision", "--no-verify", "--quiet"]) == 0  # fmt: skip
    m = read_manifest(tmp_path / "b")
    assert m.quantization["method"] == "rtn" and m.quantization["symmetric"]
    assert not m.quantization["mixed"] and m.quantization["int8_tensors"] == []
    assert m.quantization["int4_tensors"] == 4 * m.num_layers + 1
    capsys.readouterr()
