"""scripts/bench_parity.py --quick: it runs end to end, writes its table where it is told, and
the table says what the JSON says; the exact rows are exact against the training-time model."""

from __future__ import annotations

import json

import pytest
from script_loader import SCRIPTS, load_script, markdown_table

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")


def test_quick_run_table_and_json(tmp_path):
    bench = load_script("bench_parity")
    repo = SCRIPTS.parent / "BENCHMARKS.md"
    before = repo.read_text() if repo.exists() else None
    output, numbers = tmp_path / "parity.md", tmp_path / "parity.json"

    assert bench.main(["--quick", "--output", str(output), "--json", str(numbers)]) == 0

    assert (repo.read_text() if repo.exists() else None) == before  # aimed elsewhere
    document = json.loads(numbers.read_text())
    rows = {(r["mode"], r["weights"]): r for r in document["rows"]}
    assert list(rows) == list(bench.ROWS)
    table = markdown_table(output.read_text(), "| mode | weights |")
    assert [(cells[0], cells[1]) for cells in table] == list(bench.ROWS)
    for cells in table:
        row = rows[(cells[0], cells[1])]
        assert float(cells[2]) == pytest.approx(row["bytes_per_param"], abs=1e-3)
        assert float(cells[4]) == pytest.approx(row["max_abs_diff"], rel=1e-2, abs=1e-9)
        assert cells[6] == f"{row['top1_agree']}/{row['top1_total']}"
        assert float(cells[8]) == pytest.approx(row["task_em_onnx"], abs=1e-3)
        assert float(cells[9]) == pytest.approx(document["info"]["torch_em"], abs=1e-3)
        assert row["decode_tok_s"] > 0 and 0 <= row["task_em_onnx"] <= 1

    # Judged rows: merged fp32 holds the trained weights, separate nf4 the trained NF4 codes.
    for key, tolerance in ((("merged", "fp32"), 1e-4), (("separate", "nf4"), 1e-3)):
        row = rows[key]
        assert row["judged"] and row["passed"] and row["max_abs_diff"] <= tolerance, key
        assert row["top1_agree"] == row["top1_total"], key
        assert row["task_em_onnx"] == document["info"]["torch_em"], key
    assert not rows[("merged", "int4")]["judged"]
    # Rounding shows: re-quantized merged weights move the logits far more than exact NF4.
    assert (
        rows[("merged", "int4")]["max_abs_diff"] > 100 * rows[("separate", "nf4")]["max_abs_diff"]
    )
    # Storage: fp32 > fp16 > int4 per parameter; separate rows ship an adapter file.
    sizes = {k: r["bytes_per_param"] for k, r in rows.items()}
    assert sizes[("merged", "fp32")] > sizes[("merged", "fp16")] > sizes[("merged", "int4")]
    assert rows[("separate", "nf4")]["adapter_bytes"] > 0
    assert rows[("merged", "nf4")]["adapter_bytes"] is None
