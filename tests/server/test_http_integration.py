"""The main job's server (`make serve`: the default model, SmolLM2-135M-Instruct, with the example
adapters and tasks) through the official openai client."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from server.cli import build_parser
from server.serve_command import settings_from_args
from test_http_harness import live_server

pytestmark = pytest.mark.integration

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "serve_config.yaml"


@pytest.fixture(scope="module")
def default_server():
    settings = settings_from_args(build_parser().parse_args(["serve", "--config", str(EXAMPLE_CONFIG)]))
    with live_server(settings) as server:
        yield server


def test_example_task_routes_to_its_adapter(default_server):
    client = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[
            {"role": "system", "content": "Answer with the city name only."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=8,
        temperature=0,
        extra_headers={"X-Task-Id": "geography"},
    )
    assert raw.headers["x-adapter"] == "capitals@1"
    assert raw.parse().choices[0].message.content == "Paris"  # the base answers with a sentence


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
