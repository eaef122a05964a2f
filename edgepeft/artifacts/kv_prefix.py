"""KV prefix files: a prompt or prefix tuning adapter as the key/value prefix that seeds the cache.

    out/adapters/<name>.kvprefix.safetensors      safetensors (numpy API; no graph change)
        past_key_values.{l}.key / .value          (1, n_kv, N, head_dim) float32, per layer,
                                                  keys in the frame PyTorch caches them
        rotary.{l}.inv_freq                       (rotary_dim / 2,) float32; rotary models only
        metadata   format, format_version, kind "kv_prefix", adapter, method "prefix"|"prompt",
                   base_fingerprint, num_virtual_tokens, num_layers, num_kv_heads, head_dim,
                   layout, tensors_sha256 (checked at every read)

    export: edgepeft.export.kv_prefix.export_kv_prefix ──write_kv_prefix_file──► the file
    device: read_kv_prefix_file(path, base fingerprint) ──► KVPrefix ──kv_seed.seed_past──►
            the graph's past_key_values feeds

Torch-free (numpy and safetensors): the device runtime reads prefixes with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.artifacts.files import tensors_sha256
from edgepeft.atomic import atomic_path
from edgepeft.finite import check_finite
from edgepeft.vocab import ADAPTERS_FOLDER, KV_PREFIX_SUFFIX

KIND = "kv_prefix"
"""The manifest's AdapterEntry.kind (and the file's metadata "kind") of a KV prefix."""
FORMAT = "edgepeft-kv-prefix"
FORMAT_VERSION = 1
LAYOUT = "past_key_values.{i}.key/.value: (1, num_kv_heads, num_virtual_tokens, head_dim) float32"


@dataclass(frozen=True)
class KVPrefix:
    """An adapter's cache prefix as the runtime holds it (numpy only)."""

    adapter: str
    method: str
    """"prefix" or "prompt": decides how rows are re-positioned (module docstring)."""
    num_virtual_tokens: int
    base_fingerprint: str
    keys: tuple[np.ndarray, ...]
    """Per layer (1, n_kv, N, head_dim) float32."""
    values: tuple[np.ndarray, ...]
    inv_freq: tuple[np.ndarray | None, ...]
    """Per layer rotary frequencies (rotary_dim / 2,); None for absolute positions."""

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], meta: dict) -> KVPrefix:
        layers = int(meta["num_layers"])
        missing = [
            f"past_key_values.{i}.{kind}"
            for i in range(layers)
            for kind in ("key", "value")
            if f"past_key_values.{i}.{kind}" not in tensors
        ]
        if missing:
            raise ValueError(
                f"KV prefix of adapter {meta.get('adapter')!r} lacks {missing[:4]}; "
                "re-export the adapter"
            )
        return cls(
            adapter=meta["adapter"],
            method=meta["method"],
            num_virtual_tokens=int(meta["num_virtual_tokens"]),
            base_fingerprint=meta["base_fingerprint"],
            keys=tuple(tensors[f"past_key_values.{i}.key"] for i in range(layers)),
            values=tuple(tensors[f"past_key_values.{i}.value"] for i in range(layers)),
            inv_freq=tuple(tensors.get(f"rotary.{i}.inv_freq") for i in range(layers)),
        )


def kv_prefix_path(out_dir: str | os.PathLike, adapter_name: str) -> Path:
    """out_dir/adapters/<name>.kvprefix.safetensors."""
    return Path(out_dir) / ADAPTERS_FOLDER / f"{adapter_name}{KV_PREFIX_SUFFIX}"


def write_kv_prefix_file(
    out_path: str | os.PathLike, tensors: dict[str, np.ndarray], fingerprint: str, meta: dict
) -> Path:
    """Write a KV prefix as safetensors (numpy API), through a temporary file and a rename.

    Args:
        out_path: The file to write (its folder is created).
        tensors: `kv_prefix_tensors`' dict.
        fingerprint: The base's fingerprint (`edgepeft.base.fingerprint`) the prefix belongs to.
        meta: At least "adapter" and "method" ("prefix" | "prompt"); values become strings.

    Returns:
        The path written.
    """
    from safetensors.numpy import save_file

    for key in ("adapter", "method"):
        if key not in meta:
            raise ValueError(f"KV prefix metadata needs {key!r}; got keys {sorted(meta)}")
    if meta["method"] not in ("prefix", "prompt"):
        raise ValueError(f"method must be 'prefix' or 'prompt', got {meta['method']!r}")
    keys = [tensors[k] for k in tensors if k.startswith("past_key_values.") and k.endswith(".key")]
    if not keys:
        raise ValueError("no past_key_values.{i}.key tensors to write; pass kv_prefix_tensors()")
    _, kv_heads, n, head_dim = keys[0].shape
    metadata = {
        **{k: str(v) for k, v in meta.items()},
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": KIND,
        "base_fingerprint": fingerprint,
        "num_virtual_tokens": str(n),
        "num_layers": str(len(keys)),
        "num_kv_heads": str(kv_heads),
        "head_dim": str(head_dim),
        "layout": LAYOUT,
    }
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    # checked at every read: a file copied without the export's manifest is still checked
    metadata["tensors_sha256"] = tensors_sha256(arrays)
    with atomic_path(out_path) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
    return Path(out_path)


def read_kv_prefix_file(path: str | os.PathLike, expected_fingerprint: str) -> KVPrefix:
    """Read a KV prefix file, refusing one made for another base than `expected_fingerprint`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KV prefix file {path} not found")
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} has kind {meta.get('kind')!r}, expected {KIND!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {meta['format_version']}; this edgepeft reads up to "
                f"{FORMAT_VERSION}: upgrade edgepeft"
            )
        if meta.get("base_fingerprint") != expected_fingerprint:
            raise ValueError(
                f"KV prefix {path} (adapter {meta.get('adapter')!r}) was made for base "
                f"{meta.get('base_fingerprint')!r}, but this graph's base is "
                f"{expected_fingerprint!r}; export the adapter against this base"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recorded = meta.get("tensors_sha256")  # absent in files written before it was stored
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise ValueError(
            f"KV prefix {path}: its tensors have sha256 {tensors_sha256(tensors)}, the file "
            f"recorded {recorded} when it was exported: it was corrupted since (copy it again "
            "from the original export, or re-export the adapter)"
        )
    check_finite(tensors, adapter=meta.get("adapter") or path.name, file=path)
    return KVPrefix.from_tensors(tensors, meta)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KIND",
    "LAYOUT",
    "KVPrefix",
    "kv_prefix_path",
    "read_kv_prefix_file",
    "write_kv_prefix_file",
]
