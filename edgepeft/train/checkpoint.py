"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

    output_dir/checkpoint/
        tensors.safetensors   "adapter/<parameter name>"   trained parameters, as they are
                              "optimizer/state/..."        optimizer state tensors
                              "scaler/...", "rng/torch", "rng/cuda/<i>"
        state.json            step, sampler position, best val loss, early-stopping count,
                              metrics so far, scheduler state, optimizer structure (tensor
                              places marked {"__tensor__": key}), python/numpy RNG states

Written to a temporary sibling folder (edgepeft.atomic.staging_folder: removed if the
write fails or is interrupted, or by the next save after a kill) and swapped in with
os.replace; the previous checkpoint is set aside first and deleted last, and
`read_checkpoint` falls back to it if a crash hit between the two renames. Restoring every RNG and the optimizer
state exactly is what makes a resumed loss curve bit-identical on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgepeft.atomic import staging_folder

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------- nested values <-> JSON + tensors


def flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready copy of `value`; its tensors go into `tensors` under keys below `key`.

    Dicts with non-string keys and tuples are tagged so `unflatten` restores them
    exactly (optimizer state is keyed by int, Adam's betas are a tuple).
    """
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: flatten(v, f"{key}/{k}", tensors) for k, v in value.items()}
        return {
            "__items__": [
                [flatten(k, f"{key}/k{i}", tensors), flatten(v, f"{key}/{i}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {key} of type {type(value).__name__} in a checkpoint")


def unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(unflatten(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__items__"}:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value["__items__"]}
    return {k: unflatten(v, tensors) for k, v in value.items()}


# ---------------------------------------------------------------- random number generators


def rng_state(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every global RNG's state: torch's ByteTensors into `tensors`, the rest as JSON."""
    tensors["rng/torch"] = torch.get_rng_state()
    state: dict[str, Any] = {"python": flatten(random.getstate(), "rng/python", tensors)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
        for i, s in enumerate(cuda):
            tensors[f"rng/cuda/{i}"] = s
        state["cuda_devices"] = len(cuda)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    random.setstate(unflatten(state["python"], tensors))
    devices = state.get("cuda_devices", 0)
    if devices and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(devices)])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- whole training state


@dataclass(frozen=True)
class Checkpoint:
    """What `read_checkpoint` found: the JSON state and every tensor, on CPU."""

    directory: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def progress(self) -> dict[str, Any]:
        """The loop's own bookkeeping (sampler, best val loss, metrics, config, ...)."""
        return self.state["progress"]


def write_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    parameters: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: dict[str, Any],
) -> Path:
    """Save everything needed to continue training after optimizer step `step`.

    Args:
        parameters: Trained parameters by a stable name (the model's parameter names).
        scheduler: A torch LR scheduler (its state_dict must be plain values).
        scaler: torch.amp.GradScaler or None.
        progress: JSON-ready loop state: sampler position, best val loss, history, ...
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, p in parameters.items():
        tensors[f"adapter/{name}"] = p.detach().to("cpu").contiguous().clone()
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": flatten(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": flatten(scheduler.state_dict(), "scheduler", tensors),
        "scaler": flatten(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
        "rng": rng_state(tensors),
        "progress": progress,
    }
    target = Path(output_dir) / CHECKPOINT_DIR
    with staging_folder(target) as staging:  # a killed run's leftover staging goes first
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": "pt"})
        (staging / STATE_FILE).write_text(json.dumps(state, allow_nan=True) + "\n")
        _swap_in(staging, target)
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`; the old `target` waits under `<target>.old` until then."""
    old = target.with_name(f"{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)  # a crash from here until the next replace leaves only .old
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder of `output_dir`, or its set-aside predecessor after a crash."""
    target = Path(output_dir) / CHECKPOINT_DIR
    for candidate in (target, target.with_name(f"{target.name}.old")):
        if (candidate / STATE_FILE).is_file() and (candidate / TENSORS_FILE).is_file():
            return candidate
    return None


def read_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in `output_dir`, or None when there is none."""
    from safetensors.torch import load_file

    directory = find_checkpoint(output_dir)
    if directory is None:
        return None
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        tensors = load_file(str(directory / TENSORS_FILE))
    except Exception as e:  # json and safetensors raise their own error types
        raise ValueError(
            f"checkpoint {directory} is unreadable ({e}); delete it to start over"
        ) from e
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory} has format {state.get('format')!r}; this edgepeft "
            f"reads format {FORMAT_VERSION}"
        )
    return Checkpoint(directory, state, tensors)


def restore_checkpoint(
    checkpoint: Checkpoint,
    *,
    parameters: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> None:
    """Put parameters, optimizer, scheduler, scaler and every RNG back as they were saved."""
    tensors = checkpoint.tensors
    saved = {k.removeprefix("adapter/") for k in tensors if k.startswith("adapter/")}
    if saved != set(parameters):
        missing, extra = sorted(set(parameters) - saved), sorted(saved - set(parameters))
        raise ValueError(
            f"checkpoint {checkpoint.directory} does not fit this adapter: "
            f"missing {missing[:3]}, unexpected {extra[:3]}; was it written for another adapter?"
        )
    with torch.no_grad():
        for name, p in parameters.items():
            value = tensors[f"adapter/{name}"]
            if value.shape != p.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, the adapter needs "
                    f"{tuple(p.shape)}"
                )
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    optimizer.load_state_dict(unflatten(checkpoint.state["optimizer"], tensors))
    scheduler.load_state_dict(unflatten(checkpoint.state["scheduler"], tensors))
    if scaler is not None and checkpoint.state["scaler"] is not None:
        scaler.load_state_dict(unflatten(checkpoint.state["scaler"], tensors))
    set_rng_state(checkpoint.state["rng"], tensors)
