"""The dashboard's JSON against a live server: what each key may see, traffic figures equal to
`/metrics` (their only source), training runs as the trainer logged them, pin/unpin over HTTP,
and the page's delivery (security headers, `--no-dashboard`)."""

from __future__ import annotations

import math
import time

import httpx
import pytest

from dashboard_fixtures import ADMIN_KEY, EVAL_LOSS, HTML_NAME, RUN_NAME, TENANT_KEY, TRAIN_LOSSES, DashboardEnv, dashboard_server
from server.app import ServerSettings
from server.metrics import ServerMetrics
from server.traffic_history import LATENCY_BOUNDS, Counts, TrafficHistory, bucket_quantile, window
from test_http_harness import live_server, make_model_folder

CHAT = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> DashboardEnv:
    with dashboard_server(tmp_path_factory.mktemp("dashboard_api")) as env:
        yield env


def chat(env: DashboardEnv, model: str, key: str = ADMIN_KEY, **headers) -> None:
    with env.http(key) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 3}, headers=headers
        )
        assert response.status_code == 200, response.text


def test_state_needs_a_key_and_the_config_says_so(env):
    with env.http(key=None) as client:
        assert client.get("/dashboard/api/config").json() == {"api_keys": True}
        refused = client.get("/dashboard/api/state")
        assert refused.status_code == 401
        assert "API key" in refused.json()["error"]["message"]


def test_admin_sees_every_adapter_with_its_tier_and_path(env):
    with env.http() as client:
        state = client.get("/dashboard/api/state").json()
        models = {card["id"] for card in client.get("/v1/models").json()["data"]} - {"tiny"}
    adapters = {adapter["name"]: adapter for adapter in state["adapters"]}
    assert set(adapters) == models
    assert HTML_NAME in adapters
    alpha = adapters["alpha"]
    assert alpha["tier"] in {"slot", "cpu", "disk"}
    assert alpha["path"] == str((env.root / "alpha").resolve())
    assert alpha["rank"] == 4 and "q_proj" in alpha["target_modules"]
    assert alpha["bytes"] > 0
    assert state["viewer"] == {"tenant": "ops", "admin": True}
    assert state["server"]["can_load"] is True
    assert {task["task"] for task in state["tasks"]} == {"summarize", "ab"}


def test_tenant_sees_only_its_adapters_tasks_and_traffic(env):
    chat(env, "beta")  # another tenant's traffic the tenant must not see
    chat(env, "alpha", key=TENANT_KEY)
    with env.http(TENANT_KEY) as client:
        state = client.get("/dashboard/api/state").json()
        assert client.get("/dashboard/api/runs").status_code == 403
    assert [adapter["name"] for adapter in state["adapters"]] == ["alpha"]
    assert state["adapters"][0]["path"] is None
    assert [task["task"] for task in state["tasks"]] == ["summarize"]
    assert {row["name"] for row in state["traffic"]["adapters"]} == {"alpha"}
    assert state["server"]["can_load"] is False and state["server"]["adapter_roots"] == []


def test_traffic_totals_equal_the_metrics_endpoint(env):
    for _ in range(2):
        chat(env, "alpha")
    chat(env, "beta")
    chat(env, "tiny", **{"X-Task-Id": "ab"})
    chat(env, "summarize")
    with env.http() as client:
        traffic = client.get("/dashboard/api/state").json()["traffic"]
    requests = env.metric_totals("loraplex_requests_total", "adapter")
    tokens = env.metric_totals("loraplex_generation_tokens_total", "adapter")
    by_adapter = {row["name"]: row for row in traffic["adapters"]}
    assert {"alpha", "beta"} <= set(by_adapter)
    for name, row in by_adapter.items():
        assert row["requests"] == requests[name]
        assert row["generation_tokens"] == tokens[name]
    task_requests = env.metric_totals("loraplex_task_requests_total", "task")
    by_task = {row["name"]: row["requests"] for row in traffic["tasks"]}
    assert by_task == task_requests
    assert by_task["ab"] >= 1 and by_task["summarize"] >= 1


def test_task_assignments_per_arm_equal_the_metrics_endpoint(env):
    for user in range(8):  # the arm is a hash of the user: eight users reach both arms
        chat(env, "ab", **{"X-User-Id": f"user-{user}"})
    with env.http() as client:
        tasks = {task["task"]: task for task in client.get("/dashboard/api/state").json()["tasks"]}
    routed = env.metric_totals("loraplex_task_requests_total", "task", "adapter")
    assert tasks["ab"]["arms"] == {"alpha": 1.0, "beta": 1.0}
    assert tasks["ab"]["assignments"] == {adapter: value for (task, adapter), value in routed.items() if task == "ab"}
    assert set(tasks["ab"]["assignments"]) == {"alpha", "beta"}
    assert sum(tasks["ab"]["assignments"].values()) >= 8


def test_last_used_follows_a_request_once_sampled(env):
    chat(env, "gamma")
    history = env.server.app.state.traffic_history
    deadline = time.monotonic() + 30
    while "gamma" not in history.last_request_wall and time.monotonic() < deadline:
        time.sleep(0.2)
    with env.http() as client:
        adapters = {a["name"]: a for a in client.get("/dashboard/api/state").json()["adapters"]}
    assert adapters["gamma"]["last_used"] is not None
    assert abs(adapters["gamma"]["last_used"] - time.time()) < 60


def test_runs_list_the_trainers_log(env):
    with env.http() as client:
        payload = client.get("/dashboard/api/runs").json()
    assert payload["runs_dir"] == str(env.runs_dir)
    [run] = payload["runs"]
    assert run["name"] == RUN_NAME
    assert run["tasks"] == ["summarize", "qa"]
    assert run["steps"] == len(TRAIN_LOSSES)
    assert [point["loss"] for point in run["train"]] == TRAIN_LOSSES
    assert run["train"][0]["task_loss"][1] is None  # NaN in the log: valid JSON, no point
    assert {task: figures["loss"] for task, figures in run["eval"][-1]["tasks"].items()} == EVAL_LOSS


def test_pin_and_unpin_over_http_are_admin_only(env):
    with env.http(TENANT_KEY) as client:
        refused = client.post("/v1/pin_lora_adapter", json={"lora_name": "alpha"})
        assert refused.status_code == 403
    with env.http() as client:
        assert client.post("/v1/pin_lora_adapter", json={"lora_name": "nope"}).status_code == 404
        assert client.post("/v1/pin_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        assert "beta" in env.server.state.engine.tiers.pinned_names()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            beta = next(a for a in client.get("/dashboard/api/state").json()["adapters"] if a["name"] == "beta")
            if beta["tier"] == "slot":
                break
            time.sleep(0.1)
        assert beta["pinned"] and beta["tier"] == "slot"
        assert client.post("/v1/unpin_lora_adapter", json={"lora_name": "beta"}).status_code == 200
    assert "beta" not in env.server.state.engine.tiers.pinned_names()


def test_page_and_assets_carry_a_strict_content_security_policy(env):
    with env.http(key=None) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/dashboard/static/app.js").status_code == 200
        missing = client.get("/dashboard/static/..%2Fapp.py")
        assert missing.status_code == 404 and "error" in missing.json()


def test_an_open_server_shows_everything_without_a_key(tmp_path):
    settings = ServerSettings(model=str(make_model_folder(tmp_path / "tiny")))
    with live_server(settings) as server:
        with httpx.Client(base_url=server.base_url) as client:
            assert client.get("/dashboard/api/config").json() == {"api_keys": False}
            state = client.get("/dashboard/api/state").json()
    assert state["viewer"] == {"tenant": "default", "admin": True}
    assert state["adapters"] == [] and state["server"]["can_load"] is False  # no --adapter-root


def test_no_dashboard_leaves_no_route(tmp_path):
    settings = ServerSettings(model=str(make_model_folder(tmp_path / "tiny")), dashboard=False)
    with live_server(settings) as server:
        with httpx.Client(base_url=server.base_url) as client:
            assert client.get("/dashboard").status_code == 404
            assert client.get("/dashboard/api/state").status_code == 404


def test_bucket_quantile_interpolates_within_the_bucket_as_prometheus_does():
    # 10 observations in (1, 2], 10 in (2, 4]: the median is the top of the first bucket, p75
    # halfway into the second; an empty histogram has no quantile.
    bounds = (1.0, 2.0, 4.0, float("inf"))
    buckets = (0, 10, 20, 20)
    assert bucket_quantile(0.5, buckets, bounds) == pytest.approx(2.0)
    assert bucket_quantile(0.75, buckets, bounds) == pytest.approx(3.0)
    assert bucket_quantile(0.25, buckets, bounds) == pytest.approx(1.5)
    assert bucket_quantile(0.5, (0, 0, 0, 0), bounds) is None
    assert bucket_quantile(0.99, (0, 0, 0, 5), bounds) == 4.0  # beyond the last finite bound


def test_quantiles_from_the_servers_histogram_bound_the_observed_values():
    # Oracle: the exact quantiles of the observations must fall in the bucket the estimate is in.
    metrics = ServerMetrics()
    observations = [0.003, 0.02, 0.04, 0.07, 0.08, 0.2, 0.3, 0.45, 0.9, 3.0]
    for value in observations:
        metrics.e2e.labels("a").observe(value)
    counts = TrafficHistory(metrics, stats_source=lambda: None).read().adapters["a"]
    assert counts.e2e[-1] == len(observations)
    for q in (0.5, 0.95):
        exact = sorted(observations)[math.ceil(q * len(observations)) - 1]
        estimate = bucket_quantile(q, counts.e2e)
        upper = next(bound for bound in LATENCY_BOUNDS if exact <= bound)
        lower = max([0.0, *(bound for bound in LATENCY_BOUNDS if bound < exact)])
        assert lower <= estimate <= upper


def test_window_rates_are_counter_differences_over_time():
    slow = LATENCY_BOUNDS.index(0.1)
    before = Counts(requests=10, generation_tokens=100, ttft=tuple(4 if i >= slow else 0 for i in range(len(LATENCY_BOUNDS))))
    after = Counts(requests=16, generation_tokens=160, ttft=before.ttft[:-1] + (8,))
    figures = window(before, after, seconds=3.0)
    assert figures.requests_per_s == pytest.approx(2.0)
    assert figures.tokens_per_s == pytest.approx(20.0)
    assert figures.ttft_p50 == pytest.approx(LATENCY_BOUNDS[-2])  # the 4 new observations all fell past the last bound
    assert figures.e2e_p50 is None


def test_refusals_and_requests_are_read_per_adapter_from_the_counters():
    metrics = ServerMetrics()
    metrics.requests.labels("a", "chat").inc(3)
    metrics.requests.labels("a", "completions").inc(2)
    metrics.errors.labels("a", "429").inc(2)
    metrics.errors.labels("a", "400").inc()  # not a refusal for load
    snapshot = TrafficHistory(metrics, stats_source=lambda: None).read()
    assert snapshot.adapters["a"].requests == 5
    assert snapshot.adapters["a"].rejected == 2
    assert snapshot.load is None  # no engine yet
