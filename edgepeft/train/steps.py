"""The named steps of `train` (train/loop.py), in the order the loop takes them.

    prepare          the adapter to train, its parameters, precision, data, steps, memory plan
    start            optimizer + schedule + sampler; a checkpoint restored, or every RNG seeded
    open_outputs     train_config.json, metrics.jsonl, the progress bar, the peak meter
    each optimizer step:
        train_step       grad_accum micro-batches ──► backward ──► (all-reduce) ──► update
                         (DyLoRA: the whole step at one rank drawn from (seed, step))
        log_step         loss, lr, tokens/s ──► metrics.jsonl, progress bar
        evaluate_step    val loss, perplexity ──► best/ adapter, early stopping
        save_checkpoint  parameters, optimizer, schedule, RNGs, sampler, progress (rank 0)
    finish           last/ adapter, loss_curves.png, summary.json

`Run` is what a run is about (fixed from start to end), `Optimization` what updates the
adapter, `Outputs` where progress goes, and `RunState` what changes step by step: its
`saved` dict is exactly what a checkpoint stores and a resumption restores.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepeft.adapters.importance import choose_mask, mask_pending
from edgepeft.adapters.inject import active_adapter, adapter_parameters, list_adapters, set_adapter
from edgepeft.adapters.lora import sampled_rank
from edgepeft.adapters.peft_format import save_adapter
from edgepeft.base import base_info
from edgepeft.config import TrainConfig
from edgepeft.train.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    find_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from edgepeft.train.data import (
    EpochSampler,
    PreparedData,
    collate,
    examples_fingerprint,
    pad_id_of,
    prepare_data,
)
from edgepeft.train.distributed import Context, current
from edgepeft.train.loss import (
    accumulate_gradients,
    autocast,
    evaluate_loss,
    input_device,
    resolve_precision,
    token_loss_sum,
)
from edgepeft.train.memory import check_fits, estimate_memory
from edgepeft.train.optim import lr_factor, make_optimizer, optimizer_step, total_steps
from edgepeft.train.report import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    PeakMeter,
    Progress,
    format_summary,
    memory_in_use,
    peak_rss,
    plot_losses,
    write_json,
)

BEST_DIR = "best"
LAST_DIR = "last"
RESUMABLE_CHANGES = frozenset({"quiet", "log_every", "save_every"})
"""Config fields that may change between a run and its resumption: they change no number."""


# ---------------------------------------------------------------- what a run is


@dataclass(frozen=True)
class Run:
    """What one `train` call is about, fixed from its start to its end."""

    model: nn.Module
    config: TrainConfig
    name: str
    """The adapter being trained."""
    params: list[nn.Parameter]
    named: dict[str, nn.Parameter]
    """`params` under their names in the model (checkpoint keys)."""
    device: torch.device
    precision: str
    """Resolved: "fp32", "bf16" or "fp16"."""
    output_dir: Path
    checkpoint: Checkpoint | None
    """The checkpoint to resume from (resume=True and there is one)."""
    data: PreparedData
    data_id: str
    """Fingerprint of the token ids: a resumption must see the same ones."""
    total: int
    """Optimizer steps of the whole run."""
    pad_id: int
    planned_peak: int | None
    """The memory planner's peak (None where it has no model for the run)."""
    ddp: Context


@dataclass(frozen=True)
class Optimization:
    """What updates the adapter, and in which order it sees the examples."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    """fp16 only: loss scaling against gradient underflow."""
    sampler: EpochSampler


def new_progress() -> dict[str, Any]:
    """The progress a checkpoint saves, before the first step (key order is the file's)."""
    return {
        "train_losses": [],
        "val_losses": [],
        "records": [],
        "best_val_loss": None,
        "best_step": None,
        "bad_evals": 0,
        "stopped_early": False,
    }


@dataclass
class RunState:
    """What changes as the run goes."""

    saved: dict[str, Any] = field(default_factory=new_progress)
    """Losses, metrics records, best validation loss, early stopping: what a checkpoint keeps."""
    step: int = 0
    train_seconds: float = 0.0
    """Time in training steps of this session (for tokens/s)."""
    train_tokens: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class Outputs:
    """Where a run's progress goes: metrics.jsonl (rank 0), the progress bar, the meter."""

    metrics: MetricsLog | None
    progress: Progress
    meter: PeakMeter

    def record(self, state: RunState, entry: dict[str, Any]) -> None:
        state.saved["records"].append(entry)
        if self.metrics is not None:
            self.metrics.write(entry)

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as the logs see it."""

    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    """Tokens of the step over all ranks, padding excluded."""
    seconds: float


# ---------------------------------------------------------------- prepare and start


def prepare(
    model: nn.Module,
    tokenizer,
    data,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    adapter: str | None,
    resume: bool,
    max_memory,
) -> Run:
    """Check the adapter and the output folder, tokenize the data, plan the memory."""
    ddp = current()
    name = adapter_to_train(model, adapter)
    peft_type = list_adapters(model)[name].peft_type
    if config.gradient_checkpointing and peft_type in ("PREFIX_TUNING", "MAM", "UNIPELT"):
        raise ValueError(
            f"adapter {name!r} holds a prefix (prefix tuning, MAM, UniPELT), whose keys and "
            "values enter every layer as a "
            "cache, and transformers drops caches in checkpointed layers; set "
            "gradient_checkpointing=False (or train LoRA / prompt tuning with it)"
        )
    set_adapter(model, name)  # only this adapter's parameters require grad
    params = adapter_parameters(model, name)
    named = named_parameters(model, params)
    device = params[0].device
    precision = resolve_precision(config.precision, device)
    output_dir = Path(output_dir)
    checkpoint = read_checkpoint(output_dir) if resume else None
    if not resume and find_checkpoint(output_dir) is not None:
        raise FileExistsError(
            f"{output_dir} holds a checkpoint of an earlier run; pass resume=True to continue it, "
            "or pick another output_dir"
        )

    prepared = prepare_data(data, tokenizer, config)
    train_set = prepared.train
    data_id = examples_fingerprint(train_set, prepared.val)
    total = total_steps(config, len(train_set))
    pad_id = pad_id_of(tokenizer)
    if mask_pending(list_adapters(model)[name]):  # before the optimizer: it gets the masked values
        choose_training_mask(model, name, train_set, config, pad_id, precision)
        params = adapter_parameters(model, name)
        named = named_parameters(model, params)
    planned_peak = planned_memory(
        model, name, config, seq_len=max(len(e.input_ids) for e in train_set),
        world_size=ddp.world_size, precision=precision, device=device, max_memory=max_memory,
        padding=len({len(e.input_ids) for e in train_set}) > 1,  # collate pads unequal rows
    )  # fmt: skip
    return Run(
        model=model,
        config=config,
        name=name,
        params=params,
        named=named,
        device=device,
        precision=precision,
        output_dir=output_dir,
        checkpoint=checkpoint,
        data=prepared,
        data_id=data_id,
        total=total,
        pad_id=pad_id,
        planned_peak=planned_peak,
        ddp=ddp,
    )


def start(run: Run) -> tuple[Optimization, RunState]:
    """The optimizer, schedule and sampler, restored from the checkpoint or freshly seeded."""
    config = run.config
    optimizer = make_optimizer(run.params, config, run.device)
    opt = Optimization(
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(run.total, config.warmup_steps, config.scheduler)
        ),
        scaler=torch.amp.GradScaler("cuda") if run.precision == "fp16" else None,
        sampler=EpochSampler(len(run.data.train), config.batch_size, config.seed),
    )
    state = RunState()
    checkpoint = run.checkpoint
    if checkpoint is not None:
        check_resumable(checkpoint.progress, config, run.data_id, run.name, checkpoint.directory)
        restore_checkpoint(
            checkpoint,
            parameters=run.named,
            optimizer=opt.optimizer,
            scheduler=opt.scheduler,
            scaler=opt.scaler,
        )
        opt.sampler.load_state_dict(checkpoint.progress["sampler"])
        state.saved.update({k: checkpoint.progress[k] for k in state.saved})
        state.step = checkpoint.step
    else:
        seed_everything(config.seed)
    run.ddp.broadcast_parameters(run.params)  # every rank starts from rank 0's adapter
    return opt, state


def open_outputs(run: Run, state: RunState) -> Outputs:
    """train_config.json and metrics.jsonl (rank 0), the progress bar, the peak meter."""
    config, out = run.config, run.output_dir
    if run.ddp.is_main:
        write_json(out / CONFIG_FILE, {**config_dict(config), "precision": run.precision})
    metrics = MetricsLog(out / METRICS_FILE, state.saved["records"]) if run.ddp.is_main else None
    progress = Progress(run.total, state.step, config.quiet or not run.ddp.is_main)
    for data_report in (run.data.report, run.data.val_report):
        if data_report is not None:
            progress.write(f"data: {data_report}")
    if run.checkpoint is not None:
        progress.write(f"resuming {run.checkpoint.directory} at step {state.step}")
    return Outputs(metrics, progress, PeakMeter(run.device))


# ---------------------------------------------------------------- each optimizer step


def train_step(run: Run, opt: Optimization, meter: PeakMeter, *, step: int) -> StepStats:
    """Optimizer step `step` (from 1) over `grad_accum` micro-batches, each rank on its shard."""
    tick = time.perf_counter()
    config, ddp, train_set = run.config, run.ddp, run.data.train
    run.model.train()
    # The sampler's global batches, identical on every rank; each rank trains on its
    # shard and divides by the label tokens of the whole step.
    rows = [[train_set[i] for i in opt.sampler.next_batch()] for _ in range(config.grad_accum)]
    label_tokens = sum(e.label_tokens for part in rows for e in part)
    micro = [collate(part, run.pad_id) for part in map(ddp.shard, rows) if part]
    # DyLoRA samples its rank once per optimizer step, for every layer and micro-batch.
    with meter.step(), sampled_rank(run.model, run.name, config.seed, step):
        loss = accumulate_gradients(run.model, micro, run.precision, opt.scaler, label_tokens)
        loss = ddp.reduce_gradients(run.params, loss)
        lr, grad_norm = optimizer_step(
            run.params, opt.optimizer, opt.scheduler, opt.scaler, config.max_grad_norm
        )
    tokens = sum(len(e.input_ids) for part in rows for e in part)  # all ranks
    return StepStats(loss, lr, grad_norm, tokens, time.perf_counter() - tick)


def log_step(
    run: Run, opt: Optimization, state: RunState, outputs: Outputs, stats: StepStats
) -> None:
    """The step's loss into the state; a metrics line every `log_every`; the progress bar."""
    state.saved["train_losses"].append(stats.loss)
    state.train_tokens += stats.tokens
    state.train_seconds += stats.seconds
    tokens_per_s = state.train_tokens / max(state.train_seconds, 1e-9)
    memory = memory_in_use(run.device)
    if state.step % run.config.log_every == 0 or state.step == run.total:
        outputs.record(state, {
            "kind": "train", "step": state.step, "epoch": round(opt.sampler.progress, 4),
            "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "tokens": stats.tokens, "tokens_per_s": tokens_per_s, "memory_bytes": memory,
        })  # fmt: skip
    outputs.progress.update(stats.loss, stats.lr, tokens_per_s, memory)


def evaluation_due(run: Run, step: int) -> bool:
    """Every `eval_every` steps and after the last one, when there is validation data."""
    every = run.config.eval_every
    return bool(run.data.val) and ((bool(every) and step % every == 0) or step == run.total)


def evaluate_step(run: Run, state: RunState, outputs: Outputs) -> None:
    """Validation loss; a better one saves best/, `early_stopping_patience` worse ones stop."""
    config, ddp, saved, step = run.config, run.ddp, state.saved, state.step
    val_loss, val_tokens = ddp.combine_mean(*evaluate_loss(
        run.model, ddp.shard(run.data.val), batch_size=config.batch_size, pad_id=run.pad_id,
        precision=run.precision,
    ))  # fmt: skip
    improved = saved["best_val_loss"] is None or val_loss < saved["best_val_loss"]
    if improved:
        saved.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
        if ddp.is_main:
            save_adapter(run.model, run.output_dir / BEST_DIR, run.name)
    else:
        saved["bad_evals"] += 1
    patience = config.early_stopping_patience
    if patience is not None and saved["bad_evals"] >= patience:
        saved["stopped_early"] = True
        outputs.progress.write(
            f"early stopping at step {step}: {patience} evals without improvement"
        )
    saved["val_losses"].append([step, val_loss])
    outputs.record(state, {
        "kind": "eval", "step": step, "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 700.0)), "val_tokens": val_tokens,
        "best_val_loss": saved["best_val_loss"],
    })  # fmt: skip


def checkpoint_due(run: Run, state: RunState) -> bool:
    """Every `save_every` steps, and whenever the run stops (done, early, interrupted)."""
    every = run.config.save_every
    due = every is not None and state.step % every == 0
    return due or state.interrupted or state.step == run.total or state.saved["stopped_early"]


def save_checkpoint(run: Run, opt: Optimization, state: RunState) -> None:
    """Everything `start` needs to continue bit-exactly (rank 0 writes it)."""
    if not run.ddp.is_main:
        return
    write_checkpoint(
        run.output_dir,
        step=state.step,
        parameters=run.named,
        optimizer=opt.optimizer,
        scheduler=opt.scheduler,
        scaler=opt.scaler,
        progress={
            **state.saved,
            "sampler": opt.sampler.state_dict(),
            "config": config_dict(run.config),
            "data": run.data_id,
            "adapter": run.name,
            "total_steps": run.total,
        },
    )


def stopped_message(run: Run, state: RunState, signal_name: str | None) -> str:
    return (
        f"stopped by {signal_name or 'request'} after step {state.step}; checkpoint in "
        f"{run.output_dir / CHECKPOINT_DIR} (continue with resume=True)"
    )


# ---------------------------------------------------------------- finish


def finish(run: Run, state: RunState, meter: PeakMeter, started: float) -> dict[str, Any]:
    """Save last/, write summary.json and loss_curves.png (rank 0); the summary."""
    saved, data = state.saved, run.data
    if run.ddp.is_main:
        save_adapter(run.model, run.output_dir / LAST_DIR, run.name)
    losses = saved["train_losses"]
    best = saved["best_val_loss"]
    summary = {
        "adapter": run.name,
        "steps": state.step,
        "total_steps": run.total,
        "interrupted": state.interrupted,
        "stopped_early": saved["stopped_early"],
        "final_train_loss": losses[-1] if losses else None,
        "best_val_loss": best,
        "best_val_perplexity": math.exp(min(best, 700.0)) if best is not None else None,
        "best_step": saved["best_step"],
        "trainable_params": sum(p.numel() for p in run.params),
        "seconds": time.perf_counter() - started,
        "tokens_per_s": state.train_tokens / state.train_seconds if state.train_seconds else 0.0,
        "peak_tensor_bytes": meter.tensors(),
        "planned_peak_bytes": run.planned_peak,
        "peak_rss_bytes": peak_rss(),
        "device": str(run.device),
        "precision": run.precision,
        "data": data.report.to_dict(),
        "val_data": data.val_report.to_dict() if data.val_report else None,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "output_dir": str(run.output_dir),
        "world_size": run.ddp.world_size,
    }
    if run.ddp.is_main:
        plot_losses(
            run.output_dir / PLOT_FILE,
            list(enumerate(losses, start=1)),
            [tuple(v) for v in saved["val_losses"]],
            title=f"adapter {run.name!r}",
        )
        write_json(run.output_dir / SUMMARY_FILE, summary)
        if not run.config.quiet:
            print(format_summary(summary))
    run.ddp.barrier()  # every rank returns after rank 0's files (checkpoint included) are written
    return summary


# ---------------------------------------------------------------- pieces


def adapter_to_train(model: nn.Module, adapter: str | None) -> str:
    """`adapter`, or the model's active one; KeyError / ValueError naming what there is."""
    name = adapter or active_adapter(model)
    if name is None:
        raise ValueError(
            "the model has no active adapter to train; add one first with "
            "edgepeft.add_adapter(model, LoraConfig(...)), or pass adapter=<name>"
        )
    if name not in list_adapters(model):
        have = ", ".join(list_adapters(model)) or "none"
        raise KeyError(f"no adapter named {name!r} on this model (adapters: {have})")
    return name


def choose_training_mask(
    model: nn.Module,
    name: str,
    examples: Sequence,
    config: TrainConfig,
    pad_id: int,
    precision: str,
) -> None:
    """Importance-masked selective tuning: the mask from the first training batches in file
    order (not the sampler's), so a resumed run chooses the same mask again."""
    rows = config.batch_size
    count = list_adapters(model)[name].calibration_batches * rows
    batches = [
        collate(examples[i : i + rows], pad_id) for i in range(0, min(count, len(examples)), rows)
    ]
    device = input_device(model)

    def mean_loss(model: nn.Module, batch) -> torch.Tensor:
        batch = batch.to(device)
        with autocast(device, precision):
            return token_loss_sum(model, batch) / max(batch.label_tokens, 1)

    chosen = choose_mask(model, name, batches, loss=mean_loss)
    if not config.quiet:
        kept = sum(chosen.selected.values())
        print(
            f"selective adapter {name!r}: {chosen.score} importance mask keeps {kept} "
            f"{chosen.structure} units (density {chosen.density:.4f})"
        )


def named_parameters(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """The adapter's parameters under their names in the model (stable across runs)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names.get(id(p), f"unregistered.{i}"): p for i, p in enumerate(params)}


def planned_memory(
    model: nn.Module,
    name: str,
    config: TrainConfig,
    *,
    seq_len: int,
    padding: bool,
    world_size: int,
    precision: str,
    device: torch.device,
    max_memory,
) -> int | None:
    """The memory planner's peak for this run (None where it has no model for it);
    with a `max_memory` budget it refuses a run that does not fit (MemoryPlanError)."""
    info = base_info(model)
    args = dict(
        quant=info.quant,
        adapter_config=list_adapters(model)[name],
        optimizer=config.optimizer,
        batch_size=math.ceil(config.batch_size / world_size),  # each rank's shard of a batch
        seq_len=seq_len,
        gradient_checkpointing=config.gradient_checkpointing,
        precision=precision,
        device=device.type,
        double_quant=info.double_quant,
        padding=padding,
    )
    if max_memory is not None:
        return check_fits(model.config, **args, max_memory=max_memory).total
    try:
        return estimate_memory(model.config, **args).total
    except ValueError:  # an architecture or method the planner cannot size: no plan to show
        return None


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check_resumable(
    saved: dict[str, Any], config: TrainConfig, data_id: str, name: str, directory
) -> None:
    """ValueError unless the checkpoint's config (but `RESUMABLE_CHANGES`), data and adapter
    are this run's."""
    now = config_dict(config)
    kept = (k for k in now if k not in RESUMABLE_CHANGES)
    changed = sorted(k for k in kept if saved["config"].get(k) != now[k])
    if changed:
        pairs = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {directory}: the config changed ({pairs}); use the original config, "
            "or start a new run in another output_dir"
        )
    if saved["data"] != data_id:
        raise ValueError(
            f"cannot resume {directory}: the training/validation data differ from the run's "
            "(token ids changed); use the same data and tokenizer, or start a new run"
        )
    if saved["adapter"] != name:
        raise ValueError(
            f"cannot resume {directory}: it trained adapter {saved['adapter']!r}, not {name!r}"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def enable_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Turn on HF activation checkpointing (non-reentrant, so frozen embeddings are fine).

    Returns the function that turns it off again.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; "
            "set gradient_checkpointing=False"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return model.activation_checkpointing_disable
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.gradient_checkpointing_disable


class StopOnSignal:
    """SIGINT/SIGTERM set `received`; the loop stops after its step. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
