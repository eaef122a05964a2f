"""The training loop: every method learns, only adapters move, accumulation, eval, reports."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import edgepeft
from edgepeft.adapters.inject import adapter_parameters, add_adapter
from edgepeft.adapters.layer import base_named_tensors
from edgepeft.adapters.peft_format import WEIGHTS_FILE, load_adapter
from edgepeft.base import load_base
from edgepeft.config import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    TrainConfig,
)
from edgepeft.train import load_rows, tokenize_rows, train
from edgepeft.train.data import collate
from edgepeft.train.loop import accumulate_gradients, evaluate_loss, lr_factor
from edgepeft.train.report import read_metrics

ROWS = [{"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."}] * 16
# Completions of different lengths, so weighting by tokens differs from averaging rows.
UNEVEN = [{"prompt": "translate to french:", "completion": " fox" * (i + 1)} for i in range(8)]
FAST = dict(batch_size=4, max_seq_len=32, val_fraction=0.0, quiet=True, scheduler="constant")


def adapted(tiny_dir, config, quant="nf4", seed=0):
    model, tok = load_base(tiny_dir("llama"), quant=quant)
    torch.manual_seed(seed)
    add_adapter(model, config)
    return model, tok


def snapshot(tensors):
    return {name: t.detach().clone() for name, t in tensors}


def adapter_snapshot(model):
    ids = {id(p) for p in adapter_parameters(model)}
    return snapshot((n, p) for n, p in model.named_parameters() if id(p) in ids)


def base_snapshot(model):
    """The base's weights (quantized ones dequantized), adapter parameters left out."""
    ids = {id(p) for p in adapter_parameters(model)}
    return snapshot((n, t) for n, t in base_named_tensors(model) if id(t) not in ids)


METHODS = {
    "lora-nf4": LoraConfig(r=4),
    "dora-nf4": LoraConfig(r=4, use_dora=True),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
    "prefix-projection": PrefixTuningConfig(num_virtual_tokens=4, projection=True),
    "ia3": IA3Config(),
    "bottleneck": BottleneckConfig(),
    "selective": SelectiveConfig.norms(),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_only_its_tensors_change(tiny_dir, tmp_path, method):
    model, tok = adapted(tiny_dir, METHODS[method])
    base_before = base_snapshot(model)
    adapter_before = adapter_snapshot(model)
    result = train(model, tok, ROWS, TrainConfig(max_steps=6, lr=3e-2, **FAST), tmp_path)

    losses = result.train_losses
    assert len(losses) == 6 and result.steps == 6 and not result.interrupted
    assert losses[-1] < losses[0] - 0.02, losses
    base_after = base_snapshot(model)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "the base moved"
    adapter_after = adapter_snapshot(model)
    unchanged = [k for k in adapter_before if torch.equal(adapter_before[k], adapter_after[k])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"
    assert result.trainable_params == sum(t.numel() for t in adapter_before.values())


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tiny_dir):
    model, tok = adapted(tiny_dir, LoraConfig(r=4, init="random"))
    rows, _ = load_rows(UNEVEN[:4])
    examples = tokenize_rows(rows, tok, TrainConfig())
    params = adapter_parameters(model)

    def grads(micro):
        for p in params:
            p.grad = None
        loss = accumulate_gradients(model, micro)
        return loss, [p.grad.clone() for p in params]

    whole_loss, whole = grads([collate(examples, 0)])
    split_loss, split = grads([collate(examples[:2], 0), collate(examples[2:], 0)])
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(whole, split, strict=True))
    # Averaging each micro-batch on its own would weight the short rows' tokens up.
    _, first = grads([collate(examples[:2], 0)])
    _, second = grads([collate(examples[2:], 0)])
    row_mean = [(a + b) / 2 for a, b in zip(first, second, strict=True)]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(whole, row_mean, strict=True))


def test_grad_accum_2x2_trains_like_batch_4(tiny_dir, tmp_path):
    runs = {}
    for batch, accum in ((4, 1), (2, 2)):
        model, tok = adapted(tiny_dir, LoraConfig(r=4))
        config = TrainConfig(max_steps=4, lr=1e-2, **{**FAST, "batch_size": batch}, grad_accum=accum)
        result = train(model, tok, UNEVEN, config, tmp_path / f"b{batch}")
        runs[batch] = (result.train_losses, adapter_snapshot(model))
    (losses4, tensors4), (losses2, tensors2) = runs[4], runs[2]
    assert losses2 == pytest.approx(losses4, rel=1e-5)
    assert all(torch.allclose(tensors4[k], tensors2[k], atol=1e-6) for k in tensors4)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_trains_with_8bit_state(tiny_dir, tmp_path, optimizer, caplog):
    # r=64 makes lora_A (64 x 64) large enough for bitsandbytes to keep 8-bit state.
    model, tok = adapted(tiny_dir, LoraConfig(r=64, target_modules=("q_proj", "v_proj")))
    with caplog.at_level(logging.WARNING, logger="edgepeft"):
        result = train(model, tok, ROWS, TrainConfig(max_steps=5, lr=1e-2, optimizer=optimizer, **FAST), tmp_path)
    assert result.train_losses[-1] < result.train_losses[0] - 0.02
    state = load_file(str(tmp_path / "checkpoint" / "tensors.safetensors"))
    assert any(k.startswith("optimizer/") and v.dtype == torch.uint8 for k, v in state.items())
    fell_back = [r for r in caplog.records if "paged_adamw8bit" in r.getMessage()]
    assert len(fell_back) == (optimizer == "paged_adamw8bit")


def test_gradient_checkpointing_gives_the_same_losses(tiny_dir, tmp_path):
    losses = {}
    for checkpointing in (False, True):
        model, tok = adapted(tiny_dir, LoraConfig(r=4, dropout=0.1))
        config = TrainConfig(max_steps=3, lr=1e-2, gradient_checkpointing=checkpointing, **FAST)
        losses[checkpointing] = train(model, tok, ROWS, config, tmp_path / str(checkpointing)).train_losses
        checkpointing_now = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert checkpointing_now and not any(checkpointing_now), "train() turns checkpointing off again"
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_prefix_tuning_refuses_gradient_checkpointing_clearly(tiny_dir, tmp_path):
    model, tok = adapted(tiny_dir, PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prefix tuning.*gradient_checkpointing=False"):
        train(model, tok, ROWS, TrainConfig(gradient_checkpointing=True, **FAST), tmp_path)


def test_eval_early_stopping_and_the_best_adapter(tiny_dir, tmp_path):
    # Validation wants another completion than training teaches: val loss soon rises.
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": "the quick brown fox", "completion": " sleeps."}) + "\n" for _ in range(4)))
    model, tok = adapted(tiny_dir, LoraConfig(r=4))
    config = TrainConfig(
        max_steps=40, lr=3e-2, eval_every=2, early_stopping_patience=2, val_data=str(val),
        **{**FAST, "val_fraction": 0.1},
    )
    result = train(model, tok, ROWS, config, tmp_path / "run")

    assert result.stopped_early and result.steps < 40
    val_losses = [v for _, v in result.val_losses]
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    assert result.best_val_loss == val_losses[best] and result.best_step == result.val_losses[best][0]
    assert len(val_losses) - 1 - best == 2, "stops after `patience` evals without improvement"
    assert [s for s, _ in result.val_losses] == list(range(2, result.steps + 1, 2))

    # The best folder holds the adapter as it was at the best step: same val loss.
    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    load_adapter(fresh, result.best_adapter_dir)
    val_examples = tokenize_rows(load_rows(val)[0], tok, config)
    loss, _ = evaluate_loss(fresh, val_examples, batch_size=4, pad_id=0)
    assert loss == pytest.approx(result.best_val_loss, rel=1e-6)


def test_last_adapter_loads_with_load_adapter(tiny_dir, tmp_path):
    model, tok = adapted(tiny_dir, LoraConfig(r=4))
    result = train(model, tok, ROWS, TrainConfig(max_steps=3, lr=1e-2, **FAST), tmp_path)
    trained = adapter_snapshot(model)
    fresh, _ = load_base(tiny_dir("llama"), quant="nf4")
    edgepeft.load_adapter(fresh, result.last_adapter_dir)
    loaded = adapter_snapshot(fresh)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert (result.last_adapter_dir / WEIGHTS_FILE).is_file()
    assert result.best_adapter_dir is None  # no validation set, no best


def test_reports_are_written(tiny_dir, tmp_path, capsys):
    model, tok = adapted(tiny_dir, LoraConfig(r=4))
    config = TrainConfig(max_steps=6, lr=1e-2, eval_every=3, log_every=2, batch_size=4, max_seq_len=32)
    result = train(model, tok, ROWS, config, tmp_path)

    records = read_metrics(result.metrics_path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 2), ("eval", 3), ("train", 4), ("train", 6), ("eval", 6)
    ]
    assert {"loss", "lr", "tokens_per_s", "memory_bytes", "epoch"} <= set(records[0])
    assert records[0]["loss"] == result.train_losses[1]
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(result.summary_path.read_text())
    assert summary["steps"] == 6 and summary["trainable_params"] == result.trainable_params > 0
    assert summary["best_val_loss"] == result.best_val_loss == min(v for _, v in result.val_losses)
    assert summary["peak_tensor_bytes"] > 0 and summary["tokens_per_s"] > 0
    assert summary["data"]["kept"] == 16 and summary["val_examples"] == 2
    saved = json.loads(result.config_path.read_text())
    assert TrainConfig(**saved) == dataclasses.replace(config, precision="fp32")

    printed = capsys.readouterr()
    assert "training done: 6/6 steps" in printed.out and "best val loss" in printed.out

    quiet_model, _ = adapted(tiny_dir, LoraConfig(r=4))
    capsys.readouterr()  # loading the base prints transformers' own progress
    train(quiet_model, tok, ROWS, dataclasses.replace(config, quiet=True), tmp_path / "quiet")
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""


def test_warmup_then_decay_schedules():
    cosine, linear, constant = (lr_factor(10, 2, kind) for kind in ("cosine", "linear", "constant"))
    assert [cosine(s) for s in (0, 1)] == [1 / 3, 2 / 3]
    assert cosine(2) == linear(2) == constant(2) == constant(9) == 1.0
    assert linear(6) == pytest.approx(0.5) and cosine(6) == pytest.approx(0.5)
    assert 0 < cosine(9) < linear(9) < 0.2


def test_clear_errors_for_missing_adapter_and_existing_run(tiny_dir, tmp_path):
    model, tok = load_base(tiny_dir("llama"), quant="nf4")
    with pytest.raises(ValueError, match="no active adapter"):
        train(model, tok, ROWS, TrainConfig(**FAST), tmp_path)
    add_adapter(model, LoraConfig(r=4))
    with pytest.raises(KeyError, match="'other'"):
        train(model, tok, ROWS, TrainConfig(**FAST), tmp_path, adapter="other")
    train(model, tok, ROWS, TrainConfig(max_steps=1, **FAST), tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(model, tok, ROWS, TrainConfig(max_steps=1, **FAST), tmp_path)
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
