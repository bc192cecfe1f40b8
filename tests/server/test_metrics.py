"""/metrics after known traffic: per-adapter counts equal what the test sent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.merged_slot import MergeStats
from server.app import ServerSettings
from server.metrics import EngineStatsCollector, GenerationTimer, ServerMetrics
from server.prefix_kv import PrefixCacheStats
from test_http_harness import live_server, make_adapters, make_model_folder


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_generation_timer_spreads_gaps_over_tokens():
    metrics = ServerMetrics()
    timer = GenerationTimer(metrics, "a", arrival=10.0)
    timer.on_tokens(1, now=10.5)  # first token: time to first token 0.5 s
    timer.on_tokens(2, now=10.7)  # two tokens in 0.2 s: two gaps of 0.1 s
    timer.on_finished(prompt_tokens=7, completion_tokens=3, finish_reason="length", now=11.0)
    found = samples(metrics.exposition().decode())
    assert value(found, "loraplex_time_to_first_token_seconds_sum", adapter="a") == pytest.approx(0.5)
    assert value(found, "loraplex_inter_token_latency_seconds_count", adapter="a") == 2
    assert value(found, "loraplex_inter_token_latency_seconds_sum", adapter="a") == pytest.approx(0.2)
    assert value(found, "loraplex_e2e_request_latency_seconds_sum", adapter="a") == pytest.approx(1.0)
    assert value(found, "loraplex_prompt_tokens_total", adapter="a") == 7
    assert value(found, "loraplex_generation_tokens_total", adapter="a") == 3


def test_registries_are_per_app():
    first, second = ServerMetrics(), ServerMetrics()
    first.requests.labels("x", "chat").inc()
    assert value(samples(second.exposition().decode()), "loraplex_requests_total", adapter="x", endpoint="chat") == 0


def test_metrics_count_the_traffic_sent(tmp_path):
    model_dir = make_model_folder(tmp_path / "tiny")
    paths = make_adapters(model_dir, tmp_path / "adapters", {"alpha": 1, "beta": 2})
    settings = ServerSettings(model=str(model_dir), adapters={k: str(v) for k, v in paths.items()})
    sent = {"alpha": 3, "beta": 1, "tiny": 2}
    completion_tokens = {name: 0 for name in sent}
    prompt_tokens = {name: 0 for name in sent}
    with live_server(settings) as server, httpx.Client(base_url=server.base_url, timeout=60) as http:
        for model, count in sent.items():
            for i in range(count):
                body = {"model": model, "prompt": f"Write {i}", "max_tokens": 6, "temperature": 0}
                usage = http.post("/v1/completions", json=body).json()["usage"]
                completion_tokens[model] += usage["completion_tokens"]
                prompt_tokens[model] += usage["prompt_tokens"]
        streamed = http.post("/v1/chat/completions", json={
            "model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        })
        assert streamed.status_code == 200
        completion_tokens["alpha"] += json.loads(streamed.text.split("\n\n")[-3][len("data: "):])["usage"]["completion_tokens"]
        assert http.post("/v1/completions", json={"model": "ghost", "prompt": "x"}).status_code == 404
        assert http.post("/v1/completions", json={"model": "beta", "prompt": "x", "logit_bias": {"1": 5}}).status_code == 400
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    for model, count in sent.items():
        assert value(found, "loraplex_requests_total", adapter=model, endpoint="completions") == count
        assert value(found, "loraplex_generation_tokens_total", adapter=model) == completion_tokens[model]
        assert value(found, "loraplex_e2e_request_latency_seconds_count", adapter=model) == count + (model == "alpha")
    assert value(found, "loraplex_requests_total", adapter="alpha", endpoint="chat") == 1
    assert value(found, "loraplex_prompt_tokens_total", adapter="tiny") == prompt_tokens["tiny"]
    assert value(found, "loraplex_requests_finished_total", adapter="tiny", finish_reason="length") + value(
        found, "loraplex_requests_finished_total", adapter="tiny", finish_reason="stop") == 2
    assert value(found, "loraplex_request_errors_total", adapter="-", status="404") == 1
    assert value(found, "loraplex_request_errors_total", adapter="-", status="400") == 1  # refused before routing
    assert value(found, "loraplex_num_requests_running") == 0
    assert value(found, "loraplex_max_loras") == 8
    info = [key for key in found if key[0] == "vllm:lora_requests_info"]
    assert len(info) == 1 and dict(info[0][1]) == {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    resident = {dict(labels)["adapter"] for name, labels in found if name == "loraplex_adapter_resident_requests"}
    assert resident == {"alpha@1", "beta@1"}


def test_prefix_cache_and_merged_adapter_counters_come_from_the_engine():
    prefix = PrefixCacheStats(hit_tokens=96, miss_tokens=40, evictions=3, dropped_blocks=2, blocks=5, row_blocks=4, nbytes=500,
                              budget_bytes=1000)
    stats = SimpleNamespace(queued=0, running=0, max_running=4, resident=[], max_loras=2, cpu_cache_entries=0,
                            disk_load_seconds_p50=None, disk_load_seconds_p95=None, running_adapters={},
                            waiting_adapters={}, slot_writes=0, disk_loads=0, prefix_cache=prefix,
                            merged_adapter=MergeStats(batches=7, seconds=0.25, nbytes=4096))
    metrics = ServerMetrics()
    metrics.registry.register(EngineStatsCollector(lambda: stats))
    found = samples(metrics.exposition().decode())
    assert value(found, "loraplex_prefix_cache_hit_tokens_total") == 96
    assert value(found, "loraplex_prefix_cache_miss_tokens_total") == 40
    assert value(found, "loraplex_prefix_cache_evictions_total") == 3
    assert value(found, "loraplex_prefix_cache_dropped_blocks_total") == 2
    assert value(found, "loraplex_prefix_cache_blocks") == 5 and value(found, "loraplex_prefix_cache_row_blocks") == 4
    assert value(found, "loraplex_prefix_cache_bytes") == 500
    assert value(found, "loraplex_merged_adapter_batches_total") == 7
    assert value(found, "loraplex_merged_adapter_merge_seconds_total") == 0.25
    assert value(found, "loraplex_merged_adapter_bytes") == 4096
    stats.prefix_cache = stats.merged_adapter = None  # --no-prefix-cache, --no-merge-single-adapter: no series at all
    assert not any(name.startswith(("loraplex_prefix", "loraplex_merged")) for name, _ in samples(metrics.exposition().decode()))
