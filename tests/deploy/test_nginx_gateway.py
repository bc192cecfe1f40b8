"""Two replicas behind the real nginx with deploy/nginx/nginx.conf: adapter affinity, a store
publish reaching both, and a SIGTERM drain under load that loses no request.

nginx and its njs module come from Debian's packages (`.ci/run` installs them); without them
these tests skip and say so."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent / "bench"), str(TESTS / "server")]

from gateway import find_nginx, start_nginx, start_replica, wait_ready, wait_until  # noqa: E402
from server.cli import main as loraplex  # noqa: E402
from test_http_harness import make_adapters, make_model_folder  # noqa: E402

pytestmark = pytest.mark.skipif(
    find_nginx() is None, reason="nginx with the njs module is not installed (apt-get install nginx-light libnginx-mod-http-js)"
)

ADAPTERS = [f"a{i}" for i in range(6)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    model_dir = make_model_folder(tmp / "tiny")
    made = make_adapters(model_dir, tmp / "made", {name: i for i, name in enumerate(ADAPTERS + ["next"])})
    store = tmp / "store"
    for name in ADAPTERS:
        assert loraplex(["adapter", "publish", "--store", str(store), "--model", str(model_dir), name, str(made[name])]) == 0
    serve_args = ["--model", str(model_dir), "--served-model-name", "tiny", "--adapter-store", str(store), "--sync",
                  "--store-poll-seconds", "0.2", "--max-loras", "4", "--max-lora-rank", "8", "--drain-timeout", "60"]
    serve_args += [arg for name in ADAPTERS for arg in ("--task", f"task-{name}={name}")]
    replicas = [start_replica(tmp, serve_args) for _ in range(2)]
    nginx = None
    try:
        wait_ready(replicas)
        nginx = start_nginx(tmp / "nginx", replicas, base_model="tiny")
        yield nginx, model_dir, store, made
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.process.wait(60)


def _requests_per_replica(nginx, adapter: str) -> list[float]:
    return [replica.metric("loraplex_requests_total", adapter=adapter) for replica in nginx.replicas]


@pytest.mark.parametrize("key", ["header", "model"])
def test_requests_for_one_adapter_land_on_one_replica(gateway, key):
    # The gateway hashes what it can see: the X-Task-Id header, else the body's `model`. A task and
    # the adapter it routes to are different keys, so each way of naming is checked on its own.
    nginx, *_ = gateway
    before = {name: _requests_per_replica(nginx, name) for name in ADAPTERS}
    with httpx.Client(base_url=nginx.url, timeout=60) as http:
        for _ in range(3):
            for name in ADAPTERS:
                if key == "header":
                    reply = http.post("/v1/completions", headers={"X-Task-Id": f"task-{name}"},
                                      json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
                else:
                    reply = http.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
                assert reply.status_code == 200, reply.text
    for name in ADAPTERS:
        counts = [after - was for after, was in zip(_requests_per_replica(nginx, name), before[name])]
        assert sorted(counts) == [0.0, 3.0], f"{name}: requests per replica {counts}"


def test_publishing_a_version_reaches_both_replicas(gateway):
    nginx, model_dir, store, made = gateway
    assert loraplex(["adapter", "publish", "--store", str(store), "--model", str(model_dir), "a0", str(made["next"])]) == 0

    def version_everywhere() -> bool:
        versions = set()
        for replica in nginx.replicas:
            cards = {card["id"]: card for card in httpx.get(f"{replica.url}/v1/models", timeout=10).json()["data"]}
            versions.add(cards["a0"]["version"])
        return versions == {2}

    wait_until(version_everywhere, 30, "version 2 of a0 on both replicas")
    reply = httpx.post(f"{nginx.url}/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert reply.headers["x-adapter"] == "a0@2"


def test_a_replica_drained_under_load_loses_no_request(gateway):
    nginx, *_ = gateway
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=nginx.url, timeout=120) as http:
            for round_ in range(5):
                name = ADAPTERS[(index + round_) % len(ADAPTERS)]
                try:
                    reply = http.post("/v1/completions", headers={"X-Task-Id": f"task-{name}"},
                                      json={"model": "tiny", "prompt": "Write", "max_tokens": 24})
                except httpx.HTTPError as err:
                    with lock:
                        failures.append(repr(err))
                    continue
                with lock:
                    statuses.append(reply.status_code)
                    if reply.status_code != 200:
                        failures.append(reply.text)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        wait_until(lambda: len(statuses) >= 6, 120, "the first responses")
        drained = nginx.replicas[1]
        drained.terminate()  # SIGTERM mid-load
        for future in futures:
            future.result()
    done.set()
    assert drained.process.wait(60) is not None
    assert "draining" in drained.log_path.read_text()
    # Every request answered 200: the drained replica finished what it had, and nginx retried
    # what it refused (connection refused, or 503 draining) on the other replica.
    assert failures == [] and statuses == [200] * 30, failures[:3]
