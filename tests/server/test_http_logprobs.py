"""logprobs, echo, n, seed, stop lists and include_usage through a live server and the official
`openai` client, checked against transformers (+ PEFT for the adapter) on the same weights."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch

import server.batch_runner
from server.app import ServerSettings
from server.engine import EngineConfig
from test_http_harness import LiveServer, live_server, make_adapters, make_model_folder
from tiny_models import load_reference

BASE = "tiny"
CHAT = [{"role": "user", "content": "Tell me about the sea"}]
TOLERANCE = 1e-4
PREFILL_CHUNK = 16  # small, so a scored prompt spans several prefill chunks


@dataclass
class Env:
    server: LiveServer
    model_dir: Path
    adapters: dict[str, Path]
    references: dict[str | None, torch.nn.Module]

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url + "/v1", api_key="unused", max_retries=0)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=60)

    @property
    def tokenizer(self):
        return self.server.state.tokenizer

    def reference_logprobs(self, ids: list[int], adapter: str | None) -> torch.Tensor:
        """(T, V) fp32 log_softmax of transformers' logits for `ids` (PEFT for an adapter)."""
        if adapter not in self.references:
            model = load_reference(self.model_dir)
            if adapter is not None:
                model = peft.PeftModel.from_pretrained(model, self.adapters[adapter]).eval()
            self.references[adapter] = model
        with torch.no_grad():
            return self.references[adapter](torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def chat_ids(self) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(CHAT))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    tmp = tmp_path_factory.mktemp("http_logprobs")
    model_dir = make_model_folder(tmp / BASE)
    adapters = make_adapters(model_dir, tmp / "adapters", {"alpha": 1})
    settings = ServerSettings(
        model=str(model_dir), adapters={"alpha": str(adapters["alpha"])},
        engine=EngineConfig(prefill_chunk=PREFILL_CHUNK, prefix_block_tokens=8),
    )  # fmt: skip
    with live_server(settings) as server:
        yield Env(server, model_dir, adapters, {})


def sse_payloads(text: str) -> list[dict]:
    lines = [line for line in text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", text
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def prompt_ids(env: Env, text: str) -> list[int]:
    return env.tokenizer.encode(text, add_special_tokens=True)


# ---- logprobs against transformers ---------------------------------------------------------


@pytest.mark.parametrize("adapter", [None, "alpha"])
def test_chat_logprobs_equal_transformers_log_softmax(env, adapter):
    reply = env.client.chat.completions.create(
        model=adapter or BASE, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    content = reply.choices[0].logprobs.content
    prompt = env.chat_ids()
    ids, position_ids = list(prompt), []
    for entry in content:  # greedy: each token is the reference's argmax, so its id follows from it
        reference = env.reference_logprobs(ids, adapter)[-1]
        top = reference.topk(5)
        token = int(top.indices[0])
        assert entry.token == env.token_text(token)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert math.isclose(entry.logprob, float(reference[token]), abs_tol=TOLERANCE)
        assert [t.token for t in entry.top_logprobs] == [env.token_text(int(i)) for i in top.indices]
        assert all(math.isclose(t.logprob, float(v), abs_tol=TOLERANCE) for t, v in zip(entry.top_logprobs, top.values))
        ids.append(token)
        position_ids.append(token)
    assert len(content) == reply.usage.completion_tokens == 8
    assert "".join(env.token_text(t) for t in position_ids) == reply.choices[0].message.content


def test_logprobs_are_of_the_model_distribution_not_the_tempered_one(env):
    """A sampled (temperature 1.7, top_k 5) completion reports log_softmax of the raw logits."""
    ids = prompt_ids(env, "Waves")
    reply = env.client.completions.create(
        model="alpha", prompt=ids, max_tokens=6, temperature=1.7, seed=3, logprobs=2, extra_body={"top_k": 5}
    )
    logprobs = reply.choices[0].logprobs
    context = list(ids)
    for token_text, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        reference = env.reference_logprobs(context, "alpha")[-1]
        token = next(i for i in reference.topk(5).indices.tolist() if env.token_text(i) == token_text)  # top-5 only
        assert math.isclose(logprob, float(reference[token]), abs_tol=TOLERANCE)
        best = reference.topk(2)
        expected_top = {env.token_text(int(i)): float(v) for i, v in zip(best.indices, best.values)}
        expected_top.setdefault(token_text, float(reference[token]))
        assert top.keys() == expected_top.keys()
        assert all(math.isclose(top[k], v, abs_tol=TOLERANCE) for k, v in expected_top.items())
        context.append(token)


def test_rows_batched_together_each_get_their_own_logprobs(env):
    """Scoring and generating rows, base and adapter, in one running batch: each row's logprobs
    equal its own full forward."""
    from backbone.sampling import SamplingParams
    from server.request_handle import GenerationRequest

    engine = env.server.state.engine
    prompts = [prompt_ids(env, text) for text in ("Rocks and reefs below", "Lighthouse", "Anchors aweigh, the crew")]
    jobs = [(prompts[0], "alpha", SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=1)),
            (prompts[1], None, SamplingParams(max_tokens=6, logprobs=3)),
            (prompts[2], "alpha", SamplingParams(max_tokens=0, prompt_logprobs=0)),
            (prompts[1], "alpha", SamplingParams(max_tokens=5))]  # fmt: skip
    handles = [engine.submit(GenerationRequest(ids, params, adapter)) for ids, adapter, params in jobs]
    for handle, (ids, adapter, params) in zip(handles, jobs):
        finished = handle.result(timeout=60)
        full = env.reference_logprobs(ids + finished.token_ids, adapter)
        if params.prompt_logprobs is not None:
            assert finished.prompt_logprobs[0] is None and len(finished.prompt_logprobs) == len(ids)
            for position, entry in enumerate(finished.prompt_logprobs[1:], start=1):
                assert entry.token_id == ids[position]
                assert math.isclose(entry.logprob, float(full[position - 1, ids[position]]), abs_tol=TOLERANCE)
        else:
            assert finished.prompt_logprobs == []
        if params.logprobs is None:
            assert finished.logprobs == []
            continue
        assert [entry.token_id for entry in finished.logprobs][: len(finished.token_ids)] == finished.token_ids
        for offset, entry in enumerate(finished.logprobs):
            row = full[len(ids) + offset - 1]
            assert math.isclose(entry.logprob, float(row[entry.token_id]), abs_tol=TOLERANCE)
            assert [token for token, _ in entry.top] == row.topk(params.logprobs).indices.tolist()


# ---- echo: the prompt's logprobs -----------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_prompt_logprobs_equal_a_full_forward(env, max_tokens):
    ids = prompt_ids(env, "The sea is deep and the sky is wide, said the old sailor.")  # > 3 prefill chunks
    assert len(ids) > 3 * PREFILL_CHUNK
    reply = env.client.completions.create(model="alpha", prompt=ids, max_tokens=max_tokens, temperature=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + max_tokens == len(logprobs.token_logprobs)
    assert logprobs.tokens[: len(ids)] == [env.token_text(t) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    full = env.reference_logprobs(ids, "alpha")  # (T, V)
    for position in range(1, len(ids)):
        expected = full[position - 1]
        assert math.isclose(logprobs.token_logprobs[position], float(expected[ids[position]]), abs_tol=TOLERANCE)
        top = logprobs.top_logprobs[position]
        best = expected.topk(3)
        for token, value in zip(best.indices.tolist(), best.values.tolist()):
            assert math.isclose(top[env.token_text(token)], value, abs_tol=TOLERANCE)
        assert len(top) in (3, 4)  # the top 3, plus the prompt token when it is not among them
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert choice.text.startswith(env.tokenizer.decode(ids))
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == max_tokens
    if max_tokens:  # the generated token's logprob follows the prompt's, as lm-evaluation-harness reads it
        assert math.isclose(logprobs.token_logprobs[-1], float(full[-1].max()), abs_tol=TOLERANCE)


def test_echo_of_a_text_prompt_returns_it_and_streams_the_same(env):
    body = {"model": BASE, "prompt": "Harbour lights", "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 1}
    with env.http() as http:
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        chunks = sse_payloads(http.post("/v1/completions", json={**body, "stream": True}).text)
    assert whole["text"].startswith("Harbour lights")
    streamed = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in streamed) == whole["text"]
    assert streamed[0]["text"] == "Harbour lights"
    merged = {key: sum((c["logprobs"][key] for c in streamed if c["logprobs"]), []) for key in whole["logprobs"]}
    assert merged == whole["logprobs"]


def test_echo_scores_a_prompt_that_fills_the_whole_context(env):
    limit = env.server.state.max_context
    ids = [5 + i % 90 for i in range(limit)]
    reply = env.client.completions.create(model=BASE, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(reply.choices[0].logprobs.token_logprobs) == limit and reply.usage.completion_tokens == 0


# ---- n, seed, stop ----------------------------------------------------------------------------


def test_n_greedy_choices_equal_one_choice_and_reuse_the_prompt_blocks(env):
    prompt = "A long prompt so that several prefix blocks are shared by the choices"
    single = env.client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
    stats = env.server.state.engine.stats
    hits_before = stats().prefix_cache.hit_tokens
    many = env.client.completions.create(model="alpha", prompt=prompt + " again", max_tokens=8, temperature=0, n=3)
    hits = stats().prefix_cache.hit_tokens - hits_before
    blocks = (len(prompt_ids(env, prompt + " again")) - 1) // 8 * 8
    assert hits >= 2 * blocks > 0  # choices 2 and 3 took the first one's prompt blocks
    assert [c.index for c in many.choices] == [0, 1, 2]
    again = env.client.completions.create(model="alpha", prompt=prompt, max_tokens=8, temperature=0, n=3, logprobs=1)
    assert all(c.text == single.choices[0].text for c in again.choices)
    assert all(c.logprobs.token_logprobs == pytest.approx(single.choices[0].logprobs.token_logprobs, abs=1e-5) for c in again.choices)
    assert again.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert again.usage.completion_tokens == 3 * single.usage.completion_tokens


def test_batched_prompts_give_n_choices_each_in_order(env):
    first, second = prompt_ids(env, "Gulls"), prompt_ids(env, "Tides turn")
    reply = env.client.completions.create(model=BASE, prompt=[first, second], max_tokens=5, temperature=0, n=2)
    alone = [env.client.completions.create(model=BASE, prompt=p, max_tokens=5, temperature=0).choices[0].text for p in (first, second)]
    assert [c.text for c in reply.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert reply.usage.prompt_tokens == len(first) + len(second)


def test_seed_reproduces_and_different_seeds_differ(env):
    def sample(seed: int, n: int = 1) -> list[str]:
        reply = env.client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=24, temperature=1.0, seed=seed, n=n)
        return [c.message.content for c in reply.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    two = sample(7, n=2)
    assert two[0] == sample(7)[0] and two[0] != two[1]  # choice i draws from seed + i


def test_stop_list_cuts_at_the_earliest_stop(env):
    body = dict(model=BASE, prompt="Once upon", max_tokens=40, temperature=0)
    full = env.client.completions.create(**body).choices[0].text
    early, late = full[4:6], full[12:14]
    cut = min(full.find(early), full.find(late))
    for stop in ([late, early], [early, late]):
        reply = env.client.completions.create(stop=stop, **body).choices[0]
        assert reply.text == full[:cut] and reply.finish_reason == "stop"
    assert env.client.completions.create(stop=late, **body).choices[0].text == full[: full.find(late)]
    streamed = env.client.completions.create(stop=[late, early], stream=True, **body)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == full[:cut]


@pytest.mark.parametrize("chat", [True, False])
def test_include_usage_chunk_equals_non_streaming_usage(env, chat):
    if chat:
        create, body = env.client.chat.completions.create, dict(messages=CHAT)
    else:
        create, body = env.client.completions.create, dict(prompt="Sailing")
    body |= dict(model="alpha", max_tokens=9, temperature=0, n=2, stop=["zz"])
    whole = create(**body).usage
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **body))
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


def test_chat_stream_logprobs_equal_the_non_streamed_ones(env):
    body = dict(model="alpha", messages=CHAT, max_tokens=7, temperature=0, logprobs=True, top_logprobs=2)
    whole = env.client.chat.completions.create(**body).choices[0].logprobs.content
    streamed = [e for c in env.client.chat.completions.create(stream=True, **body) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]


# ---- refusals and failures --------------------------------------------------------------------


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logit_bias": {"3": 2.0}}, "logit_bias"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 4}, "best_of"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": [[5, 6]] * 9, "n": 2}, "n"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
])
def test_unsupported_or_out_of_bounds_fields_are_400_naming_the_field(env, path, extra, param):
    body = {"model": BASE, "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"}), **extra}
    with env.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [[], [[]], [999_999_999], [[5], [999_999_999]]])
def test_empty_prompt_and_unknown_token_are_400(env, prompt):
    with env.http() as http:
        response = http.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_failure_of_ours_is_500_and_logged_with_the_request_id(env, monkeypatch, caplog):
    def broken_sampling(*args, **kwargs):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(server.batch_runner, "sample_next_tokens", broken_sampling)
    with caplog.at_level(logging.ERROR, logger="loraplex.server"), env.http() as http:
        response = http.post(
            "/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "req-under-test"}
        )
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_error"
    assert response.headers["x-request-id"] == "req-under-test"
    assert any("req-under-test" in record.getMessage() for record in caplog.records if record.name == "loraplex.server")


@pytest.mark.integration
def test_default_model_echo_and_chat_logprobs_equal_transformers():
    """The default model (byte-level BPE tokens, tied embeddings) scored in fp32 through the server."""
    from backbone.default_model import default_model_folder, is_converted

    model_dir = default_model_folder()
    if not is_converted(model_dir):
        pytest.skip("the default model is not in the cache; run `loraplex model pull`")
    reference = load_reference(model_dir)
    with live_server(ServerSettings(model=str(model_dir), dtype="float32")) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        tokenizer = server.state.tokenizer
        ids = tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")
        reply = client.completions.create(model="", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
        chat = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
            temperature=0, logprobs=True, top_logprobs=2,
        )  # fmt: skip
        chat_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    with torch.no_grad():
        full = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    token_logprobs = reply.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(ids) + 1
    expected = [float(full[p - 1, ids[p]]) for p in range(1, len(ids))] + [float(full[-1].max())]
    assert token_logprobs[1:] == pytest.approx(expected, abs=TOLERANCE)
    context = list(chat_ids)
    for entry in chat.choices[0].logprobs.content:  # greedy: each token is the reference's argmax
        with torch.no_grad():
            step = reference(torch.tensor([context])).logits[0, -1].float().log_softmax(-1)
        token = int(step.argmax())
        assert entry.token == tokenizer.decode([token], skip_special_tokens=False)
        assert math.isclose(entry.logprob, float(step[token]), abs_tol=TOLERANCE)
        context.append(token)
    assert "Paris" in chat.choices[0].message.content


def test_max_choices_is_a_serve_flag_and_a_config_key(tmp_path):
    from server.cli import build_parser
    from server.serve_command import settings_from_args

    assert settings_from_args(build_parser().parse_args(["serve", "--max-choices", "4"])).max_choices == 4
    config = tmp_path / "serve.yaml"
    config.write_text("max_choices: 3\n")
    assert settings_from_args(build_parser().parse_args(["serve", "--config", str(config)])).max_choices == 3
