"""The queue between HTTP handlers and the engine: bounded, one worker, cancellable, batching.

    handler ─ submit(job, sink) ─► deque (≤ max_queue waiting; full: QueueFullError → 429)
                                     │ one worker thread, oldest first
                                     ▼
    fused export: one ContinuousBatch of max_batch rows (runtime/continuous.py)
        before every decode step, waiting jobs join in queue order while the oldest fits
        (a free row, its prompt within the batch's columns, an adapter that mixes with the
        rows running: LoRA and the base mix, another adapter only with itself); a job that
        does not fit yet holds the ones behind it until it does (no job is overtaken
        forever); each row has its own sampler and options and equals that job run alone
        a job whose adapter seeds a KV prefix, or that needs more cache columns than the
        batch grows to (--batch-context x 4), runs alone once the batch is empty:
            Engine.stream(job.prompt, adapter=job.adapter, return_result=True)
    traced (generic) export: Engine.stream_batch of the oldest job and the waiting ones
        with its options (greedy, same adapter or LoRA / base), run to its last row
                  each text piece ──► sink(Piece)       cancelled / past deadline: the row
                  the result      ──► sink(Finished)    leaves between two decode steps,
                  an exception    ──► sink(Failed)      its slot freed, sink(Failed)
    cancel(ticket): a waiting ticket leaves the queue at once; a running one stops at its
    next piece.  close(): no new submits; what is queued or running finishes; the worker ends.

`sink` is called on the worker thread and must not block (the app hands events to its
event loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgepeft.runtime.continuous import CannotJoin
from edgepeft.runtime.engine import GenerationResult
from edgepeft.serve.errors import (
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    ShuttingDownError,
)


@dataclass(frozen=True)
class Job:
    """One request as the engine sees it."""

    prompt: object
    """A string, token ids, or chat messages [{"role", "content"}] (Engine.encode)."""
    adapter: str | None
    """A loaded adapter's name; None: the base."""
    model: str
    """The name the request used (the base's or the adapter's): metrics are counted by it."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of Engine.stream: max_new_tokens, temperature, top_p, stop, seed, ..."""


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Piece | Finished | Failed
Sink = Callable[[Event], None]


@dataclass(eq=False)
class Ticket:
    """A submitted job: where its events go and whether it should stop."""

    id: int
    job: Job
    sink: Sink
    deadline: float
    """time.monotonic() after which the job is stopped (RequestTimeoutError)."""
    submitted: float
    started: float = 0.0
    """time.monotonic() when it began decoding (its generation time counts from here)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: BaseException | None = None
    """What a cancelled ticket fails with (default: RequestCancelledError)."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set once the last event (Finished or Failed) went to the sink."""
    row: object | None = None
    """Its RowRequest, once a continuous batch checked and tokenized the job."""
    refused: BaseException | None = None
    """Why the continuous batch's check refused the job (checked once, like `row`)."""


class Scheduler:
    """Runs submitted jobs through one Engine on one worker thread, oldest first.

    Args:
        engine: An edgepeft.runtime.Engine (or anything with its `stream`).
        max_queue: Jobs that may wait; one more raises QueueFullError.
        timeout_s: A job's deadline, counted from submit (waiting included).
        metrics: An edgepeft.serve.metrics.Metrics to count requests and tokens in.
        max_batch: Most jobs decoded together in one batch (1: one at a time).
        batch_context: Cache columns of the continuous batch (None: its default).
    """

    def __init__(
        self,
        engine,
        *,
        max_queue: int = 16,
        timeout_s: float = 300.0,
        metrics=None,
        max_batch: int = 8,
        batch_context: int | None = None,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_context = batch_context
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._queue: deque[Ticket] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._running: list[Ticket] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the handlers' side

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                # daemon: a hard exit never hangs on it; close() is the orderly way out
                self._thread = threading.Thread(
                    target=self._work, name="edgepeft-serve-worker", daemon=True
                )
                self._thread.start()

    def submit(self, job: Job, sink: Sink) -> Ticket:
        """Queue `job`; its events go to `sink` (on the worker thread).

        Raises:
            QueueFullError: max_queue jobs are waiting already.
            ShuttingDownError: close() was called.
        """
        now = time.monotonic()
        with self._lock:
            if self._closing:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._queue)} requests are waiting already (the server's --max-queue "
                    f"{self.max_queue}); retry later"
                )
            ticket = Ticket(next(self._ids), job, sink, now + self.timeout_s, now)
            self._queue.append(ticket)
            self._lock.notify_all()
        return ticket

    def cancel(self, ticket: Ticket, reason: BaseException | None = None) -> None:
        """Stop `ticket`: out of the queue now, or at the running job's next piece.

        Its sink gets Failed(reason), by default RequestCancelledError (the client left).
        """
        with self._lock:
            if ticket.done.is_set() or ticket.cancelled.is_set():
                return
            ticket.reason = reason or RequestCancelledError("the client went away")
            ticket.cancelled.set()
            try:
                self._queue.remove(ticket)
            except ValueError:
                return  # running (the worker sees the flag) or finishing
        self._fail(ticket, ticket.reason)

    def close(self, timeout: float | None = None) -> bool:
        """Take no more jobs, let the queued and running ones finish, end the worker.

        Returns:
            True if the worker ended within `timeout` seconds.
        """
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------ the worker's side

    def _next(self) -> list[Ticket]:
        """The oldest job and the waiting ones it can batch with (empty: closing)."""
        with self._lock:
            while not self._queue:
                if self._closing:
                    return []
                self._lock.wait()
            first = self._queue.popleft()
            batch = [first]
            kinds = {name: info.kind for name, info in self.engine.adapters().items()}
            key = self._batch_key(first.job, kinds)
            if key is not None:
                for ticket in list(self._queue):
                    if len(batch) == self.max_batch:
                        break
                    if self._batch_key(ticket.job, kinds) == key:
                        self._queue.remove(ticket)
                        batch.append(ticket)
            self._running = batch
            return batch

    def _batch_key(self, job: Job, kinds: dict[str, str]) -> tuple | None:
        """Jobs with equal keys decode together, each as it would alone; None: alone only.

        Greedy only (a sampled row draws from the batch's one generator), the same options
        but max_new_tokens; the adapter must be LoRA (stacked per row) or the base, else
        the key names it, so it batches only with itself. `kinds`: adapter name -> kind.
        """
        options = {k: v for k, v in job.options.items() if k != "max_new_tokens"}
        if self.max_batch == 1 or options.get("temperature", 0.0) != 0:
            return None
        options.pop("seed", None)  # greedy: the seed draws nothing
        mixes = job.adapter is None or kinds.get(job.adapter) == "lora"
        return (repr(sorted(options.items())), None if mixes else job.adapter)

    def _work(self) -> None:
        open_batch = getattr(self.engine, "open_batch", None)
        try:
            batch = open_batch(self.max_batch, self.batch_context) if open_batch else None
        except CannotJoin:  # a traced graph: whole batches, one after another
            batch = None
        if batch is None:
            self._work_in_batches()
            return
        try:
            self._work_continuously(batch)
        finally:
            batch.close()

    # ------------------------------------------------------------ continuous batching

    def _work_continuously(self, batch) -> None:
        rows: dict[int, Ticket] = {}  # handle -> the ticket decoding in that row
        while True:
            with self._lock:
                while not self._queue and not rows:
                    if self._closing:
                        return
                    self._lock.wait()
            self._admit(batch, rows)
            if not rows:
                continue
            try:
                updates = batch.step()
            except Exception as e:  # the worker outlives any one batch: its rows fail
                for handle, ticket in rows.items():
                    batch.leave(handle)
                    self._fail(ticket, e)
                rows.clear()
                updates = []
            for update in updates:
                ticket = rows[update.handle]
                if update.piece:
                    self._send(ticket, Piece(update.piece))
                if update.error is not None:
                    self._fail(ticket, update.error)
                elif update.result is not None:
                    self._finish(ticket, update.result, time.monotonic() - ticket.started)
                if ticket.done.is_set():
                    del rows[update.handle]
            now = time.monotonic()
            for handle, ticket in list(rows.items()):
                if ticket.cancelled.is_set():
                    error = ticket.reason or RequestCancelledError("the client went away")
                elif now > ticket.deadline:
                    error = self._timeout("generating")
                else:
                    continue
                batch.leave(handle)
                del rows[handle]
                self._fail(ticket, error)
            with self._lock:
                self._running = list(rows.values())

    def _admit(self, batch, rows: dict[int, Ticket]) -> None:
        """Join waiting jobs, oldest first, while the oldest fits the batch."""
        if not rows:  # an empty batch starts at the longest prompt of those about to join
            with self._lock:
                waiting = list(self._queue)[: self.max_batch]
            joinable = itertools.takewhile(lambda t: self._checked(batch, t), waiting)
            batch.begin([t.row for t in joinable])
        while True:
            with self._lock:
                ticket = self._queue[0] if self._queue else None
            if ticket is None:
                return
            if time.monotonic() > ticket.deadline:
                self._take(ticket)
                self._fail(ticket, self._timeout("waiting in the queue"))
                continue
            if not self._checked(batch, ticket):
                if isinstance(ticket.refused, CannotJoin):
                    if rows:  # it runs alone once the batch is empty
                        return
                    if self._take(ticket):
                        if self.metrics is not None:
                            self.metrics.batched(1)
                        with self._lock:
                            self._running = [ticket]
                        self._run(ticket)
                        with self._lock:
                            self._running = []
                elif self._take(ticket):  # a bad request fails alone
                    self._fail(ticket, ticket.refused)
                continue
            if not batch.fits(ticket.row):
                return
            if not self._take(ticket):
                continue  # cancelled meanwhile
            if self.metrics is not None:
                self.metrics.joined(new_batch=not rows)
            ticket.started = time.monotonic()
            try:
                rows[batch.join(ticket.row)] = ticket
            except Exception as e:  # e.g. its adapter unloaded since it was checked
                self._fail(ticket, e)
            with self._lock:
                self._running = list(rows.values())

    def _checked(self, batch, ticket: Ticket) -> bool:
        """Check and tokenize the ticket's job for `batch`, once: True with Ticket.row set,
        False with Ticket.refused (CannotJoin: it runs alone; else it fails)."""
        if ticket.row is None and ticket.refused is None:
            job = ticket.job
            try:
                ticket.row = batch.request(job.prompt, job.adapter, **job.options)
            except Exception as e:
                ticket.refused = e
        return ticket.row is not None

    def _take(self, ticket: Ticket) -> bool:
        """Take `ticket` off the queue; False if it left meanwhile (cancelled)."""
        with self._lock:
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            return True

    # ------------------------------------------------------------ whole batches

    def _work_in_batches(self) -> None:
        while batch := self._next():
            if self.metrics is not None:
                self.metrics.batched(len(batch))
            try:
                if len(batch) == 1:
                    self._run(batch[0])
                else:
                    self._run_batch(batch)
            finally:
                with self._lock:
                    self._running = []

    def _run(self, ticket: Ticket) -> None:
        job = ticket.job
        if time.monotonic() > ticket.deadline:
            self._fail(ticket, self._timeout("waiting in the queue"))
            return
        start = time.monotonic()
        pieces = self.engine.stream(
            job.prompt, adapter=job.adapter, return_result=True, **job.options
        )
        try:
            for item in pieces:
                if isinstance(item, GenerationResult):
                    self._finish(ticket, item, time.monotonic() - start)
                    return
                self._send(ticket, Piece(item))
                if ticket.cancelled.is_set():
                    raise ticket.reason or RequestCancelledError("the client went away")
                if time.monotonic() > ticket.deadline:
                    raise self._timeout("generating")
            raise RuntimeError("Engine.stream ended without its result")
        except Exception as e:  # the worker outlives any one request
            self._fail(ticket, e)
        finally:
            pieces.close()  # ends the request between decode steps; frees its slot

    def _run_batch(self, tickets: list[Ticket]) -> None:
        now = time.monotonic()
        for ticket in [t for t in tickets if now > t.deadline]:
            self._fail(ticket, self._timeout("waiting in the queue"))
        live = [t for t in tickets if not t.done.is_set()]
        if len(live) < 2:
            for ticket in live:
                self._run(ticket)
            return
        jobs = [t.job for t in live]
        shared = {k: v for k, v in jobs[0].options.items() if k != "max_new_tokens"}
        start = time.monotonic()
        steps = self.engine.stream_batch(
            [j.prompt for j in jobs],
            adapter=[j.adapter for j in jobs],
            max_new_tokens=[j.options.get("max_new_tokens", 64) for j in jobs],
            **shared,
        )
        try:
            first = next(steps)  # prefill: where a batch-wide failure shows
        except Exception:  # e.g. an adapter unloaded meanwhile: each job says so alone
            steps.close()
            for ticket in live:
                self._run(ticket)
            return
        try:
            for item in itertools.chain([first], steps):
                if item and isinstance(item[0], GenerationResult):
                    for ticket, result in zip(live, item, strict=True):
                        if not ticket.done.is_set():
                            self._finish(ticket, result, time.monotonic() - start)
                    return
                for ticket, piece in zip(live, item, strict=True):
                    if ticket.done.is_set():
                        continue
                    if piece:
                        self._send(ticket, Piece(piece))
                    if ticket.cancelled.is_set():
                        self._fail(
                            ticket, ticket.reason or RequestCancelledError("the client went away")
                        )
                    elif time.monotonic() > ticket.deadline:
                        self._fail(ticket, self._timeout("generating"))
                if all(t.done.is_set() for t in live):
                    return
            raise RuntimeError("Engine.stream_batch ended without its results")
        except Exception as e:  # the worker outlives any one batch
            for ticket in live:
                self._fail(ticket, e)
        finally:
            steps.close()

    def _timeout(self, where: str) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the request took longer than the server's --timeout {self.timeout_s:g} s "
            f"(stopped while {where}); ask for fewer tokens or retry when the server is less busy"
        )

    def _finish(self, ticket: Ticket, result: GenerationResult, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.finished(ticket.job.model, result, seconds)
        self._send(ticket, Finished(result))
        ticket.done.set()

    def _fail(self, ticket: Ticket, error: BaseException) -> None:
        if ticket.done.is_set():
            return
        if self.metrics is not None:
            self.metrics.failed(ticket.job.model, _outcome(error))
        self._send(ticket, Failed(error))
        ticket.done.set()

    def _send(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.sink(event)
        except Exception:  # a sink whose reader is gone must not stop the worker
            ticket.cancelled.set()


def _outcome(error: BaseException) -> str:
    if isinstance(error, RequestCancelledError):
        return "cancelled"
    if isinstance(error, RequestTimeoutError):
        return "timeout"
    return "error"


__all__ = ["Event", "Failed", "Finished", "Job", "Piece", "Scheduler", "Sink", "Ticket"]
