"""Read and write HF peft adapter folders, both ways.

    adapter_config.json         peft's fields for the method, plus base_model_name_or_path
    adapter_model.safetensors   "base_model.model.<module path>.<tensor>" (peft's keys);
                                soft prompts: "prompt_embeddings"
                                metadata: edgepeft_base_fingerprint, edgepeft_base_quant
                                (int4 base: edgepeft_base_int4, its recipe and codes hash)
                                (DyLoRA: edgepeft_dylora_min_rank, see lora.py)

Bottleneck and selective adapters use the same layout with their own peft_type.
Only safetensors are read; a folder holding pickled weights is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from edgepeft import __version__, int4_base
from edgepeft.adapters import METHODS, method_for
from edgepeft.adapters.inject import add_adapter, delete_adapter, list_adapters, set_adapter
from edgepeft.adapters.layer import adapter_modules
from edgepeft.adapters.lora import dylora_metadata, with_dylora_metadata
from edgepeft.atomic import staging_folder
from edgepeft.base import base_info, is_conv1d_origin
from edgepeft.finite import check_finite_torch

log = logging.getLogger("edgepeft")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """An adapter folder does not fit the model it is being loaded into."""


def _peft_keys(model: nn.Module, name: str) -> dict[str, tuple[object, str, torch.Tensor]]:
    """peft key -> (module, local key, tensor) for every tensor of adapter `name`."""
    out = {}
    for path, module in adapter_modules(model):
        if name not in module:
            continue
        for local, tensor in module.tensors(name).items():
            key = local if module.model_level else f"{_PREFIX}{path}.{local}"
            out[key] = (module, local, tensor)
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (default: the active one) as an HF peft folder.

    The folder is written to a temporary sibling and renamed into place, so a
    failure never leaves a half-written adapter.
    """
    from safetensors.torch import save_file

    name = name or getattr(model, "edgepeft_active", None)
    if name is None or name not in list_adapters(model):
        raise KeyError(f"no adapter {name!r} to save (adapters: {', '.join(list_adapters(model)) or 'none'})")
    config = list_adapters(model)[name]
    spec = method_for(config)
    info = base_info(model)

    document = {
        "peft_type": config.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": info.name_or_path or None,
        "inference_mode": True,
        "revision": None,
        **spec.to_peft(config),
    }
    if config.peft_type in ("LORA", "IA3"):  # peft needs the flag for GPT-2 Conv1D targets
        document["fan_in_fan_out"] = any(
            is_conv1d_origin(module.innermost())
            for _, module in adapter_modules(model)
            if module.peft_type == config.peft_type and name in module
        )
    tensors = {
        key: tensor.detach().to("cpu").contiguous().clone()
        for key, (_, _, tensor) in _peft_keys(model, name).items()
    }
    metadata = {
        "format": "pt",
        "edgepeft_version": __version__,
        "edgepeft_base_fingerprint": info.fingerprint,
        "edgepeft_base_quant": info.quant,
        "edgepeft_adapter_name": name,
        **dylora_metadata(config),
        **int4_base.metadata(model),
    }
    directory = Path(directory)
    with staging_folder(directory) as staging:  # removed on failure and on SIGTERM / SIGINT
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata=metadata)
        _move_into_place(staging, directory)
    return directory


def _move_into_place(new: Path, target: Path) -> None:
    """Rename folder `new` to `target`; an existing `target` survives a failed rename.

    The old folder is set aside under a hidden sibling name first (deleting it first
    would lose it if the second rename failed), and put back on failure.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()  # only the unique name is wanted (Windows cannot rename onto a folder)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_adapter(directory: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor], dict]:
    """(config, tensors, metadata) of an adapter folder, with clear errors for bad folders."""
    from safetensors import safe_open

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {directory} an adapter folder?")
    if not weights_path.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = (
            f"; it holds pickled weights ({', '.join(pickled)}), which edgepeft never loads: "
            "re-save the adapter with safe_serialization=True"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{weights_path} not found{hint}")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    kind = document.get("peft_type")
    if kind not in METHODS:
        raise ValueError(
            f"{config_path}: peft_type {kind!r} is not supported by edgepeft "
            f"(supported: {', '.join(METHODS)})"
        )
    try:
        config = METHODS[kind].from_peft(document)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
        ) from e
    metadata = {**metadata, "base_model_name_or_path": document.get("base_model_name_or_path")}
    try:
        config = with_dylora_metadata(config, metadata)
    except ValueError as e:
        raise ValueError(f"{weights_path}: metadata: {e}") from e
    return config, tensors, metadata


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    check_base: bool = True,
    activate: bool = True,
) -> nn.Module:
    """Load an adapter folder written by edgepeft or HF peft into `model` as `name`.

    Everything is checked before any weight is written; on a mismatch the model is
    left exactly as it was.

    Args:
        check_base: Compare the base fingerprint recorded at save time with this
            model's. Folders from HF peft record none; then only shapes are checked.
        activate: Make the loaded adapter the active one.

    Raises:
        AdapterMismatchError: wrong base, or a tensor whose name or shape does not fit.
        NonFiniteError: a tensor holds NaN or inf (named, with the file).
    """
    config, tensors, metadata = read_adapter(directory)
    check_finite_torch(tensors, adapter=name, file=Path(directory) / WEIGHTS_FILE)
    info = base_info(model)
    saved_fp = metadata.get("edgepeft_base_fingerprint")
    saved_base = metadata.get("base_model_name_or_path") or "unknown"
    if check_base and saved_fp and saved_fp != info.fingerprint:
        raise AdapterMismatchError(
            f"{directory} was trained on base {saved_base!r} (fingerprint {saved_fp}); this model "
            f"is {info.name_or_path or 'unnamed'!r} (fingerprint {info.fingerprint}). Load the "
            "matching base, or pass check_base=False if you know they hold the same weights."
        )
    if not saved_fp:
        log.info("%s records no base fingerprint (written by HF peft?); checking shapes only", directory)
    other_int4 = int4_base.mismatch(metadata, model, info.quant)
    if other_int4 is not None:  # the same weights, rounded otherwise: loads, but say so
        log.warning("%s: %s; it will not compute what was trained", directory, other_int4)

    previous = getattr(model, "edgepeft_active", None)
    add_adapter(model, config, name)
    try:
        _assign(model, name, tensors, directory, saved_base, info.name_or_path)
    except Exception:
        delete_adapter(model, name)
        set_adapter(model, previous)
        raise
    set_adapter(model, name if activate else previous)
    return model


def _assign(model, name, tensors, directory, saved_base, model_base) -> None:
    expected = _peft_keys(model, name)
    where = f"{directory} (base {saved_base!r}) into model {model_base or 'unnamed'!r}"
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterMismatchError(
            f"cannot load {where}: tensor {unexpected[0]!r} has no place in this model "
            f"({len(unexpected)} such tensors); was the adapter made for another architecture?"
        )
    if missing:
        raise AdapterMismatchError(
            f"cannot load {where}: tensor {missing[0]!r} is missing from the adapter file "
            f"({len(missing)} missing)"
        )
    for key, (_, _, own) in expected.items():
        if tuple(tensors[key].shape) != tuple(own.shape):
            raise AdapterMismatchError(
                f"cannot load {where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"this base needs {tuple(own.shape)}"
            )
    per_module: dict[int, tuple[object, dict]] = {}
    for key, (module, local, _) in expected.items():
        per_module.setdefault(id(module), (module, {}))[1][local] = tensors[key]
    for module, own_tensors in per_module.values():
        module.load_tensors(name, own_tensors)
