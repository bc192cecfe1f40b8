"""The HTTP API against a live uvicorn server on loopback, through the official `openai` client
and raw httpx; outputs are checked against the engine's own and against backbone.generate."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from backbone.sampling import SamplingParams
from engine_fixtures import reference_completion
from router.task_table import TaskRoute
from server.app import ServerSettings
from server.request_handle import GenerationRequest
from test_http_harness import MAX_CONTEXT, LiveServer, live_server, make_adapters, make_model_folder

BASE = "tiny"
CHAT = [{"role": "user", "content": "Write a story"}]


@dataclass
class Env:
    server: LiveServer
    model_dir: Path
    root: Path
    adapters: dict[str, Path]
    outside: Path

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url + "/v1", api_key="unused", max_retries=0)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=60, **kwargs)

    def engine_text(self, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> str:
        handle = self.server.state.engine.submit(GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens), adapter))
        return handle.result(timeout=60).text

    def chat_ids(self, messages: list[dict]) -> list[int]:
        tokenizer = self.server.state.tokenizer
        return tokenizer.encode(tokenizer.apply_chat_template(messages))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    tmp = tmp_path_factory.mktemp("http_api")
    model_dir = make_model_folder(tmp / BASE)
    root = tmp / "adapters"
    adapters = make_adapters(model_dir, root, {"alpha": 1, "beta": 2, "beta-next": 3})
    broken = root / "broken"
    shutil.copytree(adapters["alpha"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    outside = tmp / "outside"
    shutil.copytree(adapters["beta"], outside)
    settings = ServerSettings(
        model=str(model_dir),
        adapters={"alpha": str(adapters["alpha"])},
        tasks={"summarize": TaskRoute.single("alpha")},
        adapter_roots=[str(root)],
        max_body_bytes=64_000,
    )
    with live_server(settings) as server:
        yield Env(server, model_dir, root, adapters, outside)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def sse_payloads(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), text
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ---- generation ------------------------------------------------------------------------------


def test_chat_with_adapter_equals_engine_output(env):
    raw = env.client.chat.completions.with_raw_response.create(model="alpha", messages=CHAT, max_tokens=12, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-adapter"] == "alpha@1"
    assert reply.object == "chat.completion" and reply.model == "alpha"
    assert reply.choices[0].message.role == "assistant"
    expected = env.engine_text(env.chat_ids(CHAT), "alpha", 12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(env.chat_ids(CHAT)) and reply.usage.completion_tokens == 12
    base = env.client.chat.completions.with_raw_response.create(model=BASE, messages=CHAT, max_tokens=12, temperature=0)
    assert base.headers["x-adapter"] == BASE
    assert base.parse().choices[0].message.content == env.engine_text(env.chat_ids(CHAT), None, 12)
    assert base.parse().choices[0].message.content != expected  # the adapter changes the output


def test_completion_equals_standalone_generate(env):
    tokenizer = env.server.state.tokenizer
    prompt_ids = tokenizer.encode("Once upon", add_special_tokens=True)
    reply = env.client.completions.create(model="alpha", prompt="Once upon", max_tokens=10, temperature=0)
    reference = reference_completion(env.model_dir, env.adapters["alpha"], prompt_ids, SamplingParams(max_tokens=10))
    assert reply.object == "text_completion"
    assert reply.choices[0].text == tokenizer.decode(reference)
    assert reply.usage.completion_tokens == len(reference)


def test_chat_stream_has_openai_chunk_shape(env):
    with env.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": "alpha", "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        })
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-adapter"] == "alpha@1"
    chunks = sse_payloads(response.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert content and all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None for c in content)
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert streamed == env.engine_text(env.chat_ids(CHAT), "alpha", 12)


def test_completion_stream_through_openai_client_equals_non_stream(env):
    kwargs = dict(model="alpha", prompt="Once upon", max_tokens=10, temperature=0)
    chunks = list(env.client.completions.create(stream=True, **kwargs))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == env.client.completions.create(**kwargs).choices[0].text


def test_stop_string_and_seeded_sampling(env):
    full = env.client.completions.create(model=BASE, prompt="Write", max_tokens=20, temperature=0).choices[0].text
    stop = full[4:6]
    cut = env.client.completions.create(model=BASE, prompt="Write", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]
    seeded = [
        env.client.completions.create(model=BASE, prompt="Write", max_tokens=16, temperature=1.0, top_p=0.9, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


# ---- routing ---------------------------------------------------------------------------------


def test_task_header_routes_to_task_adapter(env):
    raw = env.client.chat.completions.with_raw_response.create(
        model=BASE, messages=CHAT, max_tokens=8, temperature=0, extra_headers={"X-Task-Id": "summarize"}
    )
    assert raw.headers["x-adapter"] == "alpha@1"
    assert raw.parse().choices[0].message.content == env.engine_text(env.chat_ids(CHAT), "alpha", 8)
    by_model = env.client.chat.completions.with_raw_response.create(model="summarize", messages=CHAT, max_tokens=8, temperature=0)
    assert by_model.headers["x-adapter"] == "alpha@1"


def test_task_header_conflict_and_unknown_names(env):
    with pytest.raises(openai.BadRequestError) as caught:
        env.client.chat.completions.create(model="beta", messages=CHAT, extra_headers={"X-Task-Id": "summarize"})
    assert "X-Task-Id 'summarize'" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        env.client.chat.completions.create(model=BASE, messages=CHAT, extra_headers={"X-Task-Id": "nope"})
    assert "task 'nope'" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="neither the base model"):
        env.client.chat.completions.create(model="ghost", messages=CHAT)


def test_task_table_endpoints_and_ab_arms(env):
    with env.http() as http:
        assert http.put("/v1/tasks/qa", json={"adapter": "alpha"}).json() == {"task": "qa", "adapter": "alpha", "arms": None}
        assert {"task": "qa", "adapter": "alpha", "arms": None} in http.get("/v1/tasks").json()["data"]
        assert error_of(http.put("/v1/tasks/qa", json={"adapter": "ghost"}))["code"] == "adapter_not_found"
        assert http.put("/v1/tasks/qa", json={"adapter": "a", "arms": {"b": 1}}).status_code == 400
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "arm-b", "lora_path": "beta"}).status_code == 200
        assert http.put("/v1/tasks/qa", json={"arms": {"alpha": 1, "arm-b": 1}}).status_code == 200

        def arm(user: str) -> str:
            response = http.post(
                "/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 1},
                headers={"X-Task-Id": "qa", "X-User-Id": user},
            )
            return response.headers["x-adapter"]

        arms = {user: arm(user) for user in (f"user-{i}" for i in range(16))}
        assert set(arms.values()) == {"alpha@1", "arm-b@1"}
        assert all(arm(user) == chosen for user, chosen in list(arms.items())[:4])  # sticky per user
        assert http.delete("/v1/tasks/qa").status_code == 200
        assert error_of(http.get("/v1/tasks/qa"))["type"] == "not_found_error"
        assert http.delete("/v1/tasks/qa").status_code == 404


# ---- adapter admin ---------------------------------------------------------------------------


def test_runtime_load_use_swap_unload(env):
    with env.http() as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(env.adapters["beta"])})
        assert loaded.status_code == 200 and loaded.json()["version"] == 1
        models = env.client.models.list().data
        assert {m.id for m in models} >= {BASE, "alpha", "beta"}
        assert all(m.parent == BASE for m in models if m.id != BASE)

        ids = env.chat_ids(CHAT)
        first = env.client.chat.completions.with_raw_response.create(model="beta", messages=CHAT, max_tokens=8, temperature=0)
        assert first.headers["x-adapter"] == "beta@1"
        beta_text = first.parse().choices[0].message.content
        assert beta_text == env.engine_text(ids, "beta", 8)

        swapped = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": "beta-next"})
        assert swapped.status_code == 200 and swapped.json()["version"] == 2
        second = env.client.chat.completions.with_raw_response.create(model="beta", messages=CHAT, max_tokens=8, temperature=0)
        assert second.headers["x-adapter"] == "beta@2"
        assert second.parse().choices[0].message.content == env.engine_text(ids, "beta", 8)
        assert second.parse().choices[0].message.content != beta_text  # new weights serve

        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        gone = http.post("/v1/chat/completions", json={"model": "beta", "messages": CHAT})
        assert gone.status_code == 404 and error_of(gone)["type"] == "not_found_error"
        assert error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}))["code"] == "unknown_adapter"
        assert "beta" not in {m.id for m in env.client.models.list().data}


def test_bad_adapter_refused_while_requests_keep_succeeding(env):
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with env.http() as http:
            while not stop.is_set():
                body = {"model": "alpha", "messages": CHAT, "max_tokens": 4}
                statuses.append(http.post("/v1/chat/completions", json=body).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        with env.http() as http:
            refused = http.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "broken"})
            time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert refused.status_code == 400
    error = error_of(refused)
    assert "adapter_model.safetensors" in error["message"], error
    assert statuses and set(statuses) == {200}
    assert [(i.name, i.version) for i in env.server.state.engine.adapter_infos() if i.name == "alpha"] == [("alpha", 1)]


def test_adapter_paths_confined_to_roots(env):
    os.symlink(env.outside, env.root / "escape", target_is_directory=True)
    cases = {
        "../outside": (400, "'..'"),
        f"{env.root}/alpha/../../outside": (400, "'..'"),
        str(env.outside): (403, "outside the adapter roots"),
        "escape": (403, "symlink"),
        "missing": (404, "does not exist"),
    }
    with env.http() as http:
        for path, (status, words) in cases.items():
            response = http.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path})
            assert response.status_code == status, (path, response.text)
            assert words in error_of(response)["message"]
    assert "sneaky" not in {info.name for info in env.server.state.engine.adapter_infos()}


# ---- limits and failures ---------------------------------------------------------------------


def test_request_errors_use_openai_body(env):
    with env.http() as http:
        too_many = {"model": BASE, "messages": CHAT, "n": env.server.state.settings.max_choices + 1}
        assert error_of(http.post("/v1/chat/completions", json=too_many))["param"] == "n"
        malformed = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and error_of(malformed)["type"] == "invalid_request_error"
        missing = http.post("/v1/chat/completions", json={"model": BASE})
        assert missing.status_code == 400 and error_of(missing)["param"] == "messages"
        bad_temperature = http.post("/v1/completions", json={"model": BASE, "prompt": "x", "temperature": -1})
        assert bad_temperature.status_code == 400 and error_of(bad_temperature)["param"] == "temperature"
        assert error_of(http.get("/v1/nowhere"))["code"] == 404
        assert error_of(http.get("/v1/chat/completions"))["code"] == 405
        assert http.get("/v1/chat/completions").status_code == 405


def test_lone_surrogate_is_a_400_naming_it(env):
    # JSON's \ud800 escape decodes to half a surrogate pair: no character, so no UTF-8 either.
    bodies = {
        "/v1/completions": {"model": BASE, "prompt": "ok \ud800 ok"},
        "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "ok \udfff"}]},
    }
    parts = {"model": BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "ok \ud83d"}]}]}
    with env.http() as http:
        for path, body in [*bodies.items(), ("/v1/chat/completions", parts)]:
            response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            error = error_of(response)
            assert response.status_code == 400 and "lone UTF-16 surrogate" in error["message"], error
            assert error["param"] in ("prompt", "messages")
        # A complete pair is one character and is served.
        paired = {"model": BASE, "prompt": "ok \ud83d\ude00", "max_tokens": 2}
        assert http.post("/v1/completions", content=json.dumps(paired), headers={"content-type": "application/json"}).status_code == 200


def test_body_over_limit_is_413(env):
    with env.http() as http:
        big = {"model": BASE, "prompt": "x" * 70_000}
        assert http.post("/v1/completions", json=big).status_code == 413

        def chunked():
            yield json.dumps(big).encode()

        response = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_prompt_too_long_names_numbers_and_max_tokens_is_capped(env):
    with env.http() as http:
        too_long = http.post("/v1/completions", json={"model": BASE, "prompt": "ab" * MAX_CONTEXT, "max_tokens": 5})
        error = error_of(too_long)
        assert too_long.status_code == 400 and error["code"] == "context_length_exceeded"
        assert str(MAX_CONTEXT * 2 + 1) in error["message"] and str(MAX_CONTEXT) in error["message"]
        prompt = "x" * (MAX_CONTEXT - 11)  # + BOS = MAX_CONTEXT - 10 tokens
        capped = http.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 500, "temperature": 0})
        assert capped.status_code == 200
        assert capped.json()["usage"]["completion_tokens"] <= 10


def test_queue_full_is_429_with_retry_after(env, monkeypatch):
    monkeypatch.setattr(env.server.state.engine.config, "max_queued", 0)
    with env.http() as http:
        response = http.post("/v1/completions", json={"model": BASE, "prompt": "hi"})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert error_of(response)["type"] == "rate_limit_error"


def test_request_timeout_is_504_or_stream_error(env, monkeypatch):
    monkeypatch.setattr(env.server.state.settings, "request_timeout", 0.0)
    with env.http() as http:
        plain = http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 50})
        assert plain.status_code == 504 and error_of(plain)["code"] == "request_timeout"
        streamed = http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 50, "stream": True})
    assert streamed.status_code == 200
    assert sse_payloads(streamed.text)[-1]["error"]["code"] == "request_timeout"
    wait_until_idle(env)


def wait_until_idle(env: Env, timeout: float = 20.0):
    engine = env.server.state.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.running == 0 and stats.queued == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(env, stream):
    engine = env.server.state.engine
    wait_until_idle(env)
    cancelled_before = engine.stats().finished.get("cancelled", 0)
    body = {"model": "alpha", "prompt": "Write", "max_tokens": 2000, "temperature": 0, "stream": stream}
    with env.http() as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())  # generation is under way
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    stats = wait_until_idle(env)
    assert stats.finished.get("cancelled", 0) == cancelled_before + 1
    assert stats.running == 0


# ---- service endpoints -----------------------------------------------------------------------


def test_health_ready_and_request_ids(env):
    with env.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["model"] == BASE
        assert http.get("/health", headers={"X-Request-Id": "trace-123"}).headers["x-request-id"] == "trace-123"
        generated = http.get("/health").headers["x-request-id"]
        assert len(generated) == 32 and generated != http.get("/health").headers["x-request-id"]
        # An id that could forge log lines or headers is replaced, not echoed.
        assert http.get("/health", headers={"X-Request-Id": "a b\tc"}).headers["x-request-id"] != "a b\tc"
