"""The server's scheduler batches concurrent requests, mixed LoRA adapters in one forward,
lets a request join a running batch between decode steps, and every answer equals that
request run alone (serve/scheduler.py, runtime/continuous.py)."""

from __future__ import annotations

import threading

import pytest
from serve_fixtures import ADAPTERS, PROMPTS, shared_export

from edgepeft.runtime import Engine
from edgepeft.serve.metrics import Metrics
from edgepeft.serve.scheduler import Failed, Finished, Job, Piece, Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(shared_export(tmp_path_factory), threads=1)


class Collect:
    """A sink: the pieces and the last event of one ticket."""

    def __init__(self):
        self.pieces, self.last, self.done = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Piece):
            self.pieces.append(event.text)
        else:
            self.last = event
            self.done.set()


def _run_all(engine, jobs, max_batch=8):
    """Submit every job before the worker starts, so it finds them all waiting."""
    metrics = Metrics()
    scheduler = Scheduler(engine, max_queue=len(jobs), max_batch=max_batch, metrics=metrics)
    sinks = [Collect() for _ in jobs]
    for job, sink in zip(jobs, sinks, strict=True):
        scheduler.submit(job, sink)
    scheduler.start()
    for sink in sinks:
        assert sink.done.wait(120)
    assert scheduler.close(30)
    return sinks, metrics


def _job(prompt, adapter, max_new_tokens, **options):
    options = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **options}
    return Job(prompt, adapter, adapter or "base", options)


def test_mixed_greedy_requests_share_one_batch_and_answer_as_alone(engine):
    names = [*ADAPTERS, None]
    jobs = [_job(PROMPTS[i % 3], names[i % 3], 3 + i) for i in range(6)]
    sinks, metrics = _run_all(engine, jobs)
    assert (metrics.batches, metrics.batch_rows) == (1, 6)
    for job, sink in zip(jobs, sinks, strict=True):
        assert isinstance(sink.last, Finished), sink.last
        alone = engine.generate(job.prompt, adapter=job.adapter, return_result=True, **job.options)
        assert sink.last.result.token_ids == alone.token_ids, job
        assert "".join(sink.pieces) == alone.text
        assert sink.last.result.finish_reason == alone.finish_reason


def test_sampled_requests_and_differing_options_share_the_batch(engine):
    """Each row has its own sampler, seed and stop strings: one batch, each as alone."""
    jobs = [
        _job(PROMPTS[0], "sql", 4),
        _job(PROMPTS[1], "chat", 4, temperature=0.8, seed=3),
        _job(PROMPTS[2], None, 4, stop=["x"]),
        _job(PROMPTS[1], "chat", 5),
    ]
    sinks, metrics = _run_all(engine, jobs)
    assert metrics.batches == 1 and metrics.batch_rows == 4
    for job, sink in zip(jobs, sinks, strict=True):
        alone = engine.generate(job.prompt, adapter=job.adapter, return_result=True, **job.options)
        assert sink.last.result.token_ids == alone.token_ids


def test_max_batch_one_runs_each_request_alone(engine):
    jobs = [_job(p, a, 3) for p, a in zip(PROMPTS, [*ADAPTERS, None], strict=True)]
    _, metrics = _run_all(engine, jobs, max_batch=1)
    assert (metrics.batches, metrics.batch_rows) == (3, 3)


def test_a_cancelled_row_leaves_the_others_running(engine):
    metrics = Metrics()
    scheduler = Scheduler(engine, max_queue=4, max_batch=4, metrics=metrics)
    jobs = [_job(PROMPTS[0], "sql", 6), _job(PROMPTS[1], "chat", 6)]
    sinks = [Collect(), Collect()]
    tickets = [scheduler.submit(j, s) for j, s in zip(jobs, sinks, strict=True)]
    tickets[0].cancelled.set()  # as if its client left once the batch started
    scheduler.start()
    for sink in sinks:
        assert sink.done.wait(120)
    scheduler.close(30)
    assert isinstance(sinks[0].last, Failed)
    alone = engine.generate(jobs[1].prompt, adapter="chat", return_result=True, **jobs[1].options)
    assert sinks[1].last.result.token_ids == alone.token_ids


def test_a_request_joins_a_running_batch_and_finishes_first(engine):
    """A short request sent while a long one decodes joins between two decode steps and
    ends long before it: it never waits for the long one to finish."""
    metrics = Metrics()
    scheduler = Scheduler(engine, max_queue=4, max_batch=4, metrics=metrics)
    scheduler.start()
    long_sink, short_sink = Collect(), Collect()
    started = threading.Event()

    def long_events(event):
        long_sink(event)
        started.set()

    long_job = _job(PROMPTS[0], "sql", 400, ignore_eos=True)
    scheduler.submit(long_job, long_events)
    assert started.wait(60)  # the long request is decoding
    short = _job(PROMPTS[1], "chat", 6)
    scheduler.submit(short, short_sink)
    assert short_sink.done.wait(60)
    assert not long_sink.done.is_set()  # still decoding when the short one ended
    assert long_sink.done.wait(120)
    scheduler.close(30)
    assert (metrics.batches, metrics.batch_rows) == (1, 2)  # one batch, joined while running
    for job, sink in ((long_job, long_sink), (short, short_sink)):
        alone = engine.generate(job.prompt, adapter=job.adapter, return_result=True, **job.options)
        assert sink.last.result.token_ids == alone.token_ids
        assert "".join(sink.pieces) == alone.text
