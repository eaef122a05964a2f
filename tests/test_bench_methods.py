"""scripts/bench_methods.py --quick: it runs end to end, writes its table where it is told,
the table says what the JSON says, and every device graph passes verify against the trained
model (a switchable family separate, the others merged), hybrids (MAM) included."""

from __future__ import annotations

import json

import pytest
from script_loader import SCRIPTS, load_script, markdown_table

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")


def test_quick_run_table_and_json(tmp_path):
    bench = load_script("bench_methods")
    repo = SCRIPTS.parent / "BENCHMARKS.md"
    before = repo.read_text() if repo.exists() else None
    output, numbers = tmp_path / "methods.md", tmp_path / "methods.json"
    families = ["lora", "selective", "mam"]

    argv = ["--quick", "--output", str(output), "--json", str(numbers), "--only", *families]
    assert bench.main(argv) == 0

    assert (repo.read_text() if repo.exists() else None) == before  # aimed elsewhere
    rows = {r["method"]: r for r in json.loads(numbers.read_text())["rows"]}
    assert list(rows) == families
    assert {m: r["device_mode"] for m, r in rows.items()} == {
        "lora": "separate", "selective": "separate", "mam": "separate",
    }  # fmt: skip
    for cells in markdown_table(output.read_text(), "| family | setting |"):
        row = rows[cells[0]]
        assert not row["error"]
        assert row["device_passed"], row  # the trained NF4 codes + the adapter: exact
        assert cells[7] == f"{row['device_equal']}/{row['test_rows']}"
        assert row["device_equal"] == row["test_rows"]  # device answers = PyTorch's
        assert cells[9].startswith("pass")
    assert rows["lora"]["merged_passed"] and rows["mam"]["merged_passed"] is None
