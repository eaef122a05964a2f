"""scripts/bench.py (and `edgepeft bench`): every benchmark run, missing and failing ones
reported in BENCHMARKS.md, plots drawn from the tables, peers listed; bench_train's common flags."""

from __future__ import annotations

import json

import pytest
from script_loader import SCRIPTS, load_script

from edgepeft.cli import main as cli

_OK_SCRIPT = '''
import argparse, json
p = argparse.ArgumentParser()
for flag in ("--output", "--json", "--workdir"):
    p.add_argument(flag)
p.add_argument("--quick", action="store_true")
a = p.parse_args()
open(a.output, "w").write(
    "## OK bench\\n\\n| engine | decode tok/s | note |\\n|---|---:|---|\\n"
    "| ours | 607 | fused |\\n| peer | 238 | generic |\\n\\nquick=" + str(a.quick) + "\\n")
json.dump({"ours": 607, "peer": 238}, open(a.json, "w"))
'''
_BOOM_SCRIPT = 'import sys\nprint("loading the model")\nprint("KeyError: boom", file=sys.stderr)\nsys.exit(3)\n'


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_ok_failed_and_missing_benchmarks_are_all_in_the_file(bench, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_ok.py").write_text(_OK_SCRIPT)
    (scripts / "bench_boom.py").write_text(_BOOM_SCRIPT)
    out, numbers = tmp_path / "B.md", tmp_path / "all.json"

    code = bench.main(["--quick", "--scripts", str(scripts), "--only", "ok,boom,absent",
                       "--output", str(out), "--json", str(numbers), "--workdir", str(tmp_path / "w")])

    assert code == 1  # one script failed
    text = out.read_text()
    assert "| ok | ok |" in text and "| boom | failed |" in text and "| absent | missing |" in text
    assert "exit code 3" in text and "KeyError: boom" in text  # the failure's own last lines
    assert "bench_absent.py does not exist" in text
    assert "| ours | 607 | fused |" in text and "quick=True" in text  # the section, as written
    assert "Smoke run" in text and "**Machine:**" in text
    plot = tmp_path / "docs" / "bench" / "ok-1-decode-tok-s.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](docs/bench/ok-1-decode-tok-s.png)" in text  # linked relative to the file
    data = json.loads(numbers.read_text())
    assert data["ok"]["results"] == {"ours": 607, "peer": 238}
    assert data["boom"]["status"] == "failed" and data["absent"]["status"] == "missing"


def test_every_expected_benchmark_is_listed_even_when_absent(bench, tmp_path):
    names = bench.discover(tmp_path, None)  # a scripts folder with no bench_*.py at all
    assert names == list(bench.EXPECTED)
    assert set(bench.EXPECTED) <= set(bench.discover(SCRIPTS, None))


def test_a_peer_that_is_not_installed_is_listed_as_skipped(bench):
    rows = {m: v for m, v, _ in bench.peers({"edgepeft_no_such_peer": "x", "numpy": "y"})}
    assert rows["edgepeft_no_such_peer"].startswith("not installed")
    import numpy

    assert rows["numpy"] == numpy.__version__


def test_tables_are_parsed_and_only_measure_columns_plotted(bench, tmp_path):
    markdown = "| setup | tokens/s | peak MiB | label |\n|---|---:|---:|---|\n| a | 1,200 | 3.5 | x |\n| b | **900** | 2 | y |\n"
    [(header, rows)] = bench.tables(markdown)
    assert header == ["setup", "tokens/s", "peak MiB", "label"] and rows[1][1] == "**900**"
    paths = bench.plot_tables("t", markdown, tmp_path)
    assert [p.name for p in paths] == ["t-1-tokens-s.png", "t-1-peak-mib.png"]


def test_edgepeft_bench_runs_the_repository_script(tmp_path, capsys):
    out = tmp_path / "B.md"
    assert cli(["bench", "--quick", "--only", "absent", "--output", str(out)]) == 0
    assert "| absent | missing |" in out.read_text()


@pytest.mark.slow
def test_bench_train_takes_the_common_flags(tmp_path):
    bench_train = load_script("bench_train")
    before = bench_train.benchmarks_md.BENCHMARKS.read_text() if bench_train.benchmarks_md.BENCHMARKS.exists() else None
    out, numbers = tmp_path / "train.md", tmp_path / "train.json"
    markdown = bench_train.main(["--quick", "--output", str(out), "--json", str(numbers)])
    assert markdown.strip() in out.read_text() and "Trial run" in markdown
    data = json.loads(numbers.read_text())
    assert data["results"]["edgepeft-lora"]["speed"]["tokens_per_s"] > 0
    after = bench_train.benchmarks_md.BENCHMARKS.read_text() if bench_train.benchmarks_md.BENCHMARKS.exists() else None
    assert after == before  # the repository's BENCHMARKS.md is untouched
