"""What a training run shows and leaves behind.

    every step ──► Progress (tqdm: loss, lr, tokens/s, memory, ETA; silent when quiet)
               ──► MetricsLog ──► metrics.jsonl   {"kind": "train"|"eval", "step", ...} per line
    at the end ──► loss_curves.png (train loss, eval loss)      plot_losses
               ──► summary.json + printed summary                write_summary, format_summary
    at start   ──► train_config.json                             write_json
    first steps ─► PeakMeter: peak live tensors (what the memory planner estimates, printed
                   beside its plan) and, apart, the process's peak RSS

Files other than the streamed metrics.jsonl are written to a temporary name and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from edgepeft import atomic
from edgepeft.train.meter import TensorPeak

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curves.png"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "train_config.json"


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to a temporary sibling of `path`, then rename it onto `path`."""
    return atomic.write_bytes(path, data)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic.write_json(path, value, sort_keys=True)


# ---------------------------------------------------------------- memory


class PeakMeter:
    """A run's peak memory, by what each number counts.

    tensors: live tensor bytes, the measure `edgepeft.train.memory` plans: on CUDA the
    allocator's peak over the run; on CPU `TensorPeak` over the first `METERED_STEPS`
    steps of the session (the second runs with the optimizer state live; later steps
    repeat the same shapes, so only a longer padded batch could go higher). rss: the
    process's peak resident set: tensors plus Python, the libraries, the allocator's
    cached pages and what loading the model left behind (`peak_rss`).
    """

    METERED_STEPS = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps = 0
        self._cpu_peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one optimizer step (forward, backward, update)."""
        self.steps += 1
        if self.device.type == "cuda" or self.steps > self.METERED_STEPS:
            yield
            return
        with TensorPeak(self.device) as peak:
            yield
        self._cpu_peak = max(self._cpu_peak, peak.bytes)

    def tensors(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._cpu_peak


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: CUDA's peak allocation since the run began, or this process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux
        return peak_rss()


def peak_rss() -> int:
    """This process's peak resident set size in bytes (0 where unknown), on any device."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


# ---------------------------------------------------------------- progress and metrics


class Progress:
    """A tqdm bar over optimizer steps; prints nothing when quiet."""

    def __init__(self, total: int, initial: int, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.quiet = quiet
        self.bar = tqdm(
            total=total, initial=initial, disable=quiet, unit="step", desc="train", dynamic_ncols=True
        )

    def update(self, loss: float, lr: float, tokens_per_s: float, memory: int) -> None:
        self.bar.set_postfix_str(
            f"loss={loss:.4f} lr={lr:.2e} {tokens_per_s:,.0f} tok/s mem={format_bytes(memory)}",
            refresh=False,
        )
        self.bar.update(1)

    def write(self, text: str) -> None:
        if not self.quiet:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written."""

    def __init__(self, path: str | os.PathLike, records: Sequence[Mapping[str, Any]] = ()) -> None:
        """Start the file over with `records` (those a resumed checkpoint holds)."""
        self.path = Path(path)
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in records))
        self._file = self.path.open("a")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- end of run


def plot_losses(
    path: str | os.PathLike,
    train: Sequence[tuple[int, float]],
    evals: Sequence[tuple[int, float]],
    title: str = "",
) -> Path:
    """PNG of the train loss per step and the eval loss per evaluation."""
    # The object API with the Agg canvas: no pyplot, so the caller's backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if evals:
        axes.plot(*zip(*evals, strict=True), label="eval", marker="o", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The printed end-of-run summary."""
    best = summary.get("best_val_loss")
    state = "interrupted" if summary.get("interrupted") else "stopped early" if summary.get(
        "stopped_early"
    ) else "done"
    lines = [
        f"training {state}: {summary['steps']}/{summary['total_steps']} steps in {summary['seconds']:.1f} s",
        f"  adapter {summary['adapter']!r}: {summary['trainable_params']:,} trainable parameters",
        f"  final train loss {summary['final_train_loss']:.4f}"
        if summary.get("final_train_loss") is not None
        else "  no step run",
        f"  best val loss {best:.4f} (perplexity {summary['best_val_perplexity']:.2f}) at step "
        f"{summary['best_step']}"
        if best is not None
        else "  no validation",
        f"  {summary['tokens_per_s']:,.0f} tokens/s",
        f"  {_peak_line(summary)}",
        f"  outputs in {summary['output_dir']}",
    ]
    return "\n".join(lines)


def _peak_line(summary: Mapping[str, Any]) -> str:
    """"peak live tensors 1.9 GiB (planned 2.0 GiB), process RSS 3.6 GiB"."""
    planned = summary.get("planned_peak_bytes")
    plan = f" (planned {format_bytes(planned)})" if planned else ""
    return (
        f"peak live tensors {format_bytes(summary['peak_tensor_bytes'])}{plan}, "
        f"process RSS {format_bytes(summary['peak_rss_bytes'])}"
    )
