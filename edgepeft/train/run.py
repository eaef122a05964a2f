"""Running one run config: load the base, add the adapter, plan memory, train, evaluate.

    run(config)
        distributed.init_from_env ──► checkpoint vs --resume (and the same config)
        ──► check_data (rows read, before any model) ──► load_base (a "tiny:<arch>" model is
            built into output_dir first) ──► add_adapter (seeded by train.seed)
        ──► memory plan (printed; refused over max_memory) ──► run_config.json
        ──► edgepeft.train ──► evaluate (eval set, rank 0) ──► eval.json

The config itself (file, overrides, checks) is train/run_config.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgepeft.adapters.inject import add_adapter, list_adapters
from edgepeft.atomic import atomic_folder
from edgepeft.base import base_info, load_base
from edgepeft.config import PromptTuningConfig
from edgepeft.tiny import save_tiny_model
from edgepeft.train.checkpoint import find_checkpoint
from edgepeft.train.data import check_data, prepare_data
from edgepeft.train.distributed import init_from_env
from edgepeft.train.evaluate import evaluate
from edgepeft.train.loop import TrainResult, train
from edgepeft.train.loss import input_device, resolve_precision
from edgepeft.train.memory import check_fits, estimate_memory
from edgepeft.train.report import write_json
from edgepeft.train.run_config import (
    EVAL_FILE,
    RUN_CONFIG_FILE,
    TINY_PREFIX,
    ConfigError,
    RunConfig,
)


@dataclass(frozen=True)
class RunOutcome:
    """What `run` produced; the model keeps the trained adapter."""

    result: TrainResult
    eval_report: Any | None
    """The EvalReport (rank 0, when an eval set is configured and the run finished)."""
    model: Any
    tokenizer: Any
    config_path: Path
    eval_path: Path | None


_SAME_ON_RESUME = ("model", "quant", "double_quant", "adapter", "method", "data")


def run(
    config: RunConfig, *, resume: bool = False, echo: Callable[[str], None] = print
) -> RunOutcome:
    """Train (and evaluate) as `config` says; data-parallel when launched by torchrun.

    Args:
        config: From `load_run_config`.
        resume: Continue from output_dir/checkpoint.
        echo: Where the memory plan, evaluation table and output summary go (rank 0 only,
            and not when config.train.quiet).

    Raises:
        ConfigError: no checkpoint to resume / a checkpoint and no resume / a resumed run
            whose base, adapter, method or data differ from the saved run_config.json.
        MemoryPlanError: the planner says the run does not fit in `max_memory`.
    """
    ctx = init_from_env()
    quiet = config.train.quiet
    say = echo if ctx.is_main and not quiet else (lambda _text: None)
    out = config.output_dir
    _check_start(config, resume, find_checkpoint(out) is not None)
    check_data(str(config.train_data), config.train)  # bad data fails before the model loads

    model, tokenizer = load_base(
        _base_folder(config, ctx), quant=config.quant, double_quant=config.double_quant,
        device=ctx.device if ctx.enabled else None,
    )  # fmt: skip
    if tokenizer is None:
        raise ConfigError(f"{config.source}: model {config.model} has no tokenizer; training needs one")
    context = {"tokenizer": tokenizer} if isinstance(config.method, PromptTuningConfig) else {}
    torch.manual_seed(config.train.seed)  # the adapter's initial values follow the config's seed
    add_adapter(model, config.method, name=config.adapter, **context)

    plan = memory_args(model, tokenizer, config, world_size=ctx.world_size)
    say(str(estimate_memory(model.config, **plan)))
    if config.max_memory is not None:
        check_fits(model.config, **plan, max_memory=config.max_memory)  # MemoryPlanError if not
    if ctx.is_main:
        write_json(out / RUN_CONFIG_FILE, config.to_dict())
    ctx.barrier()  # no rank starts before run_config.json is there
    result = train(
        model, tokenizer, str(config.train_data), config.train, out, adapter=config.adapter, resume=resume
    )

    report, eval_path = None, None
    if config.eval is not None and ctx.is_main and not result.interrupted:
        report = evaluate(
            model, tokenizer, config.eval.data, adapters=[config.adapter],
            max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
            progress=not quiet,
        )  # fmt: skip
        eval_path = report.save(
            out / EVAL_FILE, extra={"model": config.model, "base_quant": config.quant, "step": result.steps}
        )
        say(str(report))
    ctx.barrier()
    where = [f"adapter {result.last_adapter_dir}"]
    if result.best_adapter_dir is not None:
        where.append(f"best adapter {result.best_adapter_dir}")
    if eval_path is not None:
        where.append(f"evaluation {eval_path}")
    say(f"outputs in {out}: " + ", ".join(where))
    return RunOutcome(result, report, model, tokenizer, out / RUN_CONFIG_FILE, eval_path)


def _base_folder(config: RunConfig, ctx) -> str:
    """The model to load: config.model, or the folder a "tiny:<arch>" model is built in."""
    if not config.model.startswith(TINY_PREFIX):
        return config.model
    arch = config.model.removeprefix(TINY_PREFIX)
    folder = config.output_dir / f"tiny-{arch}"
    if ctx.is_main and not (folder / "config.json").is_file():
        with atomic_folder(folder) as staging:  # whole folder or none
            save_tiny_model(staging, arch)
    ctx.barrier()
    return str(folder)


def _check_start(config: RunConfig, resume: bool, has_checkpoint: bool) -> None:
    out = config.output_dir
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: {out} holds no checkpoint to continue; run without --resume")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"{out} holds a checkpoint of an earlier run; pass --resume to continue it, or set "
            "output_dir=<another folder>"
        )
    saved_path = out / RUN_CONFIG_FILE
    if resume and saved_path.is_file():
        saved, now = json.loads(saved_path.read_text()), config.to_dict()
        changed = [k for k in _SAME_ON_RESUME if saved.get(k) != now[k]]
        if changed:
            raise ConfigError(
                f"cannot resume {out}: {', '.join(changed)} differ from its {RUN_CONFIG_FILE}; "
                "use the original config, or start a new run in another output_dir"
            )


def memory_args(model, tokenizer, config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """What the memory planner needs about one step of this run, per rank, at its longest row."""
    # Tokenizing here as well as in train() costs seconds; guessing max_seq_len would
    # refuse runs whose rows are all much shorter.
    prepared = prepare_data(str(config.train_data), tokenizer, config.train)
    device = input_device(model)
    info = base_info(model)
    return dict(
        quant=info.quant,
        adapter_config=list_adapters(model)[config.adapter],
        optimizer=config.train.optimizer,
        batch_size=-(-config.train.batch_size // world_size),  # this rank's share of a batch
        seq_len=max(len(e.input_ids) for e in prepared.train),
        gradient_checkpointing=config.train.gradient_checkpointing,
        precision=resolve_precision(config.train.precision, device),
        device=device.type,
        double_quant=info.double_quant,
    )


__all__ = ["RunOutcome", "memory_args", "run"]
