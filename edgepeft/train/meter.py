"""What a training step really holds: live tensor bytes, metered while code runs.

    measure_peak(fn) / with TensorPeak(device) as peak:
        CPU    tensors reachable from Python at entry (weights, optimizer state)
               + every storage an op returns (a dispatch mode sees it), each once,
               until freed (a weakref finalizer sees it go) ──► peak of the sum
        CUDA   torch.cuda.max_memory_allocated over the block
    process_overhead(device): what the process holds beyond them (RSS or allocator cache)

This is the measure the estimator (train/memory.py) plans and `train` reports as its
tensor peak; the numbers of tests/test_train_memory.py compare the two.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    """Counts each storage an op returns once, until it is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live or storage.device.type == "meta":
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        # PyTorch keeps a storage's Python object alive as long as the storage itself.
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        if self.live.get(key) == nbytes:
            del self.live[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value.untyped_storage())
        return out


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensors reachable from Python now, each storage once."""
    gc.collect()
    meter = _LiveTensorBytes()
    _track_live(meter)
    return meter.current


def _track_live(meter: _LiveTensorBytes) -> None:
    for obj in gc.get_objects():
        # type() rather than isinstance: isinstance would import lazy modules found here.
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            meter.track(obj.untyped_storage())


class TensorPeak:
    """Meters a block: afterwards `bytes` is the peak of live tensor bytes inside it.

    CPU: tensors reachable from Python at entry (weights, optimizer state) plus every
    tensor an op creates in the block, each storage once, until freed. CUDA:
    `torch.cuda.max_memory_allocated` over the block (its peak statistics are reset).
    This is what `estimate_memory` estimates; a process's RSS also holds Python, the
    libraries, the allocator's cached pages and whatever the model load left behind.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes = 0
        self._meter: _LiveTensorBytes | None = None

    def __enter__(self) -> TensorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        self._meter = _LiveTensorBytes()
        _track_live(self._meter)
        self._meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._meter.__exit__(*exc)
        self.bytes = self._meter.peak


def measure_peak(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensors alive while `fn()` runs, counting those alive before it
    (`TensorPeak` around the call)."""
    with TensorPeak(device) as peak:
        fn()
    return peak.bytes


def process_overhead(device: str = "cpu") -> int:
    """Bytes this process holds now beyond live tensors; 0 where it cannot tell.

    CPU: resident set minus live tensor bytes (Python, torch and other libraries, freed
    pages the allocator keeps, such as the fp32 copy a 4-bit load quantized away). CUDA:
    what the caching allocator reserved beyond what is allocated (the CUDA context,
    a few hundred MiB, is not visible to torch and not counted).
    """
    if torch.device(device).type == "cuda":
        return max(int(torch.cuda.memory_reserved() - torch.cuda.memory_allocated()), 0)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux
        return 0
    return max(rss - live_tensor_bytes(), 0)


__all__ = ["TensorPeak", "live_tensor_bytes", "measure_peak", "process_overhead"]
