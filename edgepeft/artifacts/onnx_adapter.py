"""`.onnx_adapter` files: one adapter's values for a base graph's optional inputs.

    out/adapters/sql.onnx_adapter    onnxruntime AdapterFormat (flatbuffer)
        adapter_version   2: edgepeft's layout of the parameters (ADAPTER_LAYOUT_VERSION;
                          2: q/k/v and gate/up packed, see export/packed_adapters.py)
        model_version     the base fingerprint's first 7 hex digits as an int (28 bits)
        parameters        graph input name -> tensor, in the graph's activation dtype
            model.layers.0.self_attn.o_proj.lora_A     (in, r)
            model.layers.0.self_attn.o_proj.lora_B     (r, out), alpha / r folded in
            model.layers.0.self_attn.qkv_proj.lora_A   (in, rq+rk+rv)   packed siblings
            model.layers.0.self_attn.qkv_proj.lora_B   (rq+rk+rv, q+k+v) block diagonal
            edgepeft.base_fingerprint.<16 hex digits>  (1,) the guard, see below; its
                                                       value: the tensors' checksum
    out/adapters/sql.json            sidecar: kind, targets, rank and scaling per module,
                                     packed inputs and their modules, base fingerprint,
                                     sha256 of the .onnx_adapter

    session = ort.InferenceSession("out/model.onnx")
    adapter = load_adapter_file("out/adapters/sql.onnx_adapter", "out")  # fingerprint checked
    options = ort.RunOptions(); options.add_active_adapter(adapter)
    session.run(None, feeds, options)      # switch adapters per run, no reload

AdapterFormat carries no free-form metadata (a format, an adapter and a model version,
all int32, and the parameters), so the base fingerprint is kept three ways: 28 bits in
model_version, in full in the guard parameter's name, and in the sidecar. The base graph
has an (unused) optional input named after its own fingerprint, so even plain
onnxruntime, with no edgepeft code on the device, refuses an adapter made for another
base ("Invalid input name: edgepeft.base_fingerprint.<the adapter's base>");
`load_adapter_file` refuses it first, naming both fingerprints.

The guard's value (the graph never reads it) is a checksum of the file's other tensors:
24 bits of `files.tensors_sha256` over them, an integer below 2**24 (exact in float32).
`check_adapter_file` recomputes it, so a file corrupted in transit is caught even when it
was copied without its sidecar (which holds the whole file's sha256). 0: a file written
before edgepeft stored it (not checked).

Torch-free and onnx-free (numpy and onnxruntime): the device runtime reads adapters with it.
The graph's optional inputs, which `write_adapter_file` checks against, are read with onnx
by the exporter (`edgepeft.export.adapter_files.optional_graph_inputs`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.artifacts.files import sha256_file, tensors_sha256
from edgepeft.artifacts.graph_io import PACKED_PROJECTIONS
from edgepeft.artifacts.manifest import read_manifest, write_json
from edgepeft.atomic import atomic_path
from edgepeft.vocab import ONNX_ADAPTER_SUFFIX

SIDECAR_FORMAT = "edgepeft-onnx-adapter"
ADAPTER_LAYOUT_VERSION = 2
GUARD_PREFIX = "edgepeft.base_fingerprint."


class AdapterBaseMismatchError(ValueError):
    """An adapter file was exported for another base graph."""


@dataclass(frozen=True)
class GraphInput:
    """One optional graph input an adapter file may set."""

    dtype: np.dtype
    shape: tuple[int | str, ...]
    """Static sizes, and names (dim_param) for the dynamic ones."""


@dataclass(frozen=True)
class AdapterFile:
    """What was written for one adapter."""

    name: str
    path: Path
    sidecar: Path
    sha256: str
    base_fingerprint: str
    inputs: tuple[str, ...]


def fingerprint_input(base_fingerprint: str) -> str:
    """The guard input's name: the base graph has it, every adapter file for it sets it."""
    return f"{GUARD_PREFIX}{base_fingerprint}"


def model_version(base_fingerprint: str) -> int:
    """AdapterFormat's int32 model_version: the fingerprint's first 7 hex digits."""
    return int(base_fingerprint[:7], 16)


def tensors_checksum(tensors: Mapping[str, np.ndarray]) -> int:
    """The guard's value for these tensors: in [1, 2**24), so exact as a float32 (0: none)."""
    return int(tensors_sha256(tensors)[:6], 16) or 1


def _module_of(input_name: str) -> str:
    for suffix in (".lora_A", ".lora_B", ".dora_scale", ".ia3_scale", ".adapter_down.", ".adapter_up."):
        if suffix in input_name:
            return input_name[: input_name.index(suffix)]
    return input_name


def _packed_into(module: str, graph: Mapping[str, GraphInput]) -> str | None:
    """The packed projection of the graph that holds `module` (q_proj in qkv_proj), if any."""
    for packed, members in PACKED_PROJECTIONS.items():
        for member in members:
            if module.endswith("." + member):
                name = module[: -len(member)] + packed
                if any(key.startswith(name + ".") for key in graph):
                    return name
    return None


def _checked(name: str, tensors: Mapping[str, np.ndarray], graph: Mapping[str, GraphInput]):
    """The tensors cast to their inputs' dtypes; raises on a name, shape or rank mismatch."""
    out, dims = {}, {}
    for key, value in tensors.items():
        spec = graph.get(key)
        if spec is None and (packed := _packed_into(_module_of(key), graph)):
            raise ValueError(
                f"adapter {name!r}: {key!r} is not a graph input: the graph packs "
                f"{_module_of(key)} into {packed}; pack the tensors first "
                "(edgepeft.export.packed_adapters.pack_tensors) or use export_adapter"
            )
        if spec is None:
            raise ValueError(
                f"adapter {name!r} targets layer {_module_of(key)} that the graph does not expose "
                f"(no graph input {key!r}); export this adapter together with the base, or with "
                "lora_everywhere=True for LoRA"
            )
        value = np.asarray(value)
        if value.ndim != len(spec.shape) or any(
            isinstance(want, int) and want != got for want, got in zip(spec.shape, value.shape, strict=True)
        ):
            raise ValueError(
                f"adapter {name!r}: tensor {key!r} has shape {value.shape}, the graph input "
                f"expects {spec.shape}"
            )
        for want, got in zip(spec.shape, value.shape, strict=True):
            if isinstance(want, str) and dims.setdefault(want, (got, key))[0] != got:
                raise ValueError(
                    f"adapter {name!r}: {key!r} has {want} = {got} but {dims[want][1]!r} has "
                    f"{dims[want][0]}; both must agree"
                )
        out[key] = np.ascontiguousarray(value.astype(spec.dtype))
    return out


def write_adapter_file(
    folder: str | os.PathLike,
    name: str,
    tensors: Mapping[str, np.ndarray],
    *,
    graph_inputs: Mapping[str, GraphInput],
    base_fingerprint: str,
    description: Mapping | None = None,
) -> AdapterFile:
    """Write folder/<name>.onnx_adapter and its sidecar folder/<name>.json, each atomically.

    Args:
        folder: Where the files go (created).
        name: Adapter name (the file stem).
        tensors: Graph input name -> value (fp32 is fine: cast to the input's dtype).
        graph_inputs: The base graph's optional inputs (export's `optional_graph_inputs`); every
            tensor must be one of them.
        base_fingerprint: The base graph's fingerprint (its manifest's base_fingerprint).
        description: Extra sidecar fields (kind, targets, ranks, ...).
    """
    import onnxruntime as ort

    guard = fingerprint_input(base_fingerprint)
    if guard not in graph_inputs:
        raise AdapterBaseMismatchError(
            f"the graph has no input {guard!r}: it was not exported for base fingerprint "
            f"{base_fingerprint}, or not in separate mode"
        )
    values = _checked(name, {**tensors, guard: np.zeros(1, np.float32)}, graph_inputs)
    if values[guard].dtype == np.float32:  # 24-bit integers are exact in it
        checksum = tensors_checksum({k: v for k, v in values.items() if k != guard})
        values[guard] = np.array([checksum], np.float32)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{ONNX_ADAPTER_SUFFIX}"
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_LAYOUT_VERSION)
    fmt.set_model_version(model_version(base_fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()})
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
    digest = sha256_file(path)
    inputs = tuple(k for k in values if k != guard)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": ADAPTER_LAYOUT_VERSION,
        "name": name,
        **dict(description or {}),
        "base_fingerprint": base_fingerprint,
        "file": path.name,
        "sha256": digest,
        "dtype": str(next((v.dtype for k, v in values.items() if k != guard), np.dtype("float32"))),
        "inputs": list(inputs),
    }
    sidecar_path = write_json(folder / f"{name}.json", sidecar)
    return AdapterFile(name, path, sidecar_path, digest, base_fingerprint, inputs)


def adapter_fingerprint(path: str | os.PathLike) -> str:
    """The base fingerprint an .onnx_adapter file was exported for (read from the file)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # onnxruntime raises its own error types
        raise ValueError(f"{path} is not a readable .onnx_adapter file ({e})") from e
    guards = [k for k in fmt.get_parameters() if k.startswith(GUARD_PREFIX)]
    if len(guards) != 1:
        raise ValueError(
            f"{path} holds {len(guards)} base fingerprint parameters ({GUARD_PREFIX}...), "
            "expected one: was it written by edgepeft?"
        )
    found = guards[0].removeprefix(GUARD_PREFIX)
    if model_version(found) != fmt.get_model_version():
        raise ValueError(
            f"{path}: model_version {fmt.get_model_version()} does not match the fingerprint "
            f"{found} of its guard parameter; the file was altered"
        )
    return found


def _base_fingerprint(base: str | os.PathLike) -> tuple[str, str]:
    """(fingerprint, description) of an export folder or a fingerprint given as is."""
    if isinstance(base, str) and len(base) == 16 and all(c in "0123456789abcdef" for c in base):
        return base, f"base fingerprint {base}"
    manifest = read_manifest(base)
    return manifest.base_fingerprint, f"the graph in {base} (base fingerprint {manifest.base_fingerprint})"


def check_adapter_file(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """Raise unless the adapter file was exported for `base`; returns its fingerprint.

    Args:
        path: An .onnx_adapter file.
        base: The separate-mode export folder it is meant for, or a base fingerprint.

    Raises:
        AdapterBaseMismatchError: Another base; the message names both fingerprints.
        ValueError: The tensors do not match the checksum stored in the file, or the
            sidecar's sha256 does not match the file (changed since export).
    """
    path = Path(path)
    found = adapter_fingerprint(path)
    want, where = _base_fingerprint(base)
    if found != want:
        raise AdapterBaseMismatchError(
            f"adapter file {path} was exported for base fingerprint {found}; {where} is "
            f"base fingerprint {want}. Export the adapter against this base (it must be trained "
            "on it), or use the base graph it was exported with"
        )
    check_tensors(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        recorded = json.loads(sidecar.read_text()).get("sha256")
        if recorded and recorded != sha256_file(path):
            raise ValueError(
                f"{path} does not match the sha256 recorded in {sidecar}: it changed since "
                "export; re-export it"
            )
    return found


def check_tensors(path: str | os.PathLike) -> None:
    """Raise unless the file's tensors match the checksum its guard parameter holds.

    Raises:
        ValueError: names the file and both checksums; the file changed since export.
    """
    import onnxruntime as ort

    parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    guard = next(k for k in parameters if k.startswith(GUARD_PREFIX))
    recorded = int(parameters[guard].numpy().reshape(-1)[0])
    if recorded == 0:  # written before edgepeft stored the checksum
        return
    found = tensors_checksum({k: v.numpy() for k, v in parameters.items() if k != guard})
    if found != recorded:
        raise ValueError(
            f"{path}: its tensors have checksum {found:06x}, the file recorded {recorded:06x} "
            "when it was exported: it was corrupted since (copy it again from the original "
            "export, or re-export the adapter)"
        )


def load_adapter_file(path: str | os.PathLike, base: str | os.PathLike):
    """An onnxruntime LoraAdapter for `path`, after `check_adapter_file(path, base)`.

    Keep the returned adapter referenced for as long as a RunOptions it was added to is
    used: RunOptions does not own it, and onnxruntime frees the adapter's memory with the
    Python object (a run then reads freed memory).
    """
    import onnxruntime as ort

    check_adapter_file(path, base)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


__all__ = [
    "ADAPTER_LAYOUT_VERSION",
    "GUARD_PREFIX",
    "SIDECAR_FORMAT",
    "AdapterBaseMismatchError",
    "AdapterFile",
    "GraphInput",
    "adapter_fingerprint",
    "check_adapter_file",
    "check_tensors",
    "fingerprint_input",
    "load_adapter_file",
    "model_version",
    "tensors_checksum",
    "write_adapter_file",
]
