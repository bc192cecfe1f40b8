"""Schema fuzzing: schemathesis generates requests for every operation of the server's own
`/openapi.json`, valid ones (positive) and ones that break the schema (negative), and sends them
to a live server with a tiny model, adapters, a task and an experiment.

Every answer must be below 500, every 4xx must carry OpenAI's error body, and afterwards the
server must be healthy and still give the answer it gave before the fuzzing.

LORAPLEX_FUZZ_EXAMPLES sets the cases per operation and mode (default 100, so 200 an operation);
generation is derandomized, so a run is repeatable."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from router.task_table import TaskRoute
from server.app import ServerSettings, create_app
from server.engine import EngineConfig
from test_http_harness import LiveServer, live_server, make_adapters, make_model_folder

EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "100"))
BASE = "tiny"
# A short context keeps each fuzzed generation short (max_tokens is capped to what it leaves).
MAX_CONTEXT = 24
REFERENCE = {"model": "alpha", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
ERROR_FIELDS = {"message", "type", "param", "code"}
# Random model names get 404 before the engine sees them; most valid cases take one of these
# instead (None keeps the generated name): the base, an adapter, a task.
ROUTABLE_MODELS = [None, BASE, "alpha", "summarize"]

# The document as the app declares it, read without starting it (no model is loaded).
DOCUMENT = create_app(ServerSettings()).openapi()
OPERATIONS = [(method.upper(), path) for path, methods in DOCUMENT["paths"].items() for method in methods]


@dataclass
class FuzzTarget:
    server: LiveServer
    schema: schemathesis.schemas.BaseSchema
    reference_text: str
    statuses: Counter = field(default_factory=Counter)


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> FuzzTarget:
    tmp = tmp_path_factory.mktemp("fuzz")
    model_dir = make_model_folder(tmp / BASE)
    root = tmp / "adapters"
    adapters = make_adapters(model_dir, root, {"alpha": 1, "beta": 2})
    settings = ServerSettings(
        model=str(model_dir),
        served_model_name=BASE,
        adapters={name: str(path) for name, path in adapters.items()},
        tasks={"summarize": TaskRoute.single("alpha")},
        experiments={"trial": {"task": "summarize", "arms": [{"name": "a", "adapter": "alpha"}, {"name": "b", "adapter": "beta"}]}},
        state_dir=str(tmp / "state"),
        adapter_roots=[str(root)],
        engine=EngineConfig(max_context=MAX_CONTEXT),
    )
    with live_server(settings) as server:
        reference = httpx.post(f"{server.base_url}/v1/completions", json=REFERENCE, timeout=60)
        assert reference.status_code == 200, reference.text
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
        yield FuzzTarget(server, schema, reference.json()["choices"][0]["text"])


def test_document_types_every_body_and_gives_errors_as_served():
    for path, methods in DOCUMENT["paths"].items():
        for method, operation in methods.items():
            where = f"{method.upper()} {path}"
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:  # a fuzzer can only explore a body whose shape is written down
                assert "$ref" in body or body.get("properties"), f"{where}: untyped request body {body}"
            responses = operation["responses"]
            assert "422" not in responses, where  # validation errors are answered 400, in OpenAI's body
            assert responses["4XX"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    headers = [p["name"] for p in DOCUMENT["paths"]["/v1/completions"]["post"]["parameters"] if p["in"] == "header"]
    assert "X-Task-Id" in headers


def _problem(response: requests.Response) -> str | None:
    """What is wrong with one answer, or None."""
    if response.status_code >= 500:
        return f"server error {response.status_code}"
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or set(error) != ERROR_FIELDS:
        return f"{response.status_code} body not in OpenAI's error shape"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str) and error["type"]):
        return f"{response.status_code} error without a message or type"
    return None


def _fuzz(target: FuzzTarget, operation, mode: GenerationMode, failures: list[str], session: requests.Session) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # failures are collected, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode), model=st.sampled_from(ROUTABLE_MODELS))
    def send(case, model: str | None) -> None:
        if model is not None and mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # a name that routes, so valid bodies reach the engine
        response = case.call(base_url=target.server.base_url, session=session, timeout=120)
        target.statuses[response.status_code] += 1
        problem = _problem(response)
        if problem is not None:
            failures.append(f"{problem}: {response.text[:300]}\n  {case.as_curl_command()[:1000]}")

    send()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_get_no_server_error_and_openai_error_bodies(target, method, path):
    operation = target.schema[path][method]
    failures: list[str] = []
    with requests.Session() as session:
        _fuzz(target, operation, GenerationMode.POSITIVE, failures, session)
        try:
            _fuzz(target, operation, GenerationMode.NEGATIVE, failures, session)
        except Unsatisfiable:
            pass  # nothing in the operation can be made invalid (no parameters, or only free-form strings)
    assert not failures, f"{len(failures)} bad answer(s), first ones:\n" + "\n".join(failures[:5])


def test_server_is_healthy_and_answers_as_before_after_the_fuzzing(target):
    base = target.server.base_url
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base}/ready", timeout=30).status_code == 200
    again = httpx.post(f"{base}/v1/completions", json=REFERENCE, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == target.reference_text
    stats = target.server.state.engine.stats()
    assert stats.running == 0 and stats.queued == 0
    print(f"statuses over the fuzzing: {dict(sorted(target.statuses.items()))}")
