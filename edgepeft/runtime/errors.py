"""What the runtime raises. All are ValueErrors: the CLI prints them as usage errors."""

from __future__ import annotations

from edgepeft.artifacts.onnx_adapter import AdapterBaseMismatchError


class UnknownAdapterError(ValueError):
    """A request named an adapter the engine has not loaded."""


class AdapterLoadError(ValueError):
    """An adapter file could not be read or does not fit the graph; names the file."""


class ContextLengthError(ValueError):
    """A prompt (plus its adapter's virtual tokens) does not fit the export's max_context."""


__all__ = [
    "AdapterBaseMismatchError",
    "AdapterLoadError",
    "ContextLengthError",
    "UnknownAdapterError",
]
