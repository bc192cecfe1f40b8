"""The served default model (SmolLM2-135M-Instruct) through the official openai client."""

from __future__ import annotations

import openai
import pytest

from server.app import ServerSettings
from test_http_harness import live_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_server():
    with live_server(ServerSettings(model="default")) as server:
        yield server


def test_chat_answers_capital_of_france(default_server):
    client = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert raw.headers["x-adapter"] == "SmolLM2-135M-Instruct"
    reply = raw.parse()
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_non_streamed(default_server):
    client = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)
    kwargs = dict(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a primary colour."}], max_tokens=16, temperature=0
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == whole and whole
