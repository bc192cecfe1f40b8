"""Experiments end to end: a live server, the official openai client, feedback over HTTP, and the
per-arm figures checked against what the test sent; shadow copies recorded but never returned."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from backbone.sampling import SamplingParams
from router.task_table import TaskRoute
from server.app import ServerSettings
from server.cli import main
from server.request_handle import GenerationRequest
from test_http_harness import LiveServer, live_server, make_adapters, make_model_folder

BASE = "tiny"
CHAT = [{"role": "user", "content": "Tell me"}]
MAX_TOKENS = 4
REQUESTS = 12


def arms(**adapters_by_arm) -> list[dict]:
    return [{"name": arm, "adapter": adapter, "weight": 1.0} for arm, adapter in adapters_by_arm.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("experiments")
    model_dir = make_model_folder(tmp / BASE)
    adapters = make_adapters(model_dir, tmp / "adapters", {"alpha": 1, "beta": 2, "cand": 3, "cand2": 4})
    return model_dir, adapters


def settings_for(files, state_dir: Path) -> ServerSettings:
    model_dir, adapters = files
    return ServerSettings(
        model=str(model_dir),
        adapters={name: str(path) for name, path in adapters.items()},
        tasks={task: TaskRoute.single("alpha") for task in ("qa", "qa2", "qa3")},
        adapter_roots=[str(adapters["alpha"].parent)],
        state_dir=str(state_dir),
    )


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """One server for the tests that need no restart (each uses its own task)."""
    with live_server(settings_for(files, tmp_path_factory.mktemp("state"))) as running:
        yield running


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def http(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=60)


def ask(server: LiveServer, task: str, user: str):
    raw = client(server).chat.completions.with_raw_response.create(
        model=BASE, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, user=user, extra_headers={"X-Task-Id": task}
    )
    return raw.headers, raw.parse().choices[0].message.content


def engine_text(server: LiveServer, adapter: str) -> str:
    tokenizer = server.state.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    handle = server.state.engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=MAX_TOKENS), adapter))
    return handle.result(timeout=60).text


def summary_when(server: LiveServer, name: str, ready, timeout: float = 60.0) -> dict:
    """The experiment's figures once the background recorders have caught up."""
    deadline = time.monotonic() + timeout
    with http(server) as h:
        while True:
            summary = h.get(f"/v1/experiments/{name}").json()
            if ready(summary) or time.monotonic() > deadline:
                return summary
            time.sleep(0.05)


def test_experiment_end_to_end_with_feedback_and_shadow(server, tmp_path):
    with http(server) as h:
        created = h.put("/v1/experiments/exp", json={
            "task": "qa", "arms": arms(a="alpha", b="beta"), "control": "a", "shadow": {"adapter": "cand", "rate": 1.0},
        })
        assert created.status_code == 200, created.text
        expected_text = {adapter: engine_text(server, adapter) for adapter in ("alpha", "beta", "cand")}
        assert len(set(expected_text.values())) == 3  # the adapters answer differently, so a leak would show

        sent = {"a": [], "b": []}
        users = {"a": set(), "b": set()}
        replies = {}
        for i in range(REQUESTS):
            user = f"user-{i % (REQUESTS // 2)}"  # each user twice: the second time must land on the same arm
            headers, text = ask(server, "qa", user)
            arm = headers["x-experiment-arm"]
            assert headers["x-experiment"] == "exp"
            assert headers["x-adapter"] == {"a": "alpha@1", "b": "beta@1"}[arm]
            assert text == expected_text[{"a": "alpha", "b": "beta"}[arm]]  # the live arm's answer, never the shadow's
            assert replies.setdefault(user, arm) == arm
            reward = float(i % 5) + (1.0 if arm == "b" else 0.0)
            posted = h.post("/v1/feedback", json={"request_id": headers["x-request-id"], "reward": reward})
            assert posted.json() == {"request_id": headers["x-request-id"], "experiment": "exp", "arm": arm,
                                     "duplicate": False}
            sent[arm].append(reward)
            users[arm].add(user)
        assert sent["a"] and sent["b"]

        again = h.post("/v1/feedback", json={"request_id": headers["x-request-id"], "reward": 100.0})
        assert again.status_code == 200 and again.json()["duplicate"] is True  # counted once

        summary = summary_when(server, "exp", lambda s: s["shadow"]["requests"] == REQUESTS and
                               sum(arm["requests"] for arm in s["arms"]) == REQUESTS)
        by_arm = {arm["name"]: arm for arm in summary["arms"]}
        for arm in ("a", "b"):
            figures = by_arm[arm]
            assert figures["assignments"] == len(users[arm])
            assert figures["requests"] == len(sent[arm]) and figures["errors"] == 0
            assert figures["feedback_count"] == figures["reward_count"] == len(sent[arm])
            assert figures["reward_mean"] == pytest.approx(sum(sent[arm]) / len(sent[arm]))
            assert figures["completion_tokens"] == MAX_TOKENS * len(sent[arm])
            assert figures["versions"] == {"1": len(sent[arm])}
            assert figures["ttft_p50_s"] is not None and figures["latency_p95_s"] >= figures["ttft_p50_s"]
        (reward,) = [c for c in summary["comparisons"] if c["metric"] == "reward"]
        mean_a, mean_b = (sum(sent[k]) / len(sent[k]) for k in ("a", "b"))
        assert reward["arm"] == "b" and reward["vs"] == "a"
        assert reward["diff"] == pytest.approx(mean_b - mean_a)
        assert reward["always_valid_ci95"][0] <= reward["ci95"][0] <= reward["diff"] <= reward["ci95"][1]
        assert 0 <= reward["p_value"] <= 1 and set(summary["srm"]) >= {"p_value", "flagged"}

        outputs = h.get("/v1/experiments/exp/shadow_outputs", params={"limit": 100}).json()["data"]
        assert len(outputs) == REQUESTS
        assert all(row["shadow_text"] == expected_text["cand"] and row["finish_reason"] == "length" for row in outputs)
        assert all(row["live_text"] == expected_text[{"a": "alpha", "b": "beta"}[row["live_arm"]]] for row in outputs)

        out = tmp_path / "report"
        assert main(["experiment", "report", "exp", "--server", server.base_url, "--out", str(out)]) == 0
        assert f"| b vs a | reward | {reward['diff']:.4g} |" in (out / "report.md").read_text()
        assert (out / "reward_over_time.png").stat().st_size > 0

        metrics = h.get("/metrics").text
        assert 'loraplex_experiment_requests_total{arm="a",experiment="exp"}' in metrics
        assert f'loraplex_experiment_shadow_requests_total{{experiment="exp",outcome="recorded"}} {float(REQUESTS)}' in metrics


def test_unloading_the_shadow_adapter_fails_no_live_request(server):
    with http(server) as h:
        assert h.put("/v1/experiments/shadowed", json={
            "task": "qa2", "arms": arms(a="alpha"), "shadow": {"adapter": "cand2", "rate": 1.0},
        }).status_code == 200
        results: list[tuple[int, str]] = []

        def one(i: int) -> None:
            with http(server) as mine:
                response = mine.post("/v1/chat/completions", headers={"X-Task-Id": "qa2"}, json={
                    "model": BASE, "messages": CHAT, "max_tokens": 16, "temperature": 0, "user": f"u{i}"})
                results.append((response.status_code, response.headers.get("x-experiment-arm")))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]  # 3 before the unload, 3 after
        for thread in threads[:3]:
            thread.start()
        deadline = time.monotonic() + 60
        while not _in_engine(server, "cand2") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _in_engine(server, "cand2")  # a shadow copy is queued or running as the adapter goes
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "cand2"}).status_code == 200
        for thread in threads[3:]:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results and all(status == 200 and arm == "a" for status, arm in results) and len(results) == 6
        summary = summary_when(server, "shadowed", lambda s: s["arms"][0]["requests"] == 6)
        shadow = summary["shadow"]
        assert shadow["dropped"] >= 3  # the copies submitted after the unload were never sent
        assert shadow["requests"] + shadow["dropped"] == 6


def _in_engine(server: LiveServer, adapter: str) -> bool:
    stats = server.state.engine.stats()
    return adapter in stats.running_adapters or adapter in stats.waiting_adapters


def test_experiment_state_survives_a_restart_and_units_stay_on_their_arm(files, tmp_path):
    body = {"task": "qa", "arms": arms(a="alpha", b="beta"), "control": "a"}
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        assert h.put("/v1/experiments/kept", json=body).status_code == 200
        first_arms = {f"user-{i}": ask(server, "qa", f"user-{i}")[0]["x-experiment-arm"] for i in range(8)}
        before = summary_when(server, "kept", lambda s: sum(arm["requests"] for arm in s["arms"]) == 8)
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        after = h.get("/v1/experiments/kept").json()
        assert after["arms"] == before["arms"]
        # Re-weight almost everything onto b: units seen before keep their arm, new ones follow the weights.
        reweighted = {**body, "arms": [{"name": "a", "adapter": "alpha", "weight": 0.001},
                                       {"name": "b", "adapter": "beta", "weight": 1.0}]}
        assert h.put("/v1/experiments/kept", json=reweighted).status_code == 200
        assert {user: ask(server, "qa", user)[0]["x-experiment-arm"] for user in first_arms} == first_arms
        assert {ask(server, "qa", f"new-{i}")[0]["x-experiment-arm"] for i in range(8)} == {"b"}
        srm = summary_when(server, "kept", lambda s: True)["srm"]
        assert srm["flagged"] is False  # expected counts follow the weights in force at each assignment


def test_bad_experiment_and_feedback_requests_get_clear_errors(server):
    with http(server) as h:
        def error(response, status):
            assert response.status_code == status, response.text
            return response.json()["error"]

        zero = arms(a="alpha", b="beta")
        for arm in zero:
            arm["weight"] = 0
        assert "sum to a positive number" in error(h.put("/v1/experiments/e", json={"task": "qa3", "arms": zero}), 400)["message"]
        unknown = error(h.put("/v1/experiments/e", json={"task": "qa3", "arms": arms(a="alpha", b="nope")}), 404)
        assert unknown["code"] == "adapter_not_found" and "'nope'" in unknown["message"]
        assert h.put("/v1/experiments/first", json={"task": "qa3", "arms": arms(a="alpha")}).status_code == 200
        conflict = error(h.put("/v1/experiments/second", json={"task": "qa3", "arms": arms(a="beta")}), 409)
        assert "'first'" in conflict["message"] and conflict["code"] == "experiment_conflict"
        stopped = {"task": "qa3", "arms": arms(a="alpha"), "status": "stopped"}
        assert h.put("/v1/experiments/first", json=stopped).status_code == 200
        assert h.put("/v1/experiments/second", json={"task": "qa3", "arms": arms(a="beta")}).status_code == 200

        missing = error(h.post("/v1/feedback", json={"request_id": "never-served", "reward": 1.0}), 404)
        assert missing["code"] == "request_not_found" and "never-served" in missing["message"]
        assert "exactly one" in error(h.post("/v1/feedback", json={"request_id": "x", "reward": 1, "thumbs": "up"}), 400)["message"]
        assert error(h.post("/v1/feedback", json={"request_id": "x", "thumbs": "sideways"}), 400)["param"] == "thumbs"
        assert error(h.get("/v1/experiments/none"), 404)["code"] == "experiment_not_found"
        assert error(h.delete("/v1/experiments/none"), 404)["code"] == "experiment_not_found"
        assert h.delete("/v1/experiments/second").json()["deleted"] is True
