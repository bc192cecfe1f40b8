"""The on-disk store: immutable versions, a LATEST pointer, and writes that are whole or absent."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adapter_fixtures import our_adapter

import adapters.peft_io
from adapters.errors import AdapterNotFoundError, CorruptAdapterFileError, StoreError, VersionExistsError
from adapters.peft_io import read_adapter, save_adapter
from adapters.store import AdapterStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def weights(tiny_llama_dir):
    return our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _same(left, right):
    assert left.tensors.keys() == right.tensors.keys()
    for name in left.tensors:
        for a, b in zip(left.tensors[name], right.tensors[name]):
            assert torch.equal(a, b)


def test_put_assigns_versions_and_latest(tmp_path, weights):
    store = AdapterStore(tmp_path / "store")
    assert store.put("sql", weights) == "v1"
    assert store.put("sql", weights) == "v2"
    assert store.put("sql", weights, version="canary") == "canary"
    assert store.versions("sql") == ["v1", "v2", "canary"]
    assert store.latest("sql") == "canary"
    assert store.put("sql", weights) == "v3"
    assert store.latest("sql") == "v3"
    assert store.path("sql") == tmp_path / "store" / "sql" / "v3"
    _same(read_adapter(store.path("sql", "v1")), weights)
    assert store.list_adapters() == ["sql"]


def test_put_copies_a_peft_folder_unchanged(tmp_path, weights):
    source = save_adapter(tmp_path / "adapter", weights)
    store = AdapterStore(tmp_path / "store")
    version = store.put("chat", source)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (store.path("chat", version) / name).read_bytes() == (source / name).read_bytes()


def test_versions_are_immutable(tmp_path, weights):
    store = AdapterStore(tmp_path / "store")
    store.put("sql", weights, version="v1")
    with pytest.raises(VersionExistsError, match="immutable"):
        store.put("sql", weights, version="v1")


def test_broken_folder_is_refused_before_it_becomes_a_version(tmp_path, weights):
    source = save_adapter(tmp_path / "adapter", weights)
    (source / "adapter_model.safetensors").write_bytes(b"garbage")
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(CorruptAdapterFileError):
        store.put("sql", source)
    assert store.versions("sql") == [] and store.list_adapters() == []
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_bad_names_and_missing_versions(tmp_path, weights):
    store = AdapterStore(tmp_path / "store")
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(StoreError, match="not allowed"):
            store.put(bad, weights)
    with pytest.raises(AdapterNotFoundError, match="put it first"):
        store.path("nothing")
    store.put("sql", weights)
    with pytest.raises(AdapterNotFoundError, match="versions: v1"):
        store.path("sql", "v9")


def test_writer_failing_midway_leaves_no_version(tmp_path, weights, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    store.put("sql", weights)

    def fail_after_config(*args, **kwargs):
        raise OSError("disk full")

    # The config file is written first; the tensors' write then fails.
    monkeypatch.setattr(adapters.peft_io, "save_file", fail_after_config)
    with pytest.raises(OSError, match="disk full"):
        store.put("sql", weights)
    assert store.versions("sql") == ["v1"] and store.latest("sql") == "v1"
    assert [p for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_killed_writer_leaves_no_version_and_its_temp_folder_is_cleaned(tmp_path, weights):
    root = tmp_path / "store"
    save_adapter(tmp_path / "adapter", weights)
    # The child writes the config, signals, then hangs before the tensors: SIGKILL lands mid-write.
    child = textwrap.dedent(
        f"""
        import sys, time
        import adapters.peft_io as io
        from adapters.store import AdapterStore
        def hang(*args, **kwargs):
            print("writing", flush=True)
            time.sleep(60)
        io.save_file = hang
        AdapterStore({str(root)!r}).put("sql", io.read_adapter({str(tmp_path / "adapter")!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    store = AdapterStore(root)
    assert store.versions("sql") == [] and store.list_adapters() == []
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_config.json").is_file()
    assert store.clean() == leftovers
    assert [p for p in root.iterdir() if p.name.startswith(".")] == []
    assert store.put("sql", weights) == "v1"  # the store works on


def test_clean_keeps_temp_folders_of_live_writers(tmp_path):
    store = AdapterStore(tmp_path / "store")
    live = store.root / f".tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    assert store.clean() == [] and live.is_dir()


def test_a_latest_pointer_leading_out_of_the_store_is_ignored(tmp_path, weights):
    store = AdapterStore(tmp_path / "store")
    store.put("sql", weights)
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "sql" / "LATEST").write_text("../../outside")
    assert store.latest("sql") == "v1"
    assert store.path("sql") == tmp_path / "store" / "sql" / "v1"
