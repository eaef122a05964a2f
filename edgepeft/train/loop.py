"""The training loop: one adapter over a frozen base, the same code on CPU and CUDA.

    data ──prepare_data──► train / val examples
    adapter_parameters(name) ──► AdamW (torch, or bitsandbytes 8-bit) + LambdaLR (warmup, decay)
    resume ──read_checkpoint──► parameters, optimizer, scheduler, RNGs, sampler, metrics so far
    each optimizer step:
        grad_accum micro-batches ──forward (autocast)──► Σ token CE / label tokens of ALL of them
            ──backward──► clip ──► optimizer.step ──► scheduler.step
        ──► log ──► eval (val loss, perplexity; best adapter) ──► checkpoint ──► stop?
    ──► last adapter, summary.json, loss_curves.png

Under torchrun (or any initialised process group) the same loop runs data-parallel:
each rank trains on its slice of every batch and gradients are summed across ranks
before the step (edgepeft/train/distributed.py); only rank 0 writes files.

SIGINT / SIGTERM: the current optimizer step finishes, a checkpoint is written, and
`train` *returns* a TrainResult with `interrupted=True` (it does not raise); a second
SIGINT raises KeyboardInterrupt at once. An exception leaves the last checkpoint,
and `resume=True` continues from it with the same losses an unbroken run gets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.adapters.inject import (
    active_adapter,
    adapter_parameters,
    list_adapters,
    set_adapter,
)
from edgepeft.base import base_info
from edgepeft.config import TrainConfig
from edgepeft.train import distributed
from edgepeft.train import report as reports
from edgepeft.train.checkpoint import (
    CHECKPOINT_DIR,
    find_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from edgepeft.train.data import (
    IGNORE,
    Batch,
    DataReport,
    EpochSampler,
    Example,
    collate,
    examples_fingerprint,
    pad_id_of,
    prepare_data,
)

log = logging.getLogger("edgepeft")

BEST_DIR = "best"
LAST_DIR = "last"
# Changing these between a run and its resumption does not change the numbers.
_RESUMABLE_CHANGES = frozenset({"quiet", "log_every", "save_every"})


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


# ---------------------------------------------------------------- pieces


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp32" on CPU, "bf16" (or "fp16" without bf16 support) on CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (the adapter is on {device}); use 'bf16' or 'fp32'"
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def total_steps(config: TrainConfig, train_examples: int) -> int:
    """Optimizer steps of the run: `max_steps`, else `epochs` passes over the examples."""
    if config.max_steps is not None:
        return config.max_steps
    micro_batches = math.ceil(train_examples / config.batch_size)
    return max(1, math.ceil(config.epochs * micro_batches / config.grad_accum))


def lr_factor(total: int, warmup: int, kind: str) -> Callable[[int], float]:
    """LambdaLR factor for 0-based step s: linear warmup, then cosine/linear decay or constant.

    Warmup gives (s + 1) / (warmup + 1), so no step runs at lr 0; the decay reaches
    0 one step after the last, so the last step still learns.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        done = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def make_optimizer(
    params: Sequence[nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """torch AdamW, or bitsandbytes' AdamW8bit / PagedAdamW8bit (paged only on CUDA)."""
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    if config.optimizer == "paged_adamw8bit" and device.type == "cuda":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    if config.optimizer == "paged_adamw8bit":
        log.warning("paged_adamw8bit pages to CUDA unified memory; on %s using adamw8bit", device)
    return bnb.optim.AdamW8bit(params, **kwargs)


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


def token_loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's label tokens (a 0-d fp32 tensor)."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = output.logits  # (B, T, V)
    # Position t predicts token t+1. Shifting the labels (the last position gets IGNORE)
    # rather than slicing the logits keeps the reshape a view: no (B, T-1, V) copy
    # forward, and no zero-filled (B, T, V) gradient to scatter it into backward.
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    precision: str = "fp32",
    scaler=None,
    label_tokens: int | None = None,
) -> float:
    """Backward over all micro-batches as if they were one batch; returns its mean token loss.

    Each micro-batch's summed loss is divided by the label tokens of *all* of them,
    so 2 micro-batches of 2 rows give the gradient of one batch of 4 rows.
    `label_tokens` overrides that count: a data-parallel rank divides by the label
    tokens of the whole global batch, so the ranks' gradients (and losses) add up.
    """
    device = input_device(model)
    if label_tokens is None:
        label_tokens = sum(b.label_tokens for b in micro_batches)
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast(device, precision):
            part = token_loss_sum(model, batch)
        loss = part / label_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += part.detach()
    return float(loss_sum / label_tokens)


def _optimizer_step(params, optimizer, scheduler, scaler, max_grad_norm) -> tuple[float, float | None]:
    """Clip, step, advance the schedule, clear the gradients; returns (lr used, grad norm)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> tuple[float, int]:
    """(mean loss per label token, label tokens) of `examples`, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = input_device(model)
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id).to(device)
            with autocast(device, precision):
                total += token_loss_sum(model, batch).double().cpu()
            tokens += batch.label_tokens
    finally:
        model.train(was_training)
    return float(total / max(tokens, 1)), tokens


class _StopOnSignal:
    """SIGINT/SIGTERM set `received`; the loop stops after its step. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _named_parameters(model: nn.Module, params: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """The adapter's parameters under their names in the model (stable across runs)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names.get(id(p), f"unregistered.{i}"): p for i, p in enumerate(params)}


def _check_memory(
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
    import importlib

    try:
        memory = importlib.import_module("edgepeft.train.memory")
    except ModuleNotFoundError as e:
        if e.name != "edgepeft.train.memory":
            raise
        return None
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
        return memory.check_fits(model.config, **args, max_memory=max_memory).total
    try:
        return memory.estimate_memory(model.config, **args).total
    except ValueError:  # an architecture or method the planner cannot size: no plan to show
        return None


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, data_id: str, name: str, directory) -> None:
    now = _config_dict(config)
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != now[k])
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


# ---------------------------------------------------------------- train


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
            (`edgepeft.train.memory.check_fits`, which says what the process adds) when
            this install has it.
        _stop_after_steps: Test hook: behave as if SIGINT arrived during this step.

    Returns:
        A TrainResult; `interrupted=True` when a signal (or the hook) stopped the run.

    Raises:
        FileExistsError: `output_dir` holds a checkpoint and `resume` is False.
    """
    from edgepeft.adapters.peft_format import save_adapter

    started = time.perf_counter()
    ddp = distributed.current()
    name = _adapter_to_train(model, adapter)
    if config.gradient_checkpointing and list_adapters(model)[name].peft_type == "PREFIX_TUNING":
        raise ValueError(
            f"adapter {name!r} is prefix tuning, whose keys and values enter every layer as a "
            "cache, and transformers drops caches in checkpointed layers; set "
            "gradient_checkpointing=False (or train LoRA / prompt tuning with it)"
        )
    set_adapter(model, name)  # only this adapter's parameters require grad
    params = adapter_parameters(model, name)
    named = _named_parameters(model, params)
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
    train_set, val_set = prepared.train, prepared.val
    data_id = examples_fingerprint(train_set, val_set)
    total = total_steps(config, len(train_set))
    pad_id = pad_id_of(tokenizer)
    longest = max(len(e.input_ids) for e in train_set)
    planned_peak = _check_memory(
        model, name, config, seq_len=longest, world_size=ddp.world_size, precision=precision,
        device=device, max_memory=max_memory,
        padding=len({len(e.input_ids) for e in train_set}) > 1,  # collate pads unequal rows
    )  # fmt: skip

    optimizer = make_optimizer(params, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(total, config.warmup_steps, config.scheduler)
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    sampler = EpochSampler(len(train_set), config.batch_size, config.seed)
    state: dict[str, Any] = {
        "train_losses": [],
        "val_losses": [],
        "records": [],
        "best_val_loss": None,
        "best_step": None,
        "bad_evals": 0,
        "stopped_early": False,
    }
    if checkpoint is not None:
        _check_resumable(checkpoint.progress, config, data_id, name, checkpoint.directory)
        restore_checkpoint(
            checkpoint, parameters=named, optimizer=optimizer, scheduler=scheduler, scaler=scaler
        )
        sampler.load_state_dict(checkpoint.progress["sampler"])
        state.update({k: checkpoint.progress[k] for k in state})
    else:
        _seed_everything(config.seed)
    ddp.broadcast_parameters(params)  # every rank starts from rank 0's adapter
    step = checkpoint.step if checkpoint is not None else 0

    if ddp.is_main:
        reports.write_json(
            output_dir / reports.CONFIG_FILE, {**_config_dict(config), "precision": precision}
        )
    metrics = reports.MetricsLog(output_dir / reports.METRICS_FILE, state["records"]) if ddp.is_main else None
    progress = reports.Progress(total, step, config.quiet or not ddp.is_main)
    for data_report in (prepared.report, prepared.val_report):
        if data_report is not None:
            progress.write(f"data: {data_report}")
    if checkpoint is not None:
        progress.write(f"resuming {checkpoint.directory} at step {step}")
    meter = reports.PeakMeter(device)

    def record(entry: dict[str, Any]) -> None:
        state["records"].append(entry)
        if metrics is not None:
            metrics.write(entry)

    def save_checkpoint() -> None:
        if not ddp.is_main:
            return
        write_checkpoint(
            output_dir,
            step=step,
            parameters=named,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            progress={
                **state,
                "sampler": sampler.state_dict(),
                "config": _config_dict(config),
                "data": data_id,
                "adapter": name,
                "total_steps": total,
            },
        )

    was_training = model.training
    disable_checkpointing = enable_checkpointing(model) if config.gradient_checkpointing else None
    train_seconds, train_tokens = 0.0, 0
    interrupted = False
    try:
        with _StopOnSignal() as stop:
            while step < total and not state["stopped_early"]:
                tick = time.perf_counter()
                model.train()
                # The sampler's global batches, identical on every rank; each rank trains
                # on its shard and divides by the label tokens of the whole step.
                rows = [[train_set[i] for i in sampler.next_batch()] for _ in range(config.grad_accum)]
                label_tokens = sum(e.label_tokens for part in rows for e in part)
                micro = [collate(part, pad_id) for part in map(ddp.shard, rows) if part]
                with meter.step():
                    loss_value = accumulate_gradients(model, micro, precision, scaler, label_tokens)
                    loss_value = ddp.reduce_gradients(params, loss_value)
                    lr, grad_norm = _optimizer_step(params, optimizer, scheduler, scaler, config.max_grad_norm)
                step += 1

                state["train_losses"].append(loss_value)
                tokens = sum(len(e.input_ids) for part in rows for e in part)  # all ranks
                train_tokens += tokens
                train_seconds += time.perf_counter() - tick
                tokens_per_s = train_tokens / max(train_seconds, 1e-9)
                memory = reports.memory_in_use(device)
                if step % config.log_every == 0 or step == total:
                    record({
                        "kind": "train", "step": step, "epoch": round(sampler.progress, 4),
                        "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                        "tokens_per_s": tokens_per_s, "memory_bytes": memory,
                    })
                progress.update(loss_value, lr, tokens_per_s, memory)

                if val_set and ((config.eval_every and step % config.eval_every == 0) or step == total):
                    val_loss, val_tokens = ddp.combine_mean(*evaluate_loss(
                        model, ddp.shard(val_set), batch_size=config.batch_size, pad_id=pad_id,
                        precision=precision,
                    ))  # fmt: skip
                    improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
                    if improved:
                        state.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
                        if ddp.is_main:
                            save_adapter(model, output_dir / BEST_DIR, name)
                    else:
                        state["bad_evals"] += 1
                    patience = config.early_stopping_patience
                    if patience is not None and state["bad_evals"] >= patience:
                        state["stopped_early"] = True
                        progress.write(f"early stopping at step {step}: {patience} evals without improvement")
                    state["val_losses"].append([step, val_loss])
                    record({
                        "kind": "eval", "step": step, "val_loss": val_loss,
                        "val_perplexity": math.exp(min(val_loss, 700.0)), "val_tokens": val_tokens,
                        "best_val_loss": state["best_val_loss"],
                    })

                asked = ddp.any(stop.received is not None) or step == _stop_after_steps
                interrupted = asked and step < total and not state["stopped_early"]
                due = config.save_every is not None and step % config.save_every == 0
                if due or interrupted or step == total or state["stopped_early"]:
                    save_checkpoint()
                if interrupted:
                    progress.write(
                        f"stopped by {stop.received or 'request'} after step {step}; checkpoint in "
                        f"{output_dir / CHECKPOINT_DIR} (continue with resume=True)"
                    )
                    break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        model.train(was_training)
        if disable_checkpointing is not None:
            disable_checkpointing()

    last_dir = output_dir / LAST_DIR
    if ddp.is_main:
        save_adapter(model, last_dir, name)
    losses = state["train_losses"]
    summary = {
        "adapter": name,
        "steps": step,
        "total_steps": total,
        "interrupted": interrupted,
        "stopped_early": state["stopped_early"],
        "final_train_loss": losses[-1] if losses else None,
        "best_val_loss": state["best_val_loss"],
        "best_val_perplexity": (
            math.exp(min(state["best_val_loss"], 700.0)) if state["best_val_loss"] is not None else None
        ),
        "best_step": state["best_step"],
        "trainable_params": sum(p.numel() for p in params),
        "seconds": time.perf_counter() - started,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0,
        "peak_tensor_bytes": meter.tensors(),
        "planned_peak_bytes": planned_peak,
        "peak_rss_bytes": reports.peak_rss(),
        "device": str(device),
        "precision": precision,
        "data": prepared.report.to_dict(),
        "val_data": prepared.val_report.to_dict() if prepared.val_report else None,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
        "output_dir": str(output_dir),
        "world_size": ddp.world_size,
    }
    plot_path, summary_path = output_dir / reports.PLOT_FILE, output_dir / reports.SUMMARY_FILE
    if ddp.is_main:
        reports.plot_losses(
            plot_path,
            list(enumerate(losses, start=1)),
            [tuple(v) for v in state["val_losses"]],
            title=f"adapter {name!r}",
        )
        reports.write_json(summary_path, summary)
        if not config.quiet:
            print(reports.format_summary(summary))
    ddp.barrier()  # every rank returns after rank 0's files (checkpoint included) are written
    best_dir = output_dir / BEST_DIR
    return TrainResult(
        steps=step,
        total_steps=total,
        final_train_loss=summary["final_train_loss"],
        best_val_loss=state["best_val_loss"],
        best_step=state["best_step"],
        best_adapter_dir=best_dir if state["best_step"] is not None else None,
        last_adapter_dir=last_dir,
        metrics_path=output_dir / reports.METRICS_FILE,
        plot_path=plot_path,
        summary_path=summary_path,
        config_path=output_dir / reports.CONFIG_FILE,
        checkpoint_dir=output_dir / CHECKPOINT_DIR,
        tokens_per_s=summary["tokens_per_s"],
        seconds=summary["seconds"],
        peak_tensor_bytes=summary["peak_tensor_bytes"],
        planned_peak_bytes=planned_peak,
        peak_rss_bytes=summary["peak_rss_bytes"],
        trainable_params=summary["trainable_params"],
        train_losses=tuple(losses),
        val_losses=tuple((int(s), float(v)) for s, v in state["val_losses"]),
        interrupted=interrupted,
        stopped_early=state["stopped_early"],
        data_report=prepared.report,
    )


def _adapter_to_train(model: nn.Module, adapter: str | None) -> str:
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
