"""Overload and edges against a live server: a burst of ten times the queue bound, clients that
vanish mid-stream, and prompts at the context limit and one token past it.

Outputs are compared with the same request served alone (or with backbone.generate), so a
request that survives the overload must also be unharmed by it."""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from backbone.chat_encoding import chat_encoder
from backbone.sampling import SamplingParams
from engine_fixtures import reference_completion
from server.app import ServerSettings
from server.engine import EngineConfig
from test_http_harness import MAX_CONTEXT, LiveServer, live_server, make_model_folder

BASE = "tiny"
MAX_RUNNING = 4
MAX_QUEUED = 4
GREEDY = {"model": BASE, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("overload") / BASE)


@pytest.fixture(scope="module")
def server(model_dir):
    settings = ServerSettings(
        model=str(model_dir), served_model_name=BASE, engine=EngineConfig(max_running=MAX_RUNNING, max_queued=MAX_QUEUED)
    )
    with live_server(settings) as live:
        yield live


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _running_rows(server: LiveServer) -> int:
    """The running-row gauge as a scraper reads it from /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return int(float(re.search(r"^loraplex_num_requests_running (\S+)$", text, re.MULTILINE).group(1)))


def _wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.02)


def _idle(server: LiveServer) -> bool:
    stats = server.state.engine.stats()
    return stats.running == 0 and stats.queued == 0


# ---- a burst of ten times the queue bound -----------------------------------------------------


def test_burst_of_ten_times_the_queue_bound_gets_429s_and_the_rest_complete_unharmed(server):
    _wait_for(lambda: _idle(server), what="an idle engine")
    body = {**GREEDY, "prompt": "Write a story", "max_tokens": 128}  # long enough to outlast the arrivals
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        alone = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

    burst = 10 * MAX_QUEUED
    responses: list[httpx.Response | None] = [None] * burst
    gate = threading.Barrier(burst + 1)
    peaks = {"queued": 0, "running": 0}
    sampling = threading.Event()

    def send(index: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            gate.wait()
            responses[index] = http.post("/v1/completions", json=body)

    def sample() -> None:  # the engine's own queue and batch, watched through the whole burst
        while not sampling.is_set():
            stats = server.state.engine.stats()
            peaks["queued"] = max(peaks["queued"], stats.queued)
            peaks["running"] = max(peaks["running"], stats.running)
            time.sleep(0.002)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(burst)]
    sampler = threading.Thread(target=sample)
    for thread in [*senders, sampler]:
        thread.start()
    gate.wait()
    for thread in senders:
        thread.join(180)
    sampling.set()
    sampler.join()

    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [response for response in responses if response.status_code == 429]
    served = [response for response in responses if response.status_code == 200]
    assert refused, "a burst of ten times the queue bound was all admitted"
    assert len(served) >= MAX_QUEUED  # the first arrivals always fit
    for response in refused:
        assert response.headers["retry-after"].isdigit()
        assert _error(response)["type"] == "rate_limit_error"
    assert all(response.json()["choices"][0]["text"] == alone for response in served)
    # Memory is bounded because waiting work is: the queue never held more than its bound.
    assert peaks["queued"] <= MAX_QUEUED and peaks["running"] <= MAX_RUNNING, peaks
    _wait_for(lambda: _idle(server), what="an idle engine after the burst")


# ---- clients that vanish mid-stream -----------------------------------------------------------


def test_clients_gone_mid_stream_free_their_rows_and_a_neighbour_finishes_unharmed(server):
    _wait_for(lambda: _idle(server), what="an idle engine")
    engine = server.state.engine
    cancelled_before = engine.stats().finished.get("cancelled", 0)
    neighbour_body = {**GREEDY, "prompt": "Once upon", "max_tokens": 48, "stream": True}
    neighbour_events: list[str] = []
    neighbour_started = threading.Event()

    def neighbour() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=neighbour_body, timeout=120) as reply:
            for line in reply.iter_lines():
                neighbour_started.set()
                if line:
                    neighbour_events.append(line)

    reader = threading.Thread(target=neighbour)
    reader.start()
    assert neighbour_started.wait(60)
    leaving = MAX_RUNNING - 1
    long_body = {**GREEDY, "prompt": "Write", "max_tokens": MAX_CONTEXT - 10, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=120) as http, ExitStack() as open_streams:
        for _ in range(leaving):
            reply = open_streams.enter_context(http.stream("POST", "/v1/completions", json=long_body))
            next(reply.iter_lines())  # its generation is under way
    # Leaving the block closed each connection mid-stream, without reading the rest.
    _wait_for(lambda: engine.stats().finished.get("cancelled", 0) == cancelled_before + leaving, what="the cancels")
    reader.join(120)
    _wait_for(lambda: _running_rows(server) == 0, what="no running rows in /metrics")
    assert engine.stats().queued == 0

    assert neighbour_events[-1] == "data: [DONE]"
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in neighbour_events[:-1])
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        alone = http.post("/v1/completions", json={**neighbour_body, "stream": False}).json()["choices"][0]["text"]
    assert streamed == alone


# ---- the context limit ------------------------------------------------------------------------


def _token_prompt(length: int) -> list[int]:
    return [3 + (i * 7) % 120 for i in range(length)]  # ordinary tokens of the 128-token vocabulary


def test_prompt_one_short_of_the_context_gets_exactly_one_token(server, model_dir):
    limit = server.state.max_context
    prompt = _token_prompt(limit - 1)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        reply = http.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 1})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"] == {"prompt_tokens": limit - 1, "completion_tokens": 1, "total_tokens": limit}
        # Asking for more than the context leaves is capped to what fits (the server's documented
        # behaviour), so prompt + max_tokens = limit + 1 still ends exactly at the limit.
        capped = http.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 2})
        assert capped.status_code == 200 and capped.json()["usage"]["total_tokens"] == limit
    expected = reference_completion(model_dir, None, prompt, SamplingParams(max_tokens=1))
    assert reply.json()["choices"][0]["text"] == server.state.tokenizer.decode(expected)


@pytest.mark.parametrize("overshoot", [0, 1])
def test_prompt_filling_the_context_or_one_past_is_400_naming_the_limit(server, overshoot):
    limit = server.state.max_context
    length = limit + overshoot
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        reply = http.post("/v1/completions", json={**GREEDY, "prompt": _token_prompt(length), "max_tokens": 1})
    error = _error(reply)
    assert reply.status_code == 400 and error["code"] == "context_length_exceeded"
    assert str(limit) in error["message"] and str(length) in error["message"]


def test_chat_at_the_context_limit_and_one_token_over(server):
    limit = server.state.max_context
    encoder = chat_encoder(server.state.tokenizer)
    overhead = len(encoder.encode_chat([{"role": "user", "content": ""}]))

    def chat(tokens: int) -> httpx.Response:
        messages = [{"role": "user", "content": "x" * (tokens - overhead)}]  # one token a character
        assert len(encoder.encode_chat(messages)) == tokens
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            return http.post("/v1/chat/completions", json={**GREEDY, "messages": messages, "max_tokens": 1})

    fits = chat(limit - 1)
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] == limit
    over = chat(limit)
    assert over.status_code == 400 and _error(over)["code"] == "context_length_exceeded"
    assert str(limit) in _error(over)["message"]
