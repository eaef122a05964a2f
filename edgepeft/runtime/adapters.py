"""Adapter files as the engine holds them: checked once, then bound per request.

    adapters/sql.onnx_adapter        ──► fingerprint checked (guard parameter, sidecar sha256)
                                         ──► graph input name -> OrtValue (bound as inputs)
    adapters/chat.kvprefix.safetensors ──► fingerprint checked ──► KVPrefix (seeds the cache)
    adapters/mam.onnx_adapter + mam.kvprefix.safetensors (a hybrid: the sidecar's "kv_prefix"
        names the second file; UniPELT's pair too) ──► one LoadedAdapter with both inputs
        and a prefix

No adapter touches the base weights: a graph input left unbound keeps its default
initializer (rank-0 LoRA, ones for IA3), so "no adapter" is the base itself. The OrtValues
read from a file live as long as the LoadedAdapter (onnxruntime does not own them).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgepeft.artifacts.kv_prefix import KIND, KVPrefix, read_kv_prefix_file
from edgepeft.artifacts.onnx_adapter import GUARD_PREFIX, check_adapter_file
from edgepeft.finite import NonFiniteError, check_finite
from edgepeft.runtime.errors import (
    AdapterBaseMismatchError,
    AdapterLoadError,
    UnknownAdapterError,
)
from edgepeft.vocab import KV_PREFIX_SUFFIX, ONNX_ADAPTER_SUFFIX

KV_PREFIX = KIND
_ORT_ITEMSIZE = {
    "tensor(float)": 4,
    "tensor(float16)": 2,
    "tensor(bfloat16)": 2,
    "tensor(double)": 8,
}


@dataclass(frozen=True)
class AdapterInfo:
    """What `Engine.adapters()` reports for one loaded adapter."""

    name: str
    kind: str
    """"lora", "dora", "ia3", "bottleneck", "parallel", "selective" (graph inputs),
    "kv_prefix" (cache seed) or "mam" / "unipelt" (both)."""
    rank: int | None
    """LoRA/DoRA rank (the largest), bottleneck width; None otherwise."""
    bytes: int
    """Memory the adapter's values take (its tensors)."""
    file: str
    num_virtual_tokens: int | None = None
    """kv_prefix: cache positions the prefix fills."""
    method: str | None = None
    """kv_prefix: "prefix" or "prompt" tuning."""


@dataclass(eq=False)
class LoadedAdapter:
    info: AdapterInfo
    parameters: dict = field(default_factory=dict)
    """graph input name -> onnxruntime OrtValue."""
    prefix: KVPrefix | None = None
    keep_alive: object = None
    """The AdapterFormat the OrtValues were read from."""

    @property
    def name(self) -> str:
        return self.info.name


def adapter_name(path: Path) -> str:
    """The file's stem without its adapter suffix (sql.onnx_adapter -> sql)."""
    for suffix in (KV_PREFIX_SUFFIX, ONNX_ADAPTER_SUFFIX):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def read_adapter(
    path: str | os.PathLike,
    *,
    name: str | None,
    base_fingerprint: str,
    graph_inputs: Iterable[str],
    kv_shape: tuple[int, int, int],
) -> LoadedAdapter:
    """Read and check one adapter file for a graph.

    Args:
        path: An .onnx_adapter or .kvprefix.safetensors file.
        name: Name to register it under (default: the file's stem).
        base_fingerprint: The engine's manifest base fingerprint.
        graph_inputs: The graph's overridable inputs (names adapters may set).
        kv_shape: (num_layers, num_kv_heads, head_dim) of the graph's cache.

    Raises:
        AdapterBaseMismatchError: made for another base; names both fingerprints.
        AdapterLoadError: unreadable, truncated or altered file, a tensor the graph lacks,
            or a tensor holding NaN/inf (named).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    name = name or adapter_name(path)
    if path.name.endswith(KV_PREFIX_SUFFIX):
        return _read_kv_prefix(path, name, base_fingerprint, kv_shape)
    if path.name.endswith(ONNX_ADAPTER_SUFFIX):
        return _read_onnx_adapter(path, name, base_fingerprint, set(graph_inputs), kv_shape)
    raise AdapterLoadError(
        f"{path}: not an adapter file (expected *{ONNX_ADAPTER_SUFFIX} or *{KV_PREFIX_SUFFIX}, "
        "as `edgepeft export --mode separate` writes them in adapters/)"
    )


def _read_onnx_adapter(
    path: Path, name: str, base_fp: str, graph_inputs: set[str], kv_shape: tuple[int, int, int]
) -> LoadedAdapter:
    import onnxruntime as ort

    try:
        check_adapter_file(path, base_fp)  # guard, model_version, sidecar sha256
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except AdapterBaseMismatchError:
        raise
    except (ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"adapter {name!r}: cannot load {path}: {e}") from e
    parameters = {k: v for k, v in fmt.get_parameters().items() if not k.startswith(GUARD_PREFIX)}
    stray = sorted(k for k in parameters if k not in graph_inputs)
    if stray:
        raise AdapterLoadError(
            f"adapter {name!r} ({path}) sets tensor {stray[0]!r}"
            + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
            + ", which this graph has no input for; export the adapter against this base graph "
            "(with the same targets, or lora_everywhere=True)"
        )
    # One NaN would reach every logit (numpy has no bfloat16: those values are not checked).
    readable = {k: v.numpy() for k, v in parameters.items() if v.data_type() != "tensor(bfloat16)"}
    try:
        check_finite(readable, adapter=name, file=path)
    except NonFiniteError as e:
        raise AdapterLoadError(str(e)) from e
    sidecar = _sidecar(path)
    ranks = [r for r in (sidecar.get("ranks") or {}).values() if isinstance(r, int)]
    info = AdapterInfo(
        name=name,
        kind=sidecar.get("kind") or "lora",
        rank=max(ranks, default=None),
        bytes=sum(_nbytes(v) for v in parameters.values()),
        file=str(path),
    )
    prefix = None
    if sidecar.get("kv_prefix"):  # a hybrid (MAM): its prefix part, beside the file
        part = path.parent / sidecar["kv_prefix"]
        if not part.is_file():
            raise AdapterLoadError(
                f"adapter {name!r} ({path}) has a KV-prefix part {part.name}, which is missing "
                "beside it; copy it from the export's adapters/ folder or re-export the adapter"
            )
        prefix = _read_kv_prefix(part, name, base_fp, kv_shape)
        info = replace(
            prefix.info,
            kind=info.kind,
            rank=info.rank,
            bytes=info.bytes + prefix.info.bytes,
            file=info.file,
        )
        prefix = prefix.prefix
    return LoadedAdapter(info, parameters, prefix=prefix, keep_alive=fmt)


def _read_kv_prefix(
    path: Path, name: str, base_fp: str, kv_shape: tuple[int, int, int]
) -> LoadedAdapter:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            found = (f.metadata() or {}).get("base_fingerprint")
    except Exception as e:  # safetensors raises its own error types on a damaged header
        raise AdapterLoadError(f"adapter {name!r}: cannot read {path} ({e}); re-export it") from e
    if found != base_fp:
        raise AdapterBaseMismatchError(
            f"adapter file {path} was exported for base fingerprint {found}; this engine's graph "
            f"is base fingerprint {base_fp}. Export the adapter against this base"
        )
    try:
        prefix = read_kv_prefix_file(path, base_fp)
    except Exception as e:
        raise AdapterLoadError(f"adapter {name!r}: cannot load {path}: {e}") from e
    layers, heads, head_dim = kv_shape
    got = (prefix.num_layers, *prefix.keys[0].shape[1:2], prefix.keys[0].shape[3])
    if got != (layers, heads, head_dim):
        raise AdapterLoadError(
            f"adapter {name!r} ({path}): prefix of (layers, kv heads, head_dim) {got}, the graph "
            f"has {(layers, heads, head_dim)}; export it against this base"
        )
    info = AdapterInfo(
        name=name,
        kind=KV_PREFIX,
        rank=None,
        bytes=sum(a.nbytes for a in (*prefix.keys, *prefix.values)),
        file=str(path),
        num_virtual_tokens=prefix.num_virtual_tokens,
        method=prefix.method,
    )
    return LoadedAdapter(info, prefix=prefix)


def _sidecar(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(
            f"sidecar {sidecar} is not valid JSON ({e}); re-export the adapter"
        ) from e


def _nbytes(value) -> int:
    return int(np.prod(value.shape(), dtype=np.int64)) * _ORT_ITEMSIZE.get(value.data_type(), 4)


class AdapterRegistry:
    """name -> LoadedAdapter, safe to read while another thread loads or unloads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._adapters: dict[str, LoadedAdapter] = {}

    def add(self, adapter: LoadedAdapter, replace: bool = False) -> None:
        with self._lock:
            if adapter.name in self._adapters and not replace:
                raise ValueError(
                    f"an adapter named {adapter.name!r} is loaded already "
                    f"({self._adapters[adapter.name].info.file}); unload it first or pass "
                    "another name"
                )
            self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> LoadedAdapter:
        with self._lock:
            if name not in self._adapters:
                raise self.unknown(name)
            return self._adapters.pop(name)

    def get(self, name: str) -> LoadedAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise self.unknown(name) from None

    def unknown(self, name) -> UnknownAdapterError:
        have = ", ".join(sorted(self._adapters)) or "none"
        return UnknownAdapterError(
            f"no adapter named {name!r} is loaded (loaded: {have}); load it with "
            "engine.load_adapter(path, name) or pass adapter=None for the base"
        )

    def infos(self) -> dict[str, AdapterInfo]:
        with self._lock:
            return {name: a.info for name, a in self._adapters.items()}


__all__ = ["AdapterInfo", "AdapterRegistry", "LoadedAdapter", "adapter_name", "read_adapter"]
