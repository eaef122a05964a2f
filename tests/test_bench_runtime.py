"""scripts/bench_runtime.py --quick: it runs, writes its section elsewhere, every row is in the
table with numbers that agree with its JSON, and the engine's greedy tokens equal
onnxruntime-genai's on the same graph (no timing is judged here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("onnxruntime_genai")


def _rows(markdown: str, header_start: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for the table whose header starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_run_reports_every_measurement(tmp_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_text() if benchmarks.exists() else None
    md, raw = tmp_path / "runtime.md", tmp_path / "runtime.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_runtime.py"), "--quick", "--output", str(md),
         "--json", str(raw)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (benchmarks.read_text() if benchmarks.exists() else None) == before
    assert "bench_runtime" in proc.stderr  # progress lines
    text, data = md.read_text(), json.loads(raw.read_text())
    r = data["results"]
    for key in ("switch", "reload", "engine_decode_base", "genai_decode_base", "engine_decode_a0",
                "genai_decode_a0", "engine_memory", "merged_memory"):
        assert "missing" not in r[key], f"{key}: {r[key]['missing']}"

    switch = _rows(text, "| contender | median |")
    engine_row = switch["edgepeft engine: next request on another loaded adapter"]
    assert engine_row[0] == f"{r['switch']['median_us']:.2f} µs" and engine_row[2] == "2,000"
    assert 0 < r["switch"]["median_us"] <= r["switch"]["p99_us"]
    assert r["reload"]["median_ms"] > 0

    decode = _rows(text, "| adapter | edgepeft engine tok/s |")
    new_tokens = data["shape"]["new_tokens"]
    for tag, label in (("base", "none"), ("a0", "LoRA r=16 (a0)")):
        ours, theirs = r[f"engine_decode_{tag}"], r[f"genai_decode_{tag}"]
        assert ours["decode_tok_s"] > 0 and theirs["decode_tok_s"] > 0
        assert len(ours["tokens"]) == len(theirs["tokens"]) == new_tokens
        assert ours["tokens"] == theirs["tokens"], f"{tag}: engine and genai disagree on greedy tokens"
        assert decode[label][2] == f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x"
        assert decode[label][5] == "yes"
    assert r["engine_decode_base"]["tokens"] != r["engine_decode_a0"]["tokens"], "the LoRA changed nothing"

    memory, merged = r["engine_memory"], r["merged_memory"]
    assert merged["sessions"] == 8 and merged["sessions_rss"] > 0 and memory["engine_rss"] > 0
    assert memory["reported"]["base"] == memory["base_file_bytes"]
    assert 0 < memory["reported"]["adapters"] <= memory["adapter_file_bytes"]

    targets = _rows(text, "| target | measured | met |")
    assert len(targets) == 5 == len(data["targets"])
    for row in data["targets"]:
        assert targets[row["target"]] == [row["measured"], row["met"]]
        assert row["met"] in ("yes", "no")
    speedup = r["reload"]["median_ms"] * 1000 / r["switch"]["median_us"]
    reload_row = next(v for k, v in targets.items() if "faster than a merged-graph reload" in k)
    assert reload_row[0] == f"{speedup:,.0f}x"
    assert re.search(r"_Measured on: .+_", text)
