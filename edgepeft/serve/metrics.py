"""Counters of one server, rendered as Prometheus text (GET /metrics); no client library.

    edgepeft_queue_length                 gauge    requests waiting for the worker
    edgepeft_requests_running             gauge
    edgepeft_adapters_loaded              gauge
    edgepeft_requests_total{model,outcome}  counter  outcome: ok | error | timeout | cancelled
    edgepeft_prompt_tokens_total{model}     counter
    edgepeft_generation_tokens_total{model} counter
    edgepeft_generation_seconds_total       counter  worker time spent generating
    edgepeft_batches_total                  counter  batches the worker ran requests in (a
                                                     continuous batch: from empty to empty)
    edgepeft_batch_rows_total               counter  requests in them (/ batches: mean size)
    edgepeft_tokens_per_second              gauge    generated tokens / generation seconds of
                                                     the requests finished in the last WINDOW_S

Rates over any other window come from the counters (PromQL `rate(...)`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

WINDOW_S = 30.0


class Metrics:
    """Thread-safe counters; the scheduler's worker writes, /metrics reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.prompt_tokens: Counter[str] = Counter()
        self.generation_tokens: Counter[str] = Counter()
        self.generation_seconds = 0.0
        self.batches = 0
        self.batch_rows = 0
        self._recent: deque[tuple[float, int, float]] = deque()  # (when, tokens, seconds)

    def finished(self, model: str, result, seconds: float) -> None:
        tokens = len(result.token_ids)
        with self._lock:
            self.requests[model, "ok"] += 1
            self.prompt_tokens[model] += len(result.prompt_ids)
            self.generation_tokens[model] += tokens
            self.generation_seconds += seconds
            self._recent.append((time.monotonic(), tokens, seconds))

    def batched(self, rows: int) -> None:
        """The worker started a batch of `rows` requests (1: a request alone)."""
        with self._lock:
            self.batches += 1
            self.batch_rows += rows

    def joined(self, new_batch: bool) -> None:
        """A request joined the continuous batch; `new_batch`: it was empty (a new batch)."""
        with self._lock:
            self.batches += int(new_batch)
            self.batch_rows += 1

    def failed(self, model: str, outcome: str) -> None:
        with self._lock:
            self.requests[model, outcome] += 1

    def tokens_per_second(self) -> float:
        with self._lock:
            horizon = time.monotonic() - WINDOW_S
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            tokens = sum(t for _, t, _ in self._recent)
            seconds = sum(s for _, _, s in self._recent)
        return tokens / seconds if seconds > 0 else 0.0

    def render(self, *, waiting: int, running: int, adapters: int) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            requests = dict(self.requests)
            prompt = dict(self.prompt_tokens)
            generated = dict(self.generation_tokens)
            seconds = self.generation_seconds
            batches, batch_rows = self.batches, self.batch_rows
        lines: list[str] = []
        _metric(lines, "queue_length", "gauge", "Requests waiting for the worker.", [((), waiting)])
        _metric(lines, "requests_running", "gauge", "Requests being generated.", [((), running)])
        _metric(lines, "adapters_loaded", "gauge", "Adapters loaded in the engine.",
                [((), adapters)])  # fmt: skip
        _metric(lines, "requests_total", "counter", "Requests ended, by model and outcome.",
                [((("model", m), ("outcome", o)), n) for (m, o), n in sorted(requests.items())])  # fmt: skip
        _metric(lines, "prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                [((("model", m),), n) for m, n in sorted(prompt.items())])  # fmt: skip
        _metric(lines, "generation_tokens_total", "counter", "Tokens generated.",
                [((("model", m),), n) for m, n in sorted(generated.items())])  # fmt: skip
        _metric(lines, "generation_seconds_total", "counter",
                "Seconds the worker spent generating.", [((), seconds)])  # fmt: skip
        _metric(lines, "batches_total", "counter", "Batches the worker ran requests in.",
                [((), batches)])  # fmt: skip
        _metric(lines, "batch_rows_total", "counter", "Requests in those batches.",
                [((), batch_rows)])  # fmt: skip
        _metric(lines, "tokens_per_second", "gauge",
                f"Generated tokens per generation second, requests of the last {WINDOW_S:g} s.",
                [((), rate)])  # fmt: skip
        return "\n".join(lines) + "\n"


def _metric(lines: list[str], name: str, kind: str, doc: str, samples) -> None:
    full = f"edgepeft_{name}"
    lines += [f"# HELP {full} {doc}", f"# TYPE {full} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        lines.append(f"{full}{{{text}}} {_number(value)}" if text else f"{full} {_number(value)}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


__all__ = ["WINDOW_S", "Metrics"]
