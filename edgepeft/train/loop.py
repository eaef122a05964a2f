"""The training loop: one adapter over a frozen base, the same code on CPU and CUDA.

    prepare        data ──prepare_data──► train / val examples; the memory plan (max_memory)
    start          adapter_parameters(name) ──► AdamW (torch, or bitsandbytes 8-bit) + LambdaLR
                   resume ──read_checkpoint──► parameters, optimizer, scheduler, RNGs, sampler,
                   metrics so far (else every RNG seeded)
    open_outputs   train_config.json, metrics.jsonl, progress bar, peak meter
    each optimizer step:
        train_step     grad_accum micro-batches ──forward (autocast)──► Σ token CE / label
                       tokens of ALL of them ──backward──► clip ──► optimizer ──► scheduler
        log_step ──► evaluate_step (val loss, perplexity; best adapter) ──► save_checkpoint
            ──► stop?
    finish         last adapter, summary.json, loss_curves.png

Under torchrun (or any initialised process group) the same loop runs data-parallel:
each rank trains on its slice of every batch and gradients are summed across ranks
before the step (edgepeft/train/distributed.py); only rank 0 writes files.

SIGINT / SIGTERM: the current optimizer step finishes, a checkpoint is written, and
`train` *returns* a TrainResult with `interrupted=True` (it does not raise); a second
SIGINT raises KeyboardInterrupt at once. An exception leaves the last checkpoint,
and `resume=True` continues from it with the same losses an unbroken run gets.

The steps are train/steps.py; the loss is train/loss.py, the optimizer and its
schedule train/optim.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgepeft.config import TrainConfig
from edgepeft.train.checkpoint import CHECKPOINT_DIR
from edgepeft.train.data import DataReport
from edgepeft.train.loss import (  # noqa: F401 - re-exported: train()'s pieces, as before
    accumulate_gradients,
    autocast,
    evaluate_loss,
    input_device,
    resolve_precision,
    token_loss_sum,
)
from edgepeft.train.optim import lr_factor, make_optimizer, total_steps  # noqa: F401
from edgepeft.train.report import CONFIG_FILE, METRICS_FILE, PLOT_FILE, SUMMARY_FILE
from edgepeft.train.steps import (
    BEST_DIR,
    LAST_DIR,
    Run,
    RunState,
    StopOnSignal,
    checkpoint_due,
    enable_checkpointing,
    evaluate_step,
    evaluation_due,
    finish,
    log_step,
    open_outputs,
    prepare,
    save_checkpoint,
    start,
    stopped_message,
    train_step,
)


@dataclass(frozen=True)
class TrainResult:
    """What `train` did and where it put things."""

    steps: int
    """Optimizer steps done (over all sessions of a resumed run)."""
    total_steps: int
    final_train_loss: float | None
    """Loss of the last step (mean over its label tokens); None when no step ran."""
    best_val_loss: float | None
    best_step: int | None
    best_adapter_dir: Path | None
    """PEFT folder of the adapter at its best validation loss; None without validation."""
    last_adapter_dir: Path
    metrics_path: Path
    plot_path: Path
    summary_path: Path
    config_path: Path
    checkpoint_dir: Path
    tokens_per_s: float
    """Tokens (padding excluded) per second of training steps in this session."""
    seconds: float
    """Wall time of this call."""
    peak_tensor_bytes: int
    """Peak of live tensor bytes, what the memory planner estimates (`reports.PeakMeter`:
    CUDA's peak allocation, on CPU the metered first steps)."""
    planned_peak_bytes: int | None
    """The memory planner's peak for this run (None where it has no model for it)."""
    peak_rss_bytes: int
    """The process's peak resident set: tensors plus Python, libraries, allocator caching
    and what loading the model left behind."""
    trainable_params: int
    train_losses: tuple[float, ...]
    """Loss of every optimizer step, step 1 first."""
    val_losses: tuple[tuple[int, float], ...]
    """(step, validation loss) of every evaluation."""
    interrupted: bool = False
    """Stopped by SIGINT/SIGTERM; the checkpoint lets `resume=True` continue."""
    stopped_early: bool = False
    data_report: DataReport | None = None


def train(
    model: nn.Module,
    tokenizer,
    data,
    config: TrainConfig = TrainConfig(),  # noqa: B008 - frozen, so one shared default is safe
    output_dir: str | Path = "runs/x",
    *,
    adapter: str | None = None,
    resume: bool = False,
    max_memory=None,
    _stop_after_steps: int | None = None,
) -> TrainResult:
    """Train one adapter of `model` (the base stays frozen) and write a run folder.

    Args:
        model: A model with the adapter added (`edgepeft.add_adapter`).
        tokenizer: Its tokenizer (for chat rows it needs a chat template).
        data: A .jsonl / .txt path or a list of row dicts (see `edgepeft.train.data`).
        config: How to train.
        output_dir: Gets train_config.json, metrics.jsonl, loss_curves.png, summary.json,
            best/ and last/ (PEFT adapter folders) and checkpoint/.
        adapter: The adapter to train; default the active one.
        resume: Continue from `output_dir/checkpoint` when there is one.
        max_memory: A budget for the step's live tensors, checked by the memory planner
            (`edgepeft.train.memory.check_fits`, which says what the process adds).
        _stop_after_steps: Test hook: behave as if SIGINT arrived during this step.

    Returns:
        A TrainResult; `interrupted=True` when a signal (or the hook) stopped the run.

    Raises:
        FileExistsError: `output_dir` holds a checkpoint and `resume` is False.
    """
    started = time.perf_counter()
    run = prepare(
        model, tokenizer, data, config, output_dir,
        adapter=adapter, resume=resume, max_memory=max_memory,
    )  # fmt: skip
    opt, state = start(run)
    outputs = open_outputs(run, state)
    was_training = model.training
    disable_checkpointing = enable_checkpointing(model) if config.gradient_checkpointing else None
    try:
        with StopOnSignal() as stop:
            while state.step < run.total and not state.saved["stopped_early"]:
                stats = train_step(run, opt, outputs.meter, step=state.step + 1)
                state.step += 1
                log_step(run, opt, state, outputs, stats)
                if evaluation_due(run, state.step):
                    evaluate_step(run, state, outputs)
                asked = run.ddp.any(stop.received is not None) or state.step == _stop_after_steps
                stopping = state.step < run.total and not state.saved["stopped_early"]
                state.interrupted = asked and stopping
                if checkpoint_due(run, state):
                    save_checkpoint(run, opt, state)
                if state.interrupted:
                    outputs.progress.write(stopped_message(run, state, stop.received))
                    break
    finally:
        outputs.close()
        model.train(was_training)
        if disable_checkpointing is not None:
            disable_checkpointing()
    summary = finish(run, state, outputs.meter, started)
    return result_of(run, state, summary)


def result_of(run: Run, state: RunState, summary: dict[str, Any]) -> TrainResult:
    """The TrainResult of a finished (or stopped) run, from its `finish` summary."""
    saved, out = state.saved, run.output_dir
    return TrainResult(
        steps=state.step,
        total_steps=run.total,
        final_train_loss=summary["final_train_loss"],
        best_val_loss=saved["best_val_loss"],
        best_step=saved["best_step"],
        best_adapter_dir=out / BEST_DIR if saved["best_step"] is not None else None,
        last_adapter_dir=out / LAST_DIR,
        metrics_path=out / METRICS_FILE,
        plot_path=out / PLOT_FILE,
        summary_path=out / SUMMARY_FILE,
        config_path=out / CONFIG_FILE,
        checkpoint_dir=out / CHECKPOINT_DIR,
        tokens_per_s=summary["tokens_per_s"],
        seconds=summary["seconds"],
        peak_tensor_bytes=summary["peak_tensor_bytes"],
        planned_peak_bytes=run.planned_peak,
        peak_rss_bytes=summary["peak_rss_bytes"],
        trainable_params=summary["trainable_params"],
        train_losses=tuple(saved["train_losses"]),
        val_losses=tuple((int(s), float(v)) for s, v in saved["val_losses"]),
        interrupted=state.interrupted,
        stopped_early=saved["stopped_early"],
        data_report=run.data.report,
    )


__all__ = [
    "BEST_DIR",
    "LAST_DIR",
    "TrainResult",
    "accumulate_gradients",
    "autocast",
    "enable_checkpointing",
    "evaluate_loss",
    "input_device",
    "lr_factor",
    "make_optimizer",
    "resolve_precision",
    "result_of",
    "token_loss_sum",
    "total_steps",
    "train",
]
