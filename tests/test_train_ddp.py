"""Data-parallel training on 2 CPU processes (gloo, localhost) equals one process.

The run has uneven shards (a batch of 5 rows over 2 ranks: 2 + 3), completions of
different lengths (so weighting by tokens differs from weighting by rows), gradient
accumulation and validation, and is compared step by step with the same run in this
process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgepeft.adapters.inject import add_adapter
from edgepeft.base import load_base
from edgepeft.tasks import make_task
from edgepeft.train.distributed import SINGLE, Context
from edgepeft.train.report import read_metrics
from edgepeft.train.run import run
from edgepeft.train.run_config import load_run_config

STEPS = 4
RUN = """
model = "{model}"
quant = "none"
adapter = "ddp"
output_dir = "single"
[method]
type = "lora"
r = 4
target_modules = "all-linear"
[data]
train = "train.jsonl"
val = "val.jsonl"
[train]
max_steps = {steps}
batch_size = 5
grad_accum = 2
lr = 1e-2
max_seq_len = 32
eval_every = 2
save_every = 2
seed = 3
quiet = true
"""
LOSS_TOLERANCE = 1e-5
TIMEOUT_S = 300


def _rows(n: int, seed: int) -> list[dict]:
    # Completions of 1 to 3 words, so rows carry different numbers of label tokens.
    return [
        {"prompt": row["prompt"], "completion": row["completion"] * (1 + i % 3)}
        for i, row in enumerate(make_task("reverse", n, seed))
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("ddp")
    for name, n, seed in (("train", 30, 0), ("val", 5, 1)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    (folder / "run.toml").write_text(RUN.format(model=tiny_dir("llama"), steps=STEPS))
    return folder


@pytest.fixture(scope="module")
def single(project):
    """The reference: the same run in this process (no process group)."""
    outcome = run(load_run_config(project / "run.toml"), echo=lambda _text: None)
    return outcome.result, _adapter_tensors(outcome.model)


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only, whatever the hostname resolves to
    return env


def _worker(rank: int, world: int, port: int, folder: Path) -> None:
    """One rank: the run through `run` (torchrun's environment), then an interrupted +
    resumed run through `train`; each rank saves what it ended with."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from edgepeft.train.loop import train

    os.environ.update(_env(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    ))  # fmt: skip
    torch.set_num_threads(1)
    config = load_run_config(folder / "run.toml", [f"output_dir={folder / 'ddp'}"])
    outcome = run(config, echo=lambda _text: None)
    save_file(_adapter_tensors(outcome.model), str(folder / f"rank{rank}.safetensors"))

    resumed_dir = folder / "ddp-resumed"
    model, tokenizer = load_base(config.model, quant="none")
    add_adapter(model, config.method, name=config.adapter)
    first = train(model, tokenizer, str(config.train_data), config.train, resumed_dir, _stop_after_steps=2)
    model, tokenizer = load_base(config.model, quant="none")
    add_adapter(model, config.method, name=config.adapter)
    second = train(model, tokenizer, str(config.train_data), config.train, resumed_dir, resume=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({
        "losses": list(outcome.result.train_losses),
        "val_losses": [list(v) for v in outcome.result.val_losses],
        "interrupted_at": first.steps if first.interrupted else None,
        "resumed_losses": list(second.train_losses),
    }))  # fmt: skip
    dist.destroy_process_group()


def _spawn(folder: Path, world: int = 2) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _worker, args=(world, _free_port(), folder), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"data-parallel workers did not finish in {TIMEOUT_S} s")


def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one():
    items = list(range(5))
    shards = [Context(rank=r, world_size=2).shard(items) for r in range(2)]
    assert shards == [[0, 1], [2, 3, 4]]
    three = [Context(rank=r, world_size=3).shard(items[:2]) for r in range(3)]
    assert sum(three, []) == [0, 1] and [] in three  # a rank may get nothing
    assert SINGLE.shard(items) == items and SINGLE.reduce_gradients([], 1.5) == 1.5


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_stay_identical(project, single):
    from safetensors.torch import load_file

    reference, reference_adapter = single
    _spawn(project)
    ranks = [json.loads((project / f"rank{r}.json").read_text()) for r in range(2)]
    adapters = [load_file(str(project / f"rank{r}.safetensors")) for r in range(2)]

    # Every rank holds the same all-reduced numbers, bit for bit.
    assert ranks[0] == ranks[1]
    assert adapters[0].keys() == adapters[1].keys() == reference_adapter.keys()
    for name in adapters[0]:
        assert torch.equal(adapters[0][name], adapters[1][name]), name

    # ... and they are the single-process run's, up to the order of additions.
    losses = ranks[0]["losses"]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference.train_losses, strict=True)) < LOSS_TOLERANCE
    val = ranks[0]["val_losses"]
    assert [s for s, _ in val] == [s for s, _ in reference.val_losses] == [2, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(val, reference.val_losses, strict=True)) < LOSS_TOLERANCE
    worst = max((adapters[0][n] - reference_adapter[n]).abs().max().item() for n in reference_adapter)
    assert worst < 1e-5

    # Only rank 0 wrote: one metrics line per step, one adapter folder.
    records = read_metrics(project / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert json.loads((project / "ddp" / "summary.json").read_text())["world_size"] == 2
    assert (project / "ddp" / "last" / "adapter_model.safetensors").is_file()

    # Interrupted after step 2 and resumed from rank 0's checkpoint by both ranks:
    # the losses of the unbroken run.
    assert ranks[0]["interrupted_at"] == 2
    assert ranks[0]["resumed_losses"] == losses


@pytest.mark.slow
def test_torchrun_runs_the_train_command_data_parallel(project, single):
    reference, _ = single
    out = project / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "edgepeft.cli", "train", str(project / "run.toml"), f"output_dir={out}", "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference.train_losses, strict=True)) < LOSS_TOLERANCE
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
