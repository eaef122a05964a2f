"""`edgepeft demo`: the shipped base knows its operations, the data is honest (no test word
trained on), the examples are the demo's own data, and a short demo run trains, exports,
verifies and answers differently per adapter on the device runtime."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

from edgepeft.cli import main as cli
from edgepeft.demo import corpus
from edgepeft.demo.paths import BASE_DIR
from edgepeft.demo.pipeline import DEMO_ADAPTERS, char_similarity, strict_accuracy

REPO = Path(__file__).resolve().parent.parent


def test_test_words_are_never_trained_on():
    train, test = corpus.task_splits("reverse", 2000, 32)
    trained = {r["prompt"] for r in train}
    assert not trained & {r["prompt"] for r in test}
    words = {line.split(": ", 1)[1].split(" ->")[0] for line in corpus.pretraining_lines(3000, 0) if " ->" in line}
    assert not words & corpus.HELD_OUT
    assert corpus.task_splits("reverse", 50, 8) == corpus.task_splits("reverse", 50, 8)  # seeded
    assert train[0]["completion"] == " " + train[0]["prompt"].removesuffix(" ->")[::-1]


def test_strict_accuracy_is_case_sensitive_and_chars_give_partial_credit():
    rows = [{"completion": " GARDEN"}, {"completion": " nedrag"}]
    assert strict_accuracy(["GARDEN", "nedrag "], rows) == 1.0
    assert strict_accuracy(["garden", "nedrag"], rows) == 0.5
    assert char_similarity(["GARDEN", "nedrag"], rows) == 1.0
    assert 0.5 < char_similarity(["GARDEN", "nedrgg"], rows) < 1.0


def test_examples_are_the_demo_data_and_configs():
    from edgepeft.train.run_config import load_run_config

    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo_base

    for path, text in make_demo_base.example_files().items():
        assert (REPO / "examples" / "tasks" / path).read_text() == text, f"rerun make_demo_base.py --examples-only ({path})"
    files = {"reverse": "train_demo_reverse_lora.toml", "upper": "train_demo_upper_prompt.toml"}
    for spec in DEMO_ADAPTERS:
        config = load_run_config(REPO / "examples" / files[spec.name])
        assert config.method == spec.method and config.adapter == spec.name
        assert config.model == str(BASE_DIR)
        # Only how often it logs to disk differs (TOML has no "none").
        assert dataclasses.replace(config.train, eval_every=None, save_every=None) == spec.train


@pytest.fixture(scope="module")
def base():
    from edgepeft.base import load_base

    return load_base(BASE_DIR, quant="none")


def test_shipped_base_is_small_and_every_character_is_one_token(base):
    model, tokenizer = base
    size = sum(f.stat().st_size for f in BASE_DIR.iterdir())
    assert size < 4 * 2**20
    text = "upper: garden -> GARDEN"
    assert len(tokenizer(text).input_ids) == len(text)
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_shipped_base_does_the_operations_it_was_taught(base):
    """Told the instruction word, the base answers held-out words; without it, it does not
    do the demo tasks (that is what the adapters are for)."""
    import torch

    model, tokenizer = base
    words = random.Random(0).sample(sorted(corpus.HELD_OUT), 12)

    def answer(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=2)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    for op, rule in corpus.OPERATIONS.items():
        hits = sum(answer(f"{op}: {w} ->") == rule(w) for w in words)
        assert hits >= 10, f"{op}: {hits}/12"
    for task, rule in corpus.TASKS.items():
        assert sum(answer(f"{w} ->") == rule(w) for w in words) <= 2, task


def test_demo_refuses_a_folder_that_holds_other_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert cli(["demo", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_quick_demo_trains_exports_and_switches_adapters(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "demo_report.json").read_text())

    export = out / "export"
    assert (export / "model.onnx").is_file() and (export / "edgepeft.json").is_file()
    assert len(list((export / "adapters").iterdir())) >= 2  # one file per adapter (+ sidecars)
    for adapter in report["adapters"]:
        assert Path(adapter["loss_plot"]).is_file()
        # A short run: the answers move towards the references (exact matches need the
        # full schedule for the LoRA, see the README's numbers).
        assert adapter["chars_after"] > adapter["chars_before"] + 0.1, adapter
    upper = next(a for a in report["adapters"] if a["name"] == "upper")
    assert upper["accuracy_after"] > upper["accuracy_before"], upper
    # The same prompt, three answers: each adapter changes what the base says.
    for name in ("reverse", "upper"):
        assert any(row[name] != row["base"] for row in report["answers"]), name
    assert report["switch_ms"] > 0 and report["decode_tok_s"] > 0
    assert set(report["load_ms"]) == {"reverse", "upper"}
    assert report["verify"]["graphs"]  # ORT vs PyTorch was measured
    for expected in ("before", "after", "device int4", "Adapter switch", "tok/s", "verify", "Loss plots"):
        assert expected in printed
