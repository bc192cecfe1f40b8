"""kill -9 at random points of an adapter-store publish and of a training checkpoint save: what a
reader finds afterwards is the previous version or a whole new one, never a partial one.

The writers are children forked by tests/server/crash_writers.py, each killed after a random
delay while it writes version after version; every version's content is known, so each one
read back is compared tensor for tensor with what was written."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapters.peft_io import read_adapter
from adapters.store import AdapterStore
from crash_writers import ADAPTER, CHECKPOINT_KEEP, VARIANTS, checkpoint_state, store_weights
from training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
TRIALS = 20
KILL_WINDOW_S = 0.5  # a kill lands anywhere from before the first write to a few writes in


class Writers:
    """The forking writer process (crash_writers.py) and the commands the tests send it."""

    def __init__(self) -> None:
        path = os.pathsep.join([str(REPO), str(REPO / "tests" / "server"), os.environ.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "server" / "crash_writers.py")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._answer() == "ready"

    def _answer(self) -> str:
        line = self.process.stdout.readline().strip()
        assert line, "the writer process exited; see its stderr above"
        return line

    def _send(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def start(self, kind: str, folder: Path) -> int:
        return int(self._send(f"{kind} {folder}"))

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        status = int(self._send(f"reap {pid}"))
        # Killed by our signal, not ended by an error of its own (which would make the test vacuous).
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def writers():
    process = Writers()
    try:
        yield process
    finally:
        process.close()


def _same_adapter(read, written) -> None:
    assert read.tensors.keys() == written.tensors.keys()
    for name, (a, b) in written.tensors.items():
        assert torch.equal(read.tensors[name][0], a) and torch.equal(read.tensors[name][1], b), name


def _hidden_entries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*")]


def test_kill_9_during_store_publish_leaves_the_previous_version_and_no_partial_one(tmp_path, writers):
    variants = {number: store_weights(number) for number in range(VARIANTS)}
    rng = random.Random(14)
    published_per_trial = []
    for trial in range(TRIALS):
        root = tmp_path / f"store-{trial}"
        store = AdapterStore(root)
        store.put(ADAPTER, variants[1], version="v1")  # the previous version
        pid = writers.start("store", root)
        time.sleep(rng.uniform(0, KILL_WINDOW_S))
        writers.kill(pid)

        versions = store.versions(ADAPTER)
        numbers = [int(version[1:]) for version in versions]
        assert numbers == list(range(1, len(numbers) + 1)), versions  # no gap, nothing half-named
        for version, number in zip(versions, numbers):
            _same_adapter(read_adapter(store.path(ADAPTER, version)), variants[number % VARIANTS])
        # Killed between a version's rename and the LATEST pointer's update, LATEST still names the
        # one before: whole either way.
        assert store.latest(ADAPTER) in versions[-2:]
        read_adapter(store.path(ADAPTER))
        store.clean()  # the killed writer's staging folder and pointer file
        assert _hidden_entries(root) == []
        assert store.put(ADAPTER, variants[0]) == f"v{numbers[-1] + 1}"  # the store works on
        published_per_trial.append(len(numbers) - 1)
    print(f"versions published before the kill, per trial: {published_per_trial}")


def test_kill_9_during_checkpoint_save_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, writers):
    variants = {number: checkpoint_state(number) for number in range(VARIANTS)}
    rng = random.Random(15)
    saved_per_trial, left_per_trial = [], []
    for trial in range(TRIALS):
        output = tmp_path / f"run-{trial}"
        save_checkpoint(output, 0, variants[0], keep=CHECKPOINT_KEEP)  # the previous checkpoint
        pid = writers.start("checkpoint", output)
        time.sleep(rng.uniform(0, KILL_WINDOW_S))
        writers.kill(pid)

        paths = list_checkpoints(output)
        steps = [int(path.stem.split("-")[1]) for path in paths]
        # The newest steps, contiguous; one more than `keep` if the kill fell between a save and
        # the removal of the oldest.
        assert steps and steps == list(range(steps[0], steps[-1] + 1)) and len(steps) <= CHECKPOINT_KEEP + 1, steps
        for path, step in zip(paths, steps):
            state = torch.load(path, map_location="cpu", weights_only=True)
            expected = variants[step % VARIANTS]
            assert state["variant"] == expected["variant"] and torch.equal(state["params"], expected["params"]), path
        assert load_checkpoint(output)["variant"] == steps[-1] % VARIANTS  # what --resume reads
        # At most the killed save's own temporary file is left, hidden from the listing.
        leftovers = _hidden_entries(output)
        assert len(leftovers) <= 1
        left_per_trial.append(len(leftovers))
        assert save_checkpoint(output, steps[-1] + 1, variants[1], keep=CHECKPOINT_KEEP).is_file()
        assert _hidden_entries(output) == []  # the next save removed it
        saved_per_trial.append(steps[-1])
    print(f"checkpoints saved before the kill, per trial: {saved_per_trial}; staging files left: {left_per_trial}")
