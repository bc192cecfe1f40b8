"""What a replica behind a gateway needs: a shared adapter store it follows, `store:` paths,
readiness that waits for pinned adapters, and a graceful drain on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.store import AdapterStore
from server.app import ServerSettings
from server.cli import main as loraplex
from server.drain import DrainState
from server.engine import Engine, EngineConfig
from server.store_sync import StoreSync
from backbone.loading import load_model
from backbone.tokenizer import Tokenizer
from test_http_harness import LiveServer, make_adapters, make_model_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    model_dir = make_model_folder(tmp / "tiny")
    adapters = make_adapters(model_dir, tmp / "made", {"one": 1, "two": 2, "three": 3})
    return model_dir, adapters


def _publish(store: Path, name: str, path: Path, model_dir: Path) -> None:
    assert loraplex(["adapter", "publish", "--store", str(store), "--model", str(model_dir), name, str(path)]) == 0


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ---- the sync's bookkeeping ------------------------------------------------------------------


class _Recorder:
    def __init__(self, fail_on: set[str] = frozenset()) -> None:
        self.registered: list[tuple[str, str]] = []
        self.unregistered: list[str] = []
        self.fail_on = fail_on

    def register(self, name: str, path: Path) -> None:
        if path.name in self.fail_on:
            raise ValueError(f"{name} {path.name} is broken")
        self.registered.append((name, path.name))

    def unregister(self, name: str) -> None:
        self.unregistered.append(name)


def test_sync_registers_new_versions_once_and_drops_removed_adapters(tmp_path, setup):
    model_dir, adapters = setup
    store = AdapterStore(tmp_path / "store")
    recorder = _Recorder()
    sync = StoreSync(store, recorder.register, recorder.unregister)
    store.put("one", adapters["one"])
    store.put("two", adapters["two"])
    assert sorted(sync.sync_once().registered) == ["one@v1", "two@v1"]
    assert sync.sync_once().registered == []  # nothing changed: nothing re-registered
    store.put("one", adapters["three"])
    assert sync.sync_once().registered == ["one@v2"]
    assert recorder.registered == [("one", "v1"), ("two", "v1"), ("one", "v2")]
    shutil.rmtree(store.root / "two")  # an operator removes an adapter from the store
    report = sync.sync_once()
    assert report.removed == ["two"] and recorder.unregistered == ["two"]
    assert sync.served == {"one": "v2"}


def test_sync_skips_a_broken_version_and_keeps_serving_the_previous_one(tmp_path, setup):
    _, adapters = setup
    store = AdapterStore(tmp_path / "store")
    recorder = _Recorder(fail_on={"v2"})
    sync = StoreSync(store, recorder.register, recorder.unregister)
    store.put("one", adapters["one"])
    sync.sync_once()
    store.put("one", adapters["two"])  # v2: refused by the (fake) engine
    report = sync.sync_once()
    assert list(report.failed) == ["one@v2"] and sync.served == {"one": "v1"}
    assert sync.sync_once().failed == {}  # not retried every pass
    store.put("one", adapters["three"])  # v3 is good again
    assert sync.sync_once().registered == ["one@v3"]


def test_publish_refuses_an_adapter_the_replicas_would_refuse(tmp_path, setup, capsys):
    model_dir, adapters = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["nope"]}))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code = loraplex(["adapter", "publish", "--store", str(tmp_path / "store"), "--model", str(model_dir), "x", str(broken)])
    assert code == 2 and "error" in capsys.readouterr().err
    assert AdapterStore(tmp_path / "store").list_adapters() == []


# ---- a live replica following the store ------------------------------------------------------


def test_a_publish_reaches_a_syncing_replica_and_store_paths_load(tmp_path, setup):
    model_dir, adapters = setup
    store = tmp_path / "store"
    _publish(store, "one", adapters["one"], model_dir)
    settings = ServerSettings(model=str(model_dir), served_model_name="tiny", adapter_store=str(store),
                              sync_store=True, store_poll_seconds=0.1)
    server = LiveServer(settings)
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            def version(name: str) -> int | None:
                cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
                return cards[name]["version"] if name in cards else None

            assert version("one") == 1  # served from the first pass, before the server answered
            body = {"model": "one", "prompt": "hello", "max_tokens": 3, "temperature": 0}
            assert http.post("/v1/completions", json=body).headers["x-adapter"] == "one@1"
            _publish(store, "one", adapters["two"], model_dir)
            _publish(store, "two", adapters["three"], model_dir)
            _wait_for(lambda: version("one") == 2 and version("two") == 1)
            assert http.post("/v1/completions", json=body).headers["x-adapter"] == "one@2"

            loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "pinned-old", "lora_path": "store:one@v1"})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["path"] == str((store / "one" / "v1").resolve())
            missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "store:one@v9"})
            assert missing.status_code == 404 and "v9" in missing.json()["error"]["message"]
    finally:
        server.stop()


def test_store_paths_without_a_store_are_refused(setup):
    model_dir, _ = setup
    server = LiveServer(ServerSettings(model=str(model_dir), served_model_name="tiny"))
    server.start()
    try:
        reply = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "store:one"})
        assert reply.status_code == 400 and "--adapter-store" in reply.json()["error"]["message"]
    finally:
        server.stop()


# ---- readiness ---------------------------------------------------------------------------------


def test_ready_waits_for_pinned_adapters_to_be_resident(setup):
    model_dir, adapters = setup
    model = load_model(model_dir)
    engine = Engine(model, Tokenizer.from_folder(model_dir), EngineConfig(max_loras=2, max_lora_rank=8), "tiny")
    try:
        engine.register_adapter("one", adapters["one"])
        engine.pin_adapter("one")
        assert engine.pinned_not_resident() == ["one"]  # the worker has not placed it yet
        engine.start()
        _wait_for(lambda: engine.pinned_not_resident() == [])
    finally:
        engine.shutdown()


# ---- the drain ---------------------------------------------------------------------------------


def test_draining_refuses_new_work_finishes_running_streams_and_says_not_ready(setup):
    model_dir, _ = setup
    drain = DrainState()
    server = LiveServer(ServerSettings(model=str(model_dir), served_model_name="tiny"), drain)
    server.start()
    try:
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "Write", "max_tokens": 1500, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as reply:
                for line in reply.iter_lines():
                    started.set()
                    if line:  # blank lines separate SSE events
                        events.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        drain.begin()
        ready = httpx.get(f"{server.base_url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": "tiny", "prompt": "b", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining" and refused.headers["retry-after"] == "1"
        reader.join(60)
        assert events[-1] == "data: [DONE]"  # the running stream finished normally
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events if e.startswith("data: {")]
        assert finish[-1] in ("length", "stop")
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_lets_a_running_stream_finish_then_exits(setup):
    model_dir, _ = setup
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
         "--port", str(port), "--drain-timeout", "600"],  # the stream must finish however loaded the machine
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = _OutputReader(process)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{base}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(up, timeout=60)
        lines: list[str] = []
        body = {"model": "tiny", "prompt": "Write", "max_tokens": 1500, "temperature": 0, "stream": True}
        late: list[int | str] = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)  # mid-stream
                    _wait_for(lambda: "draining" in output.text())
                    late.append(_late_request(base))
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"  # the stream outlived the signal
        # New work is not taken: the listener is closed (a gateway retries elsewhere), or a request
        # that still got in is answered 503.
        assert late[0] in ("refused", "closed", 503), late
        assert process.wait(60) == 0  # a drained SIGTERM is a normal end
        output.thread.join(30)
        log = output.text()
        assert "draining" in log and "Waiting for application shutdown" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _OutputReader:
    """The process's output, collected line by line on a thread so the test can look at it while
    the process runs."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def _late_request(base: str) -> int | str:
    try:
        return httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "b", "max_tokens": 2}, timeout=10).status_code
    except httpx.ConnectError:
        return "refused"
    except httpx.RemoteProtocolError:
        return "closed"  # accepted as the listener closed, then closed unanswered: never started
