"""scripts/bench_plan.py --quick: it runs, writes its section where told, its numbers agree
with each other, and the calibrated efficiency lands in a file `local` can read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.slow
def test_quick_run_writes_a_consistent_section_and_a_calibration(tmp_path):
    from edgepeft.devices import local_profile

    spec = importlib.util.spec_from_file_location("bench_plan", SCRIPTS / "bench_plan.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_plan"] = bench
    spec.loader.exec_module(bench)
    out, data, calib = tmp_path / "plan.md", tmp_path / "plan.json", tmp_path / "local.toml"
    assert bench.main(["--quick", "--output", str(out), "--json", str(data), "--calibrate", str(calib)]) == 0
    text, numbers = out.read_text(), json.loads(data.read_text())
    assert "## Plan: predicted vs measured" in text and "| memory within ±15%" in text
    (result,) = numbers["results"]
    assert result["peak_measured"] > 0 and result["tok_s_measured"] > 0
    # The planned model.onnx.data is the file on disk, to the byte but for the last padding.
    assert abs(result["file_bytes_planned"] - result["file_bytes_measured"]) < 4096
    share = result["bytes_per_token"] * result["tok_s_measured"] / numbers["local"]["bandwidth"]
    assert result["bound_share"] == pytest.approx(share)
    assert {p["device"] for p in numbers["profiles"]} >= {"raspberry-pi-5-8gb", "rtx-4060-8gb"}
    assert local_profile(calib).efficiency == pytest.approx(numbers["calibrated"])
