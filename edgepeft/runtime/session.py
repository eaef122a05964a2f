"""The base graph's one InferenceSession: which execution providers, how many threads.

providers=  (argument)  ─┐
device= profile          ├─ first one given wins ─► keep those this onnxruntime has
manifest "providers"     │                          (one log line for the rest)
CPUExecutionProvider   ──┘                          ─► + CPU as the last resort
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

LOG = logging.getLogger("edgepeft.runtime")
CPU = "CPUExecutionProvider"


def _name(provider) -> str:
    """A provider is a name or (name, options), as onnxruntime takes them."""
    return provider if isinstance(provider, str) else provider[0]


def choose_providers(requested: Sequence | None, available: Sequence[str]) -> list:
    """The requested providers this onnxruntime has, in order, CPU last; logs the missing."""
    requested = list(requested or [CPU])
    missing = [_name(p) for p in requested if _name(p) not in available]
    chosen = [p for p in requested if _name(p) in available]
    if missing:
        LOG.warning(
            "execution provider(s) %s not available in this onnxruntime (available: %s); "
            "falling back to %s",
            ", ".join(missing),
            ", ".join(available),
            ", ".join(_name(p) for p in chosen) or CPU,
        )
    if CPU not in [_name(p) for p in chosen]:
        chosen.append(CPU)
    return chosen


def device_settings(device) -> tuple[list | None, int | None]:
    """(providers, threads) of a device profile name, path or DeviceProfile."""
    if device is None:
        return None, None
    if isinstance(device, (str, Path)):
        try:  # lazy: a device install may leave device profiles out; said below, not at import
            from edgepeft.devices import load_profile
        except ImportError as e:
            raise ValueError(
                f"device={device!r} needs edgepeft.devices (device profiles), which this "
                f"edgepeft lacks ({e}); pass providers= and threads= instead"
            ) from e
        device = load_profile(device)
    providers = list(getattr(device, "providers", None) or []) or None
    return providers, getattr(device, "threads", None)


def create_session(model_path: Path, providers: Sequence, threads: int | None):
    """One InferenceSession over the graph (its weights are loaded once, here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(model_path), options, providers=list(providers))


__all__ = ["choose_providers", "create_session", "device_settings"]
