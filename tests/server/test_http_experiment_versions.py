"""Experiment arms pinned to one adapter version ("name@version") on a live server: the pinned arm
keeps answering with exactly that version's weights while the name is hot swapped twice (checked
against the version's own single-adapter answer), the latest arm follows the swaps, and the old
version is released when the experiment goes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from router.task_table import TaskRoute
from server.app import ServerSettings
from server.engine import EngineConfig
from test_http_experiments import BASE, ask, client, engine_text, http
from test_http_harness import LiveServer, live_server, make_adapters, make_model_folder

USERS = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("versions")
    model_dir = make_model_folder(tmp / BASE)
    folders = {"one": 11, "two": 12, "three": 13, "filler1": 14, "filler2": 15}
    return model_dir, make_adapters(model_dir, tmp / "adapters", folders)


def settings_for(files, state_dir: Path, main: str = "one") -> ServerSettings:
    model_dir, folders = files
    return ServerSettings(
        model=str(model_dir),
        adapters={"main": str(folders[main]), "filler1": str(folders["filler1"]), "filler2": str(folders["filler2"])},
        tasks={"qa": TaskRoute.single("main"), "qb": TaskRoute.single("main")},
        adapter_roots=[str(folders["one"].parent)],
        state_dir=str(state_dir),
        # Two CPU entries and two slots: the fillers push a pinned version out of its slot, but
        # its CPU copy is held (one entry for pins, one for the rest).
        engine=EngineConfig(max_loras=2, max_cpu_loras=2, max_lora_rank=8, prefill_chunk=8),
    )


def hot_swap(server: LiveServer, folder: Path) -> None:
    with http(server) as h:
        loaded = h.post("/v1/load_lora_adapter", json={"lora_name": "main", "lora_path": str(folder)})
        assert loaded.status_code == 200, loaded.text


def pinned_experiment(task: str = "qa") -> dict:
    return {"task": task, "control": "a", "arms": [{"name": "a", "adapter": "main@1", "weight": 1.0},
                                                   {"name": "b", "adapter": "main", "weight": 1.0}]}


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_pinned_arm_keeps_its_version_through_hot_swaps_and_is_released_on_delete(files, tmp_path):
    _, folders = files
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        engine = server.state.engine
        v1_text = engine_text(server, "main")  # main@1's own single-adapter answer
        created = h.put("/v1/experiments/pinned", json=pinned_experiment())
        assert created.status_code == 200, created.text
        assert [arm["adapter"] for arm in created.json()["arms"]] == ["main@1", "main"]

        hot_swap(server, folders["two"])
        hot_swap(server, folders["three"])
        v3_text = engine_text(server, "main")
        assert v3_text != v1_text  # the versions answer differently, so serving the wrong one would show
        assert engine.tiers.registry.lookup("main@2") is None  # a swapped-out version nobody pins is gone
        (row,) = [a for a in h.get("/dashboard/api/state").json()["adapters"] if a["name"] == "main"]
        assert (row["version"], row["kept_versions"]) == (3, [1])
        # The fillers take both slots and churn the unheld CPU entry: main@1 stays in CPU memory.
        engine_text(server, "filler1"), engine_text(server, "filler2")
        assert "main@1" in engine.tiers.cpu and engine.tiers.slots.slot_of("main@1") is None

        seen = set()
        for i in range(USERS):
            headers, text = ask(server, "qa", f"user-{i}")
            arm = headers["x-experiment-arm"]
            seen.add(arm)
            assert (headers["x-adapter"], text) == {"a": ("main@1", v1_text), "b": ("main@3", v3_text)}[arm]
        assert seen == {"a", "b"}
        plain = client(server).chat.completions.with_raw_response.create(
            model="main", messages=[{"role": "user", "content": "Tell me"}], max_tokens=4, temperature=0)
        assert plain.headers["x-adapter"] == "main@3"  # everyone else still gets the latest

        assert h.delete("/v1/experiments/pinned").status_code == 200
        assert engine.tiers.registry.lookup("main@1") is None
        assert wait_until(lambda: "main@1" not in engine.tiers.cpu and engine.tiers.slots.slot_of("main@1") is None)
        assert engine.tiers.registry.pinned() == {}
        (row,) = [a for a in h.get("/dashboard/api/state").json()["adapters"] if a["name"] == "main"]
        assert row["kept_versions"] == []


def test_unknown_malformed_and_too_many_pinned_versions_get_clear_errors(files, tmp_path):
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        def error(body: dict, status: int) -> dict:
            response = h.put("/v1/experiments/bad", json=body)
            assert response.status_code == status, response.text
            return response.json()["error"]

        unknown = error({"task": "qa", "arms": [{"name": "a", "adapter": "main@9", "weight": 1}]}, 404)
        assert unknown["code"] == "adapter_not_found" and "'main@9'" in unknown["message"] and "main@1" in unknown["message"]
        malformed = error({"task": "qa", "arms": [{"name": "a", "adapter": "main@v1", "weight": 1}]}, 400)
        assert "'main@v1'" in malformed["message"] and "NAME@VERSION" in malformed["message"]
        # max_cpu_loras=2 holds one pinned version in CPU memory and one entry for the rest; the
        # refused PUT pins nothing.
        two = [{"name": name, "adapter": f"{name}@1", "weight": 1} for name in ("main", "filler1")]
        limit = error({"task": "qa", "arms": two}, 409)
        assert limit["code"] == "too_many_pinned_versions" and "more than 1" in limit["message"]
        assert server.state.engine.tiers.registry.pinned() == {}
        assert server.state.engine.tiers.cpu.held() == set()
        assert h.put("/v1/experiments/ok", json={"task": "qa", "arms": two[:1]}).status_code == 200


def test_a_restart_keeps_a_pin_on_the_same_weights_and_stops_an_experiment_whose_version_changed(files, tmp_path):
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        assert h.put("/v1/experiments/pinned", json=pinned_experiment()).status_code == 200
        v1_text = engine_text(server, "main")
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:  # main@1 is "one" again
        assert h.get("/v1/experiments/pinned").json()["status"] == "running"
        headers, text = next(reply for reply in (ask(server, "qa", f"u{i}") for i in range(USERS))
                             if reply[0]["x-experiment-arm"] == "a")
        assert (headers["x-adapter"], text) == ("main@1", v1_text)
    with live_server(settings_for(files, tmp_path, main="three")) as server, http(server) as h:  # main@1 is "three"
        assert h.get("/v1/experiments/pinned").json()["status"] == "stopped"
        headers, _ = ask(server, "qa", "u0")
        assert "x-experiment" not in headers  # the task table serves the task again
        assert server.state.engine.tiers.registry.pinned() == {}


def test_a_pinned_version_outlives_unloading_its_name_until_the_last_experiment_goes(files, tmp_path):
    only_v1 = {"task": "qa", "arms": [{"name": "a", "adapter": "main@1", "weight": 1.0}]}
    with live_server(settings_for(files, tmp_path)) as server, http(server) as h:
        v1_text = engine_text(server, "main")
        assert h.put("/v1/experiments/first", json=only_v1).status_code == 200
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "main"}).status_code == 200
        headers, text = ask(server, "qa", "u1")
        assert (headers["x-adapter"], text) == ("main@1", v1_text)
        second = h.put("/v1/experiments/second", json={**only_v1, "task": "qb"})  # pins the kept version again
        assert second.status_code == 200, second.text
        unknown = h.put("/v1/experiments/third", json={**only_v1, "task": "qb", "status": "stopped",
                                                       "arms": [{"name": "a", "adapter": "main", "weight": 1}]})
        assert unknown.status_code == 404 and "'main'" in unknown.json()["error"]["message"]  # the latest is gone
        registry = server.state.engine.tiers.registry
        assert h.delete("/v1/experiments/first").status_code == 200
        assert registry.lookup("main@1") is not None  # "second" still pins it
        assert h.delete("/v1/experiments/second").status_code == 200
        assert registry.lookup("main@1") is None and registry.pinned() == {}
