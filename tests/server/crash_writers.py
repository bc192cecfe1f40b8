"""A writer process for the kill -9 tests: it forks children that write adapter-store versions or
training checkpoints in a loop, until the test kills them with SIGKILL.

Forking from this small single-threaded process (torch already imported) makes a trial cost a
fork, not an interpreter start, so twenty trials fit in seconds. Commands on stdin, one a line:
  store ROOT        fork a child that puts versions v2, v3, ... of adapter "sql" into ROOT
  checkpoint DIR    fork a child that saves checkpoints step 1, 2, ... into DIR (keep 2)
  reap PID          wait for a killed child, answer its wait status
Each answer is one line on stdout.

The content of version or step N is variant N % VARIANTS (`store_weights`, `checkpoint_state`),
so the test can check that what it reads back is exactly what was written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from adapters.config import LoraConfig
from adapters.store import AdapterStore
from adapters.weights import AdapterWeights
from training.checkpoint import save_checkpoint

ADAPTER = "sql"
CHECKPOINT_KEEP = 2
VARIANTS = 4  # version/step N holds variant N % VARIANTS: neighbours always differ
_MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qkvo"]


def store_weights(variant: int) -> AdapterWeights:
    """A few MB of tensors, so a write takes long enough to be killed inside."""
    generator = torch.Generator().manual_seed(variant)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    tensors = {name: (torch.randn(16, 1024, generator=generator), torch.randn(1024, 16, generator=generator)) for name in _MODULES}
    return AdapterWeights(config, tensors)


def checkpoint_state(variant: int) -> dict:
    generator = torch.Generator().manual_seed(10_000 + variant)
    return {"variant": variant, "params": torch.randn(1024, 1024, generator=generator)}


def _write_store_versions(root: Path, versions: dict[int, AdapterWeights]) -> None:
    store = AdapterStore(root)
    version = 2
    while True:
        store.put(ADAPTER, versions[version % VARIANTS], version=f"v{version}")
        version += 1


def _write_checkpoints(folder: Path, states: dict[int, dict]) -> None:
    step = 1
    while True:
        save_checkpoint(folder, step, states[step % VARIANTS], keep=CHECKPOINT_KEEP)
        step += 1


def main() -> None:
    torch.set_num_threads(1)  # no thread pool in the parent of forked children
    # Made before any fork: the children only serialise tensors, never compute.
    versions = {number: store_weights(number) for number in range(VARIANTS)}
    states = {number: checkpoint_state(number) for number in range(VARIANTS)}
    print("ready", flush=True)
    for line in sys.stdin:
        command, argument = line.split(maxsplit=1)
        argument = argument.strip()
        if command == "reap":
            _, status = os.waitpid(int(argument), 0)
            print(status, flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                writer = _write_store_versions if command == "store" else _write_checkpoints
                writer(Path(argument), versions if command == "store" else states)
            finally:
                os._exit(1)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
