"""Exact resume: an interrupted or crashed run, resumed, gives the unbroken run's losses bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from edgepeft.adapters.inject import add_adapter
from edgepeft.adapters.peft_format import WEIGHTS_FILE
from edgepeft.base import load_base
from edgepeft.config import LoraConfig, TrainConfig
from edgepeft.train import train
from edgepeft.train.checkpoint import read_checkpoint
from edgepeft.train.report import read_metrics

WORDS = ["hello", "dog", "cat", "house", "water", "bread", "night", "sun", "moon", "tree", "book", "red"]
ROWS = [{"prompt": f"translate to french: {w} ->", "completion": f" {w[::-1]}"} for w in WORDS] * 2
# Dropout > 0 makes every step draw from the global RNG: resuming must restore it.
DROPOUT = LoraConfig(r=4, dropout=0.1)
CONFIG = TrainConfig(
    max_steps=12, lr=1e-2, warmup_steps=2, batch_size=4, max_seq_len=32, val_fraction=0.25,
    eval_every=3, save_every=4, quiet=True,
)


def run(tiny_dir, output_dir, adapter=DROPOUT, config=CONFIG, hook=None, **kwargs):
    model, tok = load_base(tiny_dir("llama"), quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, adapter)
    if hook is not None:
        model.register_forward_hook(hook)
    torch.manual_seed(1234)  # a resumed run must not depend on the RNG it starts with
    return train(model, tok, ROWS, config, output_dir, **kwargs)


def assert_same_run(resumed, reference):
    assert resumed.steps == reference.steps
    assert resumed.train_losses == reference.train_losses  # exact, not approximate
    assert resumed.val_losses == reference.val_losses
    assert resumed.best_val_loss == reference.best_val_loss
    mine = load_file(str(resumed.last_adapter_dir / WEIGHTS_FILE))
    theirs = load_file(str(reference.last_adapter_dir / WEIGHTS_FILE))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    train_steps = [r["step"] for r in read_metrics(resumed.metrics_path) if r["kind"] == "train"]
    assert train_steps == list(range(1, reference.steps + 1)), "every step logged once"


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    return run(tiny_dir, tmp_path_factory.mktemp("reference"))


def test_reference_run_is_deterministic_and_dropout_matters(tiny_dir, tmp_path, reference):
    again = run(tiny_dir, tmp_path / "again")
    assert again.train_losses == reference.train_losses
    other_seed = run(tiny_dir, tmp_path / "seed", config=dataclasses.replace(CONFIG, seed=1))
    no_dropout = run(tiny_dir, tmp_path / "nodrop", adapter=LoraConfig(r=4))
    assert other_seed.train_losses != reference.train_losses
    assert no_dropout.train_losses != reference.train_losses


def test_stopped_run_resumes_bit_identically(tiny_dir, tmp_path, reference):
    first = run(tiny_dir, tmp_path, _stop_after_steps=5)
    assert first.interrupted and first.steps == 5
    assert first.train_losses == reference.train_losses[:5]
    assert read_checkpoint(tmp_path).step == 5
    resumed = run(tiny_dir, tmp_path, resume=True)
    assert not resumed.interrupted
    assert_same_run(resumed, reference)


def test_8bit_optimizer_state_resumes_bit_identically(tiny_dir, tmp_path):
    adapter = LoraConfig(r=64, dropout=0.1, target_modules=("q_proj", "v_proj"))  # 8-bit state
    config = dataclasses.replace(CONFIG, optimizer="adamw8bit", max_steps=8)
    reference = run(tiny_dir, tmp_path / "ref", adapter=adapter, config=config)
    run(tiny_dir, tmp_path / "run", adapter=adapter, config=config, _stop_after_steps=3)
    resumed = run(tiny_dir, tmp_path / "run", adapter=adapter, config=config, resume=True)
    assert_same_run(resumed, reference)


def test_crash_resumes_from_the_last_checkpoint(tiny_dir, tmp_path, reference):
    calls = []

    def crash_at_step_7(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) == 7:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_dir, tmp_path, hook=crash_at_step_7)
    assert read_checkpoint(tmp_path).step == 4  # save_every=4
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 6
    resumed = run(tiny_dir, tmp_path, resume=True)
    assert_same_run(resumed, reference)


def test_sigterm_finishes_the_step_saves_and_returns(tiny_dir, tmp_path, reference):
    calls = []

    def terminate_during_step_3(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    first = run(tiny_dir, tmp_path, hook=terminate_during_step_3)
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler is put back"
    assert first.interrupted and first.steps == 3 and read_checkpoint(tmp_path).step == 3
    resumed = run(tiny_dir, tmp_path, resume=True)
    assert_same_run(resumed, reference)


def test_resume_refuses_a_changed_config(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path, _stop_after_steps=2)
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.01 -> 0.02\)"):
        run(tiny_dir, tmp_path, config=dataclasses.replace(CONFIG, lr=2e-2), resume=True)
    quieter = dataclasses.replace(CONFIG, log_every=3, save_every=5)  # harmless changes
    assert run(tiny_dir, tmp_path, config=quieter, resume=True).steps == 12


CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from edgepeft.adapters.inject import add_adapter
    from edgepeft.base import load_base
    from edgepeft.config import LoraConfig, TrainConfig
    from edgepeft.train import train

    tiny, out, rows, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    model, tok = load_base(tiny, quant="nf4")
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, dropout=0.1))
    model.register_forward_hook(lambda *args: time.sleep(0.1))  # slow enough to interrupt
    result = train(model, tok, rows, TrainConfig(**config), out)
    print(json.dumps({"steps": result.steps, "interrupted": result.interrupted}))
    """
)


def test_sigint_to_a_training_process_then_resume(tiny_dir, tmp_path, reference):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    args = [str(tiny_dir("llama")), str(out), json.dumps(ROWS), json.dumps(dataclasses.asdict(CONFIG))]
    child = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["interrupted"] and 2 <= report["steps"] < CONFIG.max_steps
    assert read_checkpoint(out).step == report["steps"]

    resumed = run(tiny_dir, out, resume=True)
    assert_same_run(resumed, reference)
