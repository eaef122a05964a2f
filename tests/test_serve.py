"""edgepeft serve through the real `openai` client against a real uvicorn server: each answer
equals Engine.generate run alone (per adapter, plain and streamed, completions and chat), and
the server's limits answer with OpenAI-style errors (404 listing the names, 401, 400, 413,
429, 504); adapters load and unload over HTTP; a client that leaves frees the worker; SIGTERM
lets the request in flight finish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from bare_install import BLOCKED

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import ADAPTERS, LONG, PROMPTS, ServerThread, shared_export  # noqa: E402

from edgepeft.runtime import Engine  # noqa: E402
from edgepeft.serve import ServeConfig  # noqa: E402
from edgepeft.serve.app import create_app  # noqa: E402

KEY = "test-key-0123"
NEW = 12
BASE = "base"  # the served name of the base (--served-model-name)
MODELS = [BASE, *ADAPTERS]


def adapter_of(model):
    return None if model == BASE else model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(export):
    """The engine the answers must equal: run alone, in this process."""
    return Engine(export, threads=1)


@pytest.fixture(scope="module")
def served(export):
    engine = Engine(export, threads=1)
    config = ServeConfig(api_key=KEY, model_name=BASE, max_queue=1, max_tokens_limit=LONG,
                         max_body_bytes=64 * 1024)  # fmt: skip
    with ServerThread(create_app(engine, config)) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as c:
        yield c


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def idle(server):
    scheduler = server.app.state.server.scheduler
    return scheduler.running == 0 and scheduler.waiting == 0


def error_of(exc) -> dict:
    return exc.response.json()["error"]


# ---------------------------------------------------------------- the engine hook


def test_stream_with_result_ends_with_the_result_and_frees_its_slot_when_closed(reference):
    pieces = list(reference.stream(PROMPTS[0], adapter="sql", max_new_tokens=NEW,
                                   return_result=True))  # fmt: skip
    *texts, result = pieces
    want = reference.generate(PROMPTS[0], adapter="sql", max_new_tokens=NEW, return_result=True)
    assert "".join(texts) == result.text == want.text
    assert result.token_ids == want.token_ids and result.finish_reason == want.finish_reason
    # closed after two pieces: the next request reuses its slot rather than making another
    for _ in range(2):
        stream = reference.stream(PROMPTS[1], adapter="chat", max_new_tokens=200, ignore_eos=True)
        next(stream), next(stream)
        stream.close()
        before = reference.memory().kv_cache_bytes
    assert reference.memory().kv_cache_bytes == before


# ---------------------------------------------------------------- answers


def test_models_lists_the_base_then_the_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == MODELS
    assert all(m.parent == BASE for m in models[1:])


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_the_engine_alone(model, client, reference):
    for prompt in PROMPTS:
        want = reference.generate(prompt, adapter=adapter_of(model), max_new_tokens=NEW,
                                  return_result=True)  # fmt: skip
        got = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0)
        assert got.choices[0].text == want.text, (model, prompt)
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length"
                                                else "stop")  # fmt: skip
        assert got.usage.prompt_tokens == len(want.prompt_ids)
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.total_tokens == len(want.prompt_ids) + len(want.token_ids)
        assert got.model == model

        chunks = list(client.completions.create(
            model=model, prompt=prompt, max_tokens=NEW, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        finished = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finished[-1] == got.choices[0].finish_reason and set(finished[:-1]) == {None}
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # the adapters answer differently from the base and from each other
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=NEW,
                                          temperature=0).choices[0].text for m in MODELS}  # fmt: skip
    assert len(set(texts.values())) == len(MODELS)


@pytest.mark.parametrize("model", ["sql", BASE])
def test_chat_completion_equals_the_engine_alone(model, client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    want = reference.generate(messages, adapter=adapter_of(model), max_new_tokens=NEW,
                              return_result=True)  # fmt: skip
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW,
                                         temperature=0)  # fmt: skip
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_ids)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=NEW,
                                                 temperature=0, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    # content as a list of text parts is the same message
    parts = [{"role": "user", "content": [{"type": "text", "text": "the "},
                                          {"type": "text", "text": "fox"}]}]  # fmt: skip
    plain = [{"role": "user", "content": "the fox"}]
    assert (
        client.chat.completions.create(model=model, messages=parts, max_tokens=NEW, temperature=0)
        .choices[0]
        .message.content  # fmt: skip
        == reference.generate(plain, adapter=adapter_of(model), max_new_tokens=NEW)
    )


def test_stop_strings_end_the_answer_without_the_stop_text(client, reference):
    full = reference.generate(PROMPTS[1], adapter="chat", max_new_tokens=NEW)
    stop = full[4:6]
    assert len(stop) == 2
    want = reference.generate(PROMPTS[1], adapter="chat", max_new_tokens=NEW, stop=[stop, "zzzz"],
                              return_result=True)  # fmt: skip
    assert want.finish_reason == "stop" and stop not in want.text
    for stream in (False, True):
        got = client.completions.create(model="chat", prompt=PROMPTS[1], max_tokens=NEW,
                                        temperature=0, stop=[stop, "zzzz"], stream=stream)  # fmt: skip
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_the_engine_with_that_seed(client, reference):
    options = dict(temperature=0.9, top_p=0.8, seed=7)
    want = reference.generate(PROMPTS[2], adapter="sql", max_new_tokens=NEW, **options)
    assert want != reference.generate(PROMPTS[2], adapter="sql", max_new_tokens=NEW)  # sampled
    for _ in range(2):
        got = client.completions.create(model="sql", prompt=PROMPTS[2], max_tokens=NEW, **options)
        assert got.choices[0].text == want


def test_token_id_prompts_equal_text_prompts(client, reference):
    ids = reference.encode(PROMPTS[0])
    want = reference.generate(PROMPTS[0], adapter="chat", max_new_tokens=NEW)
    for prompt in (ids, [ids], [PROMPTS[0]]):
        got = client.completions.create(model="chat", prompt=prompt, max_tokens=NEW, temperature=0)
        assert got.choices[0].text == want


# ---------------------------------------------------------------- errors


def test_unknown_model_is_a_404_naming_the_loaded_models(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="sqll", prompt="x", max_tokens=2)
    error = error_of(e.value)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in MODELS)
    assert set(error) == {"message", "type", "param", "code"}


def test_a_wrong_or_missing_key_is_a_401(served, client):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
    assert error_of(e.value)["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert httpx.get(f"{served.url}/metrics").status_code == 401
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"  # no key needed


def test_limits_answer_400_and_413(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sql", prompt="x", max_tokens=LONG + 1)
    assert error_of(e.value)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sql", prompt="x", max_tokens=2, temperature=-1)
    assert error_of(e.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="sql", prompt="x", max_tokens=2, n=2)
    assert error_of(e.value)["param"] == "n"
    big = http.post("/v1/completions", json={"model": "sql", "prompt": "x" * 70_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    bad_json = http.post("/v1/completions", content=b"{not json",
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    ids = http.post("/v1/completions", json={"model": "sql", "prompt": [1, 99999], "max_tokens": 2})
    assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"
    route = http.get("/v1/nothing")
    assert route.status_code == 404 and "error" in route.json()


def test_a_full_queue_answers_429_and_the_queued_request_still_runs(export, reference):
    """One row (--max-batch 1) and one queue place: a third request is refused."""
    engine = Engine(export, threads=1)
    config = ServeConfig(model_name=BASE, max_queue=1, max_batch=1, max_tokens_limit=LONG)
    with ServerThread(create_app(engine, config)) as server, openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="none", max_retries=0
    ) as client:
        scheduler = server.app.state.server.scheduler
        long = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=LONG,
                                         temperature=0, extra_body={"ignore_eos": True},
                                         stream=True)  # fmt: skip
        next(iter(long))  # running: its row is the only one
        queued = {}
        thread = threading.Thread(target=lambda: queued.update(r=client.completions.create(
            model="chat", prompt=PROMPTS[1], max_tokens=NEW, temperature=0)))  # fmt: skip
        thread.start()
        wait_for(lambda: scheduler.waiting == 1, "the second request to queue")
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="sql", prompt="x", max_tokens=2)
        assert error_of(e.value)["code"] == "queue_full"
        long.close()  # the client leaves: the worker moves on to the queued request
        thread.join(120)
    want = reference.generate(PROMPTS[1], adapter="chat", max_new_tokens=NEW)
    assert queued["r"].choices[0].text == want


def test_a_request_past_its_timeout_is_a_504(export):
    engine = Engine(export, threads=1)
    config = ServeConfig(model_name=BASE, max_tokens_limit=LONG, request_timeout_s=0.2)
    with ServerThread(create_app(engine, config)) as server:
        body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": LONG, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
        streamed = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True},
                              timeout=120).text  # fmt: skip
        events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        counts = server.app.state.server.metrics.requests
        assert counts["sql", "timeout"] == 2


# ---------------------------------------------------------------- adapters over HTTP


def test_load_and_unload_adapters_over_http(export, client, http, reference):
    file = str(export / "adapters" / "sql.onnx_adapter")
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": file})
    assert loaded.status_code == 200, loaded.text
    assert [m.id for m in client.models.list().data] == [*MODELS, "sql2"]
    got = client.completions.create(model="sql2", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert got.choices[0].text == reference.generate(PROMPTS[0], adapter="sql", max_new_tokens=NEW)

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": file})
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
    missing = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": str(export / "nope.onnx_adapter")},
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_path"
    broken = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": str(export / "tokenizer.json")},
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "adapter_load_failed"

    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "sql2"}).status_code == 200
    assert [m.id for m in client.models.list().data] == MODELS
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql2", prompt=PROMPTS[0], max_tokens=2)
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql2"})
    assert gone.status_code == 404 and "sql" in gone.json()["error"]["message"]
    base = http.post("/v1/unload_lora_adapter", json={"lora_name": BASE})
    assert base.status_code == 400


# ---------------------------------------------------------------- clients that leave


def test_a_client_leaving_mid_stream_frees_the_worker(served, client, reference):
    metrics = served.app.state.server.metrics
    before = metrics.requests["chat", "cancelled"]
    stream = client.completions.create(model="chat", prompt=PROMPTS[2], max_tokens=LONG,
                                       temperature=0, extra_body={"ignore_eos": True}, stream=True)  # fmt: skip
    pieces = iter(stream)
    next(pieces), next(pieces)
    stream.close()
    wait_for(lambda: idle(served), "the worker to stop the abandoned request")
    assert metrics.requests["chat", "cancelled"] == before + 1  # stopped, not run to the end
    got = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert got.choices[0].text == reference.generate(PROMPTS[0], adapter="sql", max_new_tokens=NEW)


def test_a_client_leaving_a_plain_request_frees_the_worker(served):
    metrics = served.app.state.server.metrics
    before = metrics.requests["sql", "cancelled"]
    body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    wait_for(lambda: idle(served), "the worker to stop the abandoned request")
    assert metrics.requests["sql", "cancelled"] == before + 1


def test_metrics_count_requests_and_tokens(http):
    text = http.get("/metrics").text
    assert "edgepeft_queue_length 0" in text
    assert re.search(r'edgepeft_requests_total\{model="sql",outcome="ok"\} [1-9]', text)
    assert re.search(r'edgepeft_generation_tokens_total\{model="chat"\} [1-9]', text)
    assert "edgepeft_tokens_per_second" in text and "edgepeft_adapters_loaded 2" in text


# ---------------------------------------------------------------- the command


def test_the_command_drains_on_sigterm(export):
    """`edgepeft serve` in a subprocess: SIGTERM with a request in flight finishes it, exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEPEFT_API_KEY": KEY}
    command = [sys.executable, "-m", "edgepeft.cli", "serve", str(export), "--port", "0",
               "--threads", "1", "--served-model-name", BASE, "--max-tokens", str(LONG)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Uvicorn running on" in line for line in lines), "the server", 120)
        url = re.search(r"(http://\S+)", next(x for x in lines if "Uvicorn running" in x))[1]
        headers = {"Authorization": f"Bearer {KEY}"}
        answer = {}
        tokens = 8000  # seconds of decoding on the tiny model

        def request():
            body = {"model": "sql", "prompt": PROMPTS[0], "max_tokens": tokens, "ignore_eos": True}
            answer["r"] = httpx.post(f"{url}/v1/completions", json=body, headers=headers,
                                     timeout=120)  # fmt: skip

        thread = threading.Thread(target=request)
        thread.start()

        def running():
            metrics = httpx.get(f"{url}/metrics", headers=headers).text
            return "edgepeft_requests_running 1" in metrics

        wait_for(running, "the request to start")
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert process.wait(120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["usage"]["completion_tokens"] == tokens
    assert any("stopped after 1 requests" in line for line in lines), "".join(lines)


def test_the_server_needs_no_torch():
    code = "import json, sys, edgepeft.serve.app; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.split(".")[0] in BLOCKED or m.startswith("edgepeft.export")]


def test_importing_the_command_loads_no_web_framework():
    code = ("import sys, edgepeft.cli, edgepeft.serve.cli; edgepeft.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'onnxruntime', 'torch') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
