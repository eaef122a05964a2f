"""Many threads, one engine: each request gets exactly its own adapter's output.

8 threads each run several requests with a random adapter (None, LoRA, DoRA, IA3, prefix and
prompt tuning; single prompts and batches) at the same time; every result must equal what
the same request gives when run alone, single-threaded."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from runtime_fixtures import ADAPTERS, PROMPTS, shared_separate

from edgepeft.runtime import Engine

THREADS = 8
REQUESTS_PER_THREAD = 6
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def separate(tiny_dir, tmp_path_factory):
    return shared_separate(tiny_dir, tmp_path_factory)


def _requests(seed=0):
    rng = random.Random(seed)
    choices = [None, *ADAPTERS]
    out = []
    for _ in range(THREADS * REQUESTS_PER_THREAD):
        adapter = rng.choice(choices)
        prompt = rng.choice([*PROMPTS, PROMPTS[:2], PROMPTS])  # single prompts and batches
        out.append((adapter, prompt))
    return out


def _run(engine, request):
    adapter, prompt = request
    results = engine.generate(
        prompt, adapter=adapter, max_new_tokens=NEW_TOKENS, return_result=True
    )
    results = results if isinstance(results, list) else [results]
    return [r.token_ids for r in results]


def test_threads_with_different_adapters_get_their_own_output(separate):
    engine = Engine(separate.out, threads=1)
    requests = _requests()
    alone = {}
    for request in requests:
        key = (request[0], str(request[1]))
        if key not in alone:
            alone[key] = _run(engine, request)
    assert len({str(v) for v in alone.values()}) > len(ADAPTERS)  # the adapters differ

    start = threading.Barrier(THREADS)

    def worker(index):
        start.wait()  # all threads begin together
        mine = requests[index * REQUESTS_PER_THREAD : (index + 1) * REQUESTS_PER_THREAD]
        return [(request, _run(engine, request)) for request in mine]

    with ThreadPoolExecutor(THREADS) as pool:
        done = [r for rs in pool.map(worker, range(THREADS)) for r in rs]
    assert len(done) == len(requests)
    for (adapter, prompt), got in done:
        assert got == alone[(adapter, str(prompt))], (adapter, prompt)
    # requests overlapped (several batch-1 slots were needed at once), and slots were reused,
    # not leaked: at most one per thread and batch size
    slots = engine._pool._slots
    assert sum(s.batch == 1 for s in slots) > 1
    assert len(slots) <= THREADS * 3


def test_streams_interleaved_on_one_thread(separate):
    """Two unfinished streams on one thread each keep their own cache."""
    engine = Engine(separate.out)
    want_a = engine.generate(PROMPTS[0], adapter="lora", max_new_tokens=NEW_TOKENS)
    want_b = engine.generate(PROMPTS[2], adapter="prefix", max_new_tokens=NEW_TOKENS)
    a = engine.stream(PROMPTS[0], adapter="lora", max_new_tokens=NEW_TOKENS)
    b = engine.stream(PROMPTS[2], adapter="prefix", max_new_tokens=NEW_TOKENS)
    got_a, got_b = [], []
    for _ in range(3):  # alternate: each stream's slot stays taken while it is suspended
        got_a.append(next(a, ""))
        got_b.append(next(b, ""))
    got_a += list(a)
    got_b += list(b)
    assert "".join(got_a) == want_a and "".join(got_b) == want_b


def test_unload_while_other_threads_generate(separate):
    engine = Engine(separate.out)
    want = _run(engine, ("dora", PROMPTS))
    stop = threading.Event()
    results, errors = [], []

    def generate():
        while not stop.is_set():
            try:
                results.append(_run(engine, ("dora", PROMPTS)))
            except Exception as e:  # the unknown-adapter error while it is unloaded
                errors.append(e)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(5):
        engine.unload_adapter("dora")
        engine.load_adapter(separate.out / "adapters/dora.onnx_adapter")
    stop.set()
    for t in threads:
        t.join()
    assert results and all(r == want for r in results)
    assert all("no adapter named 'dora'" in str(e) for e in errors)
