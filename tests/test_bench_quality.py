"""scripts/bench_quality.py: its measures against a direct computation, the windows it feeds
onnxruntime, its tables and goal line; the real-model smoke run only with -m real."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from script_loader import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_quality")  # puts scripts/ on sys.path: measure_int4 too


def _direct(ref_logits: np.ndarray, test_logits: np.ndarray, wanted: np.ndarray):
    """ppl change, KL(ref || test) and top-1, one position at a time, in float64."""

    def probs(row):
        e = np.exp(row - row.max())
        return e / e.sum()

    nll = ref_nll = kl = same = 0.0
    for r, t, y in zip(ref_logits.astype(np.float64), test_logits.astype(np.float64), wanted,
                       strict=True):  # fmt: skip
        p, q = probs(r), probs(t)
        nll, ref_nll = nll - math.log(q[y]), ref_nll - math.log(p[y])
        kl += float((p * np.log(p / q)).sum())
        same += float(r.argmax() == t.argmax())
    n = len(wanted)
    return math.exp(nll / n) / math.exp(ref_nll / n) - 1, kl / n, same / n


def test_scores_of_windows_match_a_direct_computation(bench):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, 23).tolist()
    chunks = bench.windows(ids, 8)  # 8 + 8 + 7
    assert [len(w) for w in chunks] == [8, 8, 7]
    ref = [rng.normal(size=(len(w), 40)).astype(np.float32) for w in chunks]
    test = [r + 0.5 * rng.normal(size=r.shape).astype(np.float32) for r in ref]

    wanted = bench.targets(chunks)
    q = bench.measure_int4.score(bench.scored(ref), bench.scored(test), wanted)

    # each window's last position predicts nothing inside it: dropped from every measure
    keep = lambda xs: np.concatenate([x[:-1] for x in xs])  # noqa: E731
    change, kl, top1 = _direct(keep(ref), keep(test), np.concatenate([w[1:] for w in chunks]))
    assert wanted.tolist() == [t for w in chunks for t in w[1:]]
    assert q.ppl_change == pytest.approx(change, rel=1e-4)
    assert q.kl == pytest.approx(kl, rel=1e-4)
    assert q.top1 == pytest.approx(top1)
    assert 0 < q.top1 < 1 and q.kl > 0  # the noise is large enough to be measured


def test_a_window_of_one_token_predicts_nothing_and_is_dropped(bench):
    assert bench.windows([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4]]


def test_onnxruntime_windows_of_an_fp32_export_give_the_torch_logits(bench, tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    graph = bench.edgepeft_graph(folder, "fp32", tmp_path / "fp32")
    chunks = bench.windows(list(range(3, 3 + 13)), 6)  # 6 + 6 (+ a dropped 1)

    got = bench.ort_logits(graph / "model.onnx", chunks, bench.head_dim(folder))
    want = bench.torch_logits(folder, chunks)

    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())
    assert bench.weights_mb(graph) > 0


def _rows(bench, int4_change: float, int4_mb: float):
    row = bench.Row
    return [
        row(bench.REFERENCE, 10.0, 0.0, 0.0, 1.0, 500.0),
        row(bench.DEFAULT_INT4, 10 * (1 + int4_change), int4_change, 0.05, 0.9, int4_mb),
        row(bench.Q4_K_M, 10.4, 0.04, 0.04, 0.92, 100.0),
        row("llama.cpp Q4_0", skipped="llama_cpp not installed"),
    ]


def test_table_ratios_are_to_q4_k_m_and_a_skipped_peer_keeps_its_row(bench):
    lines = bench.quality_table(_rows(bench, 0.02, 90.0))
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines[2:]}  # fmt: skip
    assert len(cells) == 4
    int4 = cells[bench.DEFAULT_INT4]
    assert int4[1] == "+2.00%" and int4[5] == "0.50" and int4[6] == "0.90"
    assert cells[bench.Q4_K_M][5] == "1.00"
    assert cells["llama.cpp Q4_0"][0] == "skipped: llama_cpp not installed"


@pytest.mark.parametrize(
    ("change", "mb", "verdict", "stretch"),
    [(0.02, 90.0, "met", "met"), (0.035, 100.0, "met", "missed"),
     (0.05, 90.0, "missed", "missed"), (0.02, 101.0, "missed", "met")],
)  # fmt: skip
def test_goal_line_says_met_or_missed_with_the_numbers(bench, change, mb, verdict, stretch):
    line = bench.goal(_rows(bench, change, mb))
    assert f"**{verdict}**: {100 * change:+.2f}% at {mb * 1e6 / 2**20:.1f} MiB" in line
    assert "Q4_K_M's +4.00% at 95.4 MiB" in line  # 100 MB
    assert line.endswith(f"Stretch (<= +3%): **{stretch}**.")


def test_goal_is_not_judged_without_a_q4_k_m_row(bench):
    rows = [r for r in _rows(bench, 0.02, 90.0) if r.contender != bench.Q4_K_M]
    assert "not judged, no Q4_K_M row" in bench.goal(rows)


@pytest.mark.real
def test_quick_run_on_the_real_model(bench, tmp_path):
    out, numbers = tmp_path / "quality.md", tmp_path / "quality.json"
    assert bench.main(["--quick", "--output", str(out), "--json", str(numbers)]) == 0
    rows = {r["contender"]: r for r in json.loads(numbers.read_text())["copies"][0]["rows"]}
    fp32, int4 = rows["edgepeft fp32"], rows[bench.DEFAULT_INT4]
    assert fp32["kl"] < 1e-3 and fp32["top1"] > 0.98
    assert int4["kl"] > fp32["kl"] and int4["mb"] < fp32["mb"] / 3
    assert "## Quality" in out.read_text()
    torch.testing.assert_close(rows[bench.REFERENCE]["ppl_change"], 0.0)
