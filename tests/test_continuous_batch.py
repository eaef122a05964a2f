"""Continuous batching (runtime/continuous.py): rows join a running batch at any step and
leave it when they end or are cancelled; each row's tokens equal that request alone."""

from __future__ import annotations

import pytest
from runtime_fixtures import PROMPTS, shared_separate

from edgepeft.runtime import Engine
from edgepeft.runtime.continuous import CannotJoin
from edgepeft.runtime.errors import UnknownAdapterError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    return Engine(shared_separate(tiny_dir, tmp_path_factory).out, threads=1)


def _key(prompt, adapter, **options) -> tuple:
    """A request as a hashable key: (prompt, adapter, sorted options)."""
    return (prompt, adapter, tuple(sorted(options.items())))


def _drive(batch, arrivals: dict[int, list[tuple]]) -> dict[tuple, tuple]:
    """Step the batch; the requests arrivals[k] (keys) arrive at step k and join as soon as
    they fit, oldest first. Returns {key: (result, streamed text)}."""
    waiting, handles, results, pieces, step = [], {}, {}, {}, 0
    last = max(arrivals)
    while step <= last or waiting or batch.live:
        waiting.extend(arrivals.get(step, []))
        while waiting:
            prompt, adapter, options = waiting[0]
            row = batch.request(prompt, adapter, **dict(options))
            if not batch.fits(row):
                break
            handles[batch.join(row)] = waiting.pop(0)
        for update in batch.step():
            key = handles[update.handle]
            assert update.error is None
            pieces.setdefault(key, []).append(update.piece)
            if update.result is not None:
                results[key] = update.result
        step += 1
        assert step < 500
    return {key: (results[key], "".join(pieces[key])) for key in handles.values()}


def _alone(engine, key):
    prompt, adapter, options = key
    return engine.generate(prompt, adapter=adapter, return_result=True, **dict(options))


def test_rows_joining_at_every_step_answer_as_alone(engine):
    """LoRA rows, base rows and a sampled row join at different steps, and a row reuses
    the one a finished request left."""
    arrivals = {
        0: [_key(PROMPTS[0], "lora", max_new_tokens=9)],
        2: [_key(PROMPTS[1], None, max_new_tokens=5), _key(PROMPTS[2], "lora", max_new_tokens=4)],
        5: [_key(PROMPTS[1], "lora", max_new_tokens=7, temperature=0.9, seed=4)],
        6: [_key(PROMPTS[0], None, max_new_tokens=6, stop="zz")],
    }
    with engine.open_batch(rows=3) as batch:
        got = _drive(batch, arrivals)
    assert len(got) == 5
    for key, (result, text) in got.items():
        alone = _alone(engine, key)
        assert result.token_ids == alone.token_ids, key
        assert text == alone.text and result.finish_reason == alone.finish_reason


@pytest.mark.parametrize("exclusive", ["ia3", "dora", "bottleneck"])
def test_an_adapter_that_does_not_stack_batches_with_itself_only(engine, exclusive):
    with engine.open_batch(rows=4) as batch:
        first = batch.request(PROMPTS[1], exclusive, max_new_tokens=6)
        batch.join(first)
        assert not batch.fits(batch.request(PROMPTS[0], "lora", max_new_tokens=3))
        assert not batch.fits(batch.request(PROMPTS[0], None, max_new_tokens=3))
        same = batch.request(PROMPTS[0], exclusive, max_new_tokens=3)
        assert batch.fits(same)
        handle = batch.join(same)
        results = {}
        while batch.live:
            for update in batch.step():
                if update.result is not None:
                    results[update.handle] = update.result
    alone = engine.generate(PROMPTS[0], adapter=exclusive, max_new_tokens=3, return_result=True)
    assert results[handle].token_ids == alone.token_ids
    assert len(results) == 2


def test_a_row_that_leaves_frees_its_row_for_the_next(engine):
    with engine.open_batch(rows=1) as batch:
        handle = batch.join(batch.request(PROMPTS[0], "lora", max_new_tokens=50))
        batch.step()
        assert not batch.fits(batch.request(PROMPTS[1], None, max_new_tokens=3))
        batch.leave(handle)
        assert batch.live == 0 and batch.columns == 0
        second = batch.join(batch.request(PROMPTS[1], None, max_new_tokens=3))
        results = [u.result for _ in range(3) for u in batch.step() if u.result is not None]
    alone = engine.generate(PROMPTS[1], max_new_tokens=3, return_result=True)
    assert second != handle and results[0].token_ids == alone.token_ids


def test_a_longer_prompt_waits_until_the_batch_has_its_columns(engine):
    with engine.open_batch(rows=2) as batch:
        batch.join(batch.request(PROMPTS[0], None, max_new_tokens=40, ignore_eos=True))
        longer = batch.request(PROMPTS[2], "lora", max_new_tokens=4)
        gap = len(longer.prompt_ids) - batch.columns
        assert gap > 0
        steps = 0
        while not batch.fits(longer):
            batch.step()
            steps += 1
        assert steps == gap  # one column per decode step


def test_what_cannot_join_says_why(engine):
    with engine.open_batch(rows=2, context=16, max_columns=32) as small:
        with pytest.raises(
            CannotJoin, match=r"need \d+ cache columns, more than a batch grows to \(32"
        ):
            small.request(PROMPTS[0], None, max_new_tokens=40)
    with engine.open_batch(rows=2) as batch:
        for prefix in ("prefix", "prompt"):
            with pytest.raises(CannotJoin, match=f"{prefix!r} seeds a KV prefix"):
                batch.request(PROMPTS[0], prefix)
        with pytest.raises(UnknownAdapterError, match="no-such-adapter"):
            batch.request(PROMPTS[0], "no-such-adapter")


def test_a_request_longer_than_the_batch_waits_for_it_to_empty_then_grows_it(engine):
    with engine.open_batch(rows=2, context=16) as batch:
        short = batch.request(PROMPTS[0], "lora", max_new_tokens=4)
        batch.join(short)
        long = batch.request(PROMPTS[1], "lora", max_new_tokens=40, ignore_eos=True)
        assert not batch.fits(long)  # 16 columns cannot hold it beside the running row
        while batch.live:
            batch.step()
        assert batch.fits(long)
        handle = batch.join(long)
        assert batch.capacity >= len(long.prompt_ids) + 39
        results = {}
        while batch.live:
            results.update({u.handle: u.result for u in batch.step() if u.result is not None})
        again = batch.request(PROMPTS[0], None, max_new_tokens=2)
        batch.join(again)
        assert batch.capacity == 16  # back to its context once a request fits it
    alone = engine.generate(PROMPTS[1], adapter="lora", max_new_tokens=40, ignore_eos=True,
                            return_result=True)  # fmt: skip
    assert results[handle].token_ids == alone.token_ids
