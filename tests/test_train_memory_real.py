"""The training memory planner on a real model (SmolLM2-135M), not run by default.

    python -m pytest -m real tests/test_train_memory_real.py   # builds the model once (pip)

The measurement is scripts/bench_train.py's `real_memory`: a few `edgepeft.train` steps,
whose own report gives the planned peak, the live-tensor peak and the process RSS.
"""

from __future__ import annotations

import sys

import pytest
from script_loader import load_script

pytestmark = pytest.mark.real



@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train")  # puts scripts/ on sys.path, so real_model imports too


@pytest.fixture(scope="module")
def model_dir(bench):
    return sys.modules["real_model"].smollm2_dir()


def test_the_converted_model_answers_paris(bench, model_dir):
    assert "Paris" in sys.modules["real_model"].answer(model_dir, "What is the capital of France?")


@pytest.mark.parametrize("case", [0, 1], ids=["b8x128-padded", "b4x256-ckpt-padded"])
def test_planned_peak_within_15_percent_of_the_runs_live_tensor_peak(bench, model_dir, tmp_path, case):
    r = bench.real_memory(bench.REAL_CASES[case], tmp_path, model_dir)
    ratio = r["planned_peak_bytes"] / r["peak_tensor_bytes"]
    assert 0.85 <= ratio <= 1.15, r
    # RSS counts more than tensors (Python, torch, the load's freed pages): never below them.
    assert r["peak_rss_bytes"] > r["peak_tensor_bytes"]
