"""The wheel alone is enough on a device: it ships every device profile and export recipe, and
`edgepeft plan` and `Engine(device=...)` work from it with torch, transformers, bitsandbytes
and onnx unimportable, far from this checkout."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from bare_install import build_wheel, run_bare, unpack

import edgepeft
from edgepeft.devices import DEVICES_DIR
from edgepeft.plan import shipped_recipes
from edgepeft.tiny import TINY_CONFIGS

PACKAGE = Path(edgepeft.__file__).resolve().parent
BOARD = """
name = "board"
description = "a user's board"
memory = "4GiB"
memory_kind = "system"
bandwidth_gbs = 10
bandwidth_kind = "peak"
cores = 2
providers = ["CPU"]
weight_formats = ["int8"]
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _shipped() -> list[str]:
    """Wheel member names of the profiles, recipes and their notes in this checkout."""
    recipes = {Path(r.path).parent for r in shipped_recipes()}
    files = [*DEVICES_DIR.iterdir(), *(f for folder in recipes for f in folder.iterdir())]
    return sorted(f"edgepeft/{f.resolve().relative_to(PACKAGE).as_posix()}" for f in files)


def test_wheel_holds_every_profile_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = _shipped()
    assert sum(n.endswith(".toml") for n in shipped) >= 11  # 6 devices, 5 recipes
    assert [n for n in shipped if n not in names] == []


def test_plan_and_engine_run_from_the_wheel_without_torch(wheel, tiny_dir, tmp_path):
    from edgepeft.export.api import export

    site = unpack(wheel, tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"  # the working directory: no repo, no devices/ beside it
    users = elsewhere / "my-devices"
    users.mkdir(parents=True)
    (users / "board.toml").write_text(BOARD)
    config = elsewhere / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **TINY_CONFIGS["llama"]}))
    out = tmp_path / "export"
    export(tiny_dir("llama"), out, weights="fp32", verify=False, quiet=True)
    code = f"""
import contextlib, io, json
import edgepeft
from edgepeft.cli import main
from edgepeft.runtime import Engine

def cli(*argv):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["plan", "--model", {str(config)!r}, *argv])
    return code, text.getvalue()

code, table = cli("--device", "raspberry-pi-5-8gb")
_, data = cli("--device", "raspberry-pi-5-8gb", "--json")
_, user = cli("--device", "board", "--json")
engine = Engine({str(out)!r}, device="raspberry-pi-5-8gb")
print(json.dumps({{
    "package": edgepeft.__file__, "code": code, "table": table, "plan": json.loads(data),
    "user": json.loads(user)["device"], "providers": engine.providers,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers"}}),
}}))
"""
    run = run_bare(code, cwd=elsewhere, site=site, env={"EDGEPEFT_DEVICES": str(users)})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).resolve().is_relative_to(site)  # not this checkout's edgepeft
    assert got["code"] == 0 and "raspberry-pi-5-8gb" in got["table"]
    assert "recommended: cpu-int4" in got["table"]
    assert got["plan"]["device"]["source"].startswith(str(site))
    assert got["plan"]["recommendation"]["recipe"]["name"] == "cpu-int4"
    assert got["user"]["name"] == "board" and got["user"]["source"] == str(users / "board.toml")
    assert got["providers"] == ["CPUExecutionProvider"] and got["loaded"] == []


def test_commands_that_need_torch_say_what_to_install(wheel, tiny_dir, tmp_path):
    site = unpack(wheel, tmp_path / "site")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", **TINY_CONFIGS["llama"]}))
    for argv in (
        ["plan", "--model", str(config), "--device", "raspberry-pi-5-8gb", "--train"],
        ["export", "--base", str(tiny_dir("llama")), "--out", str(tmp_path / "x")],
    ):
        code = f"from edgepeft.cli import main\nsys.exit(main({argv!r}))\n"
        run = run_bare(code, cwd=tmp_path, site=site)
        assert run.returncode == 2, (argv, run.stderr[-2000:])
        assert run.stderr.count("\n") == 1 and "pip install 'edgepeft[train]'" in run.stderr, argv
        assert f"edgepeft {argv[0]}: error:" in run.stderr and "Traceback" not in run.stderr
