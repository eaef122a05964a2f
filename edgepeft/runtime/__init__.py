"""edgepeft.runtime: run an exported graph on the device (onnxruntime, numpy, tokenizers).

    from edgepeft.runtime import Engine
    engine = Engine("out/")                          # base graph + the manifest's adapters
    engine.generate("SELECT", adapter="sql", max_new_tokens=32)
    for piece in engine.stream([{"role": "user", "content": "hi"}], adapter="chat"): ...

Nothing here imports torch, transformers, bitsandbytes or onnx, nor the exporter: exports are
read through edgepeft.artifacts (tests/test_layout_imports.py, test_runtime_torch_free.py).
"""

from edgepeft.runtime.adapters import AdapterInfo
from edgepeft.runtime.engine import Engine, GenerationResult, Request
from edgepeft.runtime.errors import (
    AdapterBaseMismatchError,
    AdapterLoadError,
    ContextLengthError,
    UnknownAdapterError,
)
from edgepeft.runtime.memory import MemoryReport, resident_bytes
from edgepeft.runtime.sampling import SamplingConfig

__all__ = [
    "AdapterBaseMismatchError",
    "AdapterInfo",
    "AdapterLoadError",
    "ContextLengthError",
    "Engine",
    "GenerationResult",
    "MemoryReport",
    "Request",
    "SamplingConfig",
    "UnknownAdapterError",
    "resident_bytes",
]
