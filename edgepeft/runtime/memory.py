"""What the engine holds in memory, by part: base weights, each adapter, KV cache.

    base       model.onnx + model.onnx.data, loaded once by the session
    adapters   each file's tensors (never a copy of the base)
    kv_cache   every request slot's buffers currently allocated (see kv_cache.py)

`resident_bytes()` reads the process's resident set from /proc (Linux), for tests and
benchmarks that check the parts against what the OS sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MemoryReport:
    base_bytes: int
    """The graph and its weights (model.onnx + model.onnx.data on disk)."""
    adapters: dict[str, int] = field(default_factory=dict)
    """name -> bytes of its tensors."""
    kv_cache_bytes: int = 0
    """KV buffers and decode arrays allocated now (idle slots included)."""

    @property
    def adapter_bytes(self) -> int:
        return sum(self.adapters.values())

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + self.adapter_bytes + self.kv_cache_bytes

    def __str__(self) -> str:
        mb = 1 << 20
        lines = [
            f"base weights {self.base_bytes / mb:.1f} MiB, "
            f"KV cache {self.kv_cache_bytes / mb:.1f} MiB, adapters {self.adapter_bytes / mb:.2f} MiB ({len(self.adapters)})"
        ]
        lines += [f"  {name}: {size / 1024:.1f} KiB" for name, size in self.adapters.items()]
        return "\n".join(lines)


def graph_bytes(model_path: Path) -> int:
    """Size of a graph file and its external data files beside it."""
    data = model_path.with_name(model_path.name + ".data")
    return sum(p.stat().st_size for p in (model_path, data) if p.is_file())


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc/self/statm); 0 where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


__all__ = ["MemoryReport", "graph_bytes", "resident_bytes"]
