"""A version an experiment pins serves exactly the weights it was registered with, even after its
folder is overwritten in place (the next version registered from the same folder) and other
adapters churn through the CPU tier: while pinned it is held in CPU memory, inside the tier's
entry budget. A pin taken when those bytes are already gone from memory and disk fails its
requests with an error that names the version and the cause, never with other weights. The
engine is stepped by hand, so each check sees the state between two worker steps."""

import shutil
import time
from pathlib import Path

import pytest

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import reference_completion, save_random_adapter
from server.engine import Engine, EngineConfig, GenerationRequest, RequestHandle

PROMPT = [5, 9, 14, 22, 31, 40]
PARAMS = SamplingParams(max_tokens=6)
CPU_ENTRIES = 2  # one held for the pin, one for everything else


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned_adapters")
    return {name: save_random_adapter(root / name, model_dir, seed=seed) for seed, name in enumerate(["old", "new", "f1", "f2"], 1)}


@pytest.fixture(scope="module")
def expected(model_dir, adapter_dirs):
    tokens = {name: reference_completion(model_dir, adapter_dirs[name], PROMPT, PARAMS) for name in ("old", "new")}
    assert tokens["old"] != tokens["new"]  # serving the wrong version would show
    return tokens


def _engine(model_dir) -> Engine:
    config = EngineConfig(max_running=2, max_loras=2, max_cpu_loras=CPU_ENTRIES, max_lora_rank=8, prefill_chunk=8)
    return Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")


def _overwrite(folder: Path, source: Path) -> None:
    """Replace the folder's files in place, as an operator retraining into the same path does."""
    for file in source.iterdir():
        shutil.copyfile(file, folder / file.name)


def _serve(engine: Engine, adapter: str) -> RequestHandle:
    handle = engine.submit(GenerationRequest(PROMPT, PARAMS, adapter=adapter))
    deadline = time.monotonic() + 60  # a liveness bound only: a disk read-back runs on a background thread
    while time.monotonic() < deadline:
        if handle.done:
            return handle
        engine._step()
        time.sleep(0.001)  # let the read-back thread run on a busy machine
    raise AssertionError(f"the request on {adapter} never finished")


def test_pinned_version_serves_its_own_weights_after_its_folder_is_overwritten_and_it_was_pushed_out(
        model_dir, adapter_dirs, expected, tmp_path):
    folder = shutil.copytree(adapter_dirs["old"], tmp_path / "x")
    engine = _engine(model_dir)
    try:
        engine.register_adapter("x", folder)
        engine.pin_adapter_version("x@1")
        _overwrite(folder, adapter_dirs["new"])
        engine.register_adapter("x", folder)  # x@2: the new weights, from the same folder
        engine.register_adapter("f1", adapter_dirs["f1"])
        engine.register_adapter("f2", adapter_dirs["f2"])  # the fillers churn the unheld entry
        assert engine.stats().cpu_cache_entries <= CPU_ENTRIES
        assert "x@1" in engine.tiers.cpu

        pinned, latest = _serve(engine, "x@1").result(0), _serve(engine, "x").result(0)
        assert (pinned.finish_reason, pinned.token_ids) == ("length", expected["old"])
        assert (latest.finish_reason, latest.token_ids) == ("length", expected["new"])
        assert engine.stats().cpu_cache_entries <= CPU_ENTRIES
    finally:
        engine.shutdown()


def test_last_release_lets_the_pinned_version_go(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    try:
        engine.register_adapter("x", adapter_dirs["old"])
        engine.pin_adapter_version("x@1")
        engine.pin_adapter_version("x@1")  # a second experiment
        engine.register_adapter("x", adapter_dirs["new"])
        engine.release_adapter_version("x@1")
        engine.register_adapter("f1", adapter_dirs["f1"])
        engine.register_adapter("f2", adapter_dirs["f2"])
        assert "x@1" in engine.tiers.cpu  # still pinned once
        engine.release_adapter_version("x@1")
        engine._step()
        assert "x@1" not in engine.tiers.cpu and engine.tiers.registry.lookup("x@1") is None
    finally:
        engine.shutdown()


def test_a_pin_of_a_version_whose_bytes_are_gone_fails_its_requests_by_name(model_dir, adapter_dirs, expected, tmp_path):
    folder = shutil.copytree(adapter_dirs["old"], tmp_path / "x")
    engine = _engine(model_dir)
    try:
        engine.register_adapter("x", folder)
        engine.register_adapter("f1", adapter_dirs["f1"])
        engine.register_adapter("f2", adapter_dirs["f2"])  # x@1 is on disk only
        _overwrite(folder, adapter_dirs["new"])  # ... and now not even there
        engine.pin_adapter_version("x@1")
        end = _serve(engine, "x@1").result(0)
        assert end.finish_reason == "error" and end.token_ids == []
        assert "x@1" in end.error and "changed on disk" in end.error
        assert end.error.endswith("point the experiment at the new version")  # loading x again would not fix x@1
        assert str(tmp_path) not in end.error  # clients see no server paths
    finally:
        engine.shutdown()
