"""scripts/bench_train.py at a tiny size: it runs, writes its section elsewhere, and every
number in its tables agrees with the others (ratios from the values beside them)."""

from __future__ import annotations

import re

import pytest
from script_loader import load_script, markdown_table


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train")


def _num(cell: str) -> float:
    return float(cell.rstrip("x"))


def test_smoke_run_writes_a_consistent_section_into_the_given_file(bench, tmp_path):
    repo_benchmarks = bench.benchmarks_md.BENCHMARKS
    before = repo_benchmarks.read_text() if repo_benchmarks.exists() else None
    target = tmp_path / "BENCHMARKS.md"
    other = "<!-- section:other -->\nkept as it was\n<!-- /section:other -->"
    target.write_text(f"# Benchmarks\n\n{other}\n")

    markdown = bench.main(["--smoke", "--in-process", "--benchmarks-file", str(target)])

    text = target.read_text()
    assert other in text
    section = re.search(r"<!-- section:train -->\n(.*?)<!-- /section:train -->", text, re.S)
    assert section is not None and markdown.strip() in section.group(1)
    assert "Trial run" in markdown
    # The repository's own BENCHMARKS.md is not touched by a run aimed elsewhere.
    assert (repo_benchmarks.read_text() if repo_benchmarks.exists() else None) == before
    assert bench.benchmarks_md.BENCHMARKS == repo_benchmarks

    speed = markdown_table(markdown, "| contender |")
    assert [row[0] for row in speed] == [c.label for c in bench.CONTENDERS[:4]]
    rows = {row[0]: row for row in speed}
    by_name = {c.name: rows[c.label] for c in bench.CONTENDERS[:4]}
    for ours, theirs in (("edgepeft-lora", "hf-lora"), ("edgepeft-qlora", "hf-qlora")):
        mine, peer = by_name[ours], by_name[theirs]
        assert _num(peer[2]) == 1.0 and _num(peer[4]) == 1.0
        assert _num(mine[2]) == pytest.approx(_num(mine[1]) / _num(peer[1]), abs=0.02, rel=0.02)
        assert _num(mine[4]) == pytest.approx(_num(mine[3]) / _num(peer[3]), abs=0.02, rel=0.02)
        verdict = "met" if _num(mine[2]) >= 1.2 else "missed"
        assert f"speed target {verdict} ({_num(mine[2]):.2f}x" in markdown
    for row in speed:
        assert _num(row[1]) > 0 and _num(row[3]) > 0 and _num(row[5]) > 0

    memory = markdown_table(markdown, "| setup |")
    assert len(memory) == 3
    for _, tokens_per_s, measured, planner, ratio in memory:
        assert _num(tokens_per_s) > 0
        assert _num(ratio) == pytest.approx(_num(planner) / _num(measured), abs=0.02, rel=0.02)
    full_ft, lora = memory[2], memory[1]
    assert _num(full_ft[2]) > _num(lora[2])  # every weight's gradient and Adam state


def test_a_measurement_runs_in_a_fresh_process(bench, tmp_path):
    plan = bench.prepare(bench.SMOKE, tmp_path)
    result = bench.run_worker("edgepeft-lora", "memory", tmp_path, threads=1)
    assert result["steps"] == bench.SMOKE.memory_steps
    assert result["peak_bytes"] > 0
    estimate = bench.planner_estimates(plan)["edgepeft-lora"]
    assert 0.5 < estimate / result["peak_bytes"] < 2.0
