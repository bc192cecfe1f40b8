"""Data-parallel training under torchrun: 2 CPU processes (gloo) on one global batch give the
adapters 1 process gives on the same batch, with PCGrad on the shared adapter."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from server.cli import main
from training.distributed import Distributed, DistributedError
from training.report import read_log

from torchrun_helpers import gloo_available, worker_env
from training_files import toy_config, write_config


def test_ranks_share_every_row_of_the_step_once():
    plan = [[(0, 1), (1, 2), (0, 3)], [(2, 0), (1, 5)]]
    lengths = [[5] * 6, [6] * 6, [7] * 6]
    shares = [Distributed(rank, 2).share_of_step(plan, lengths, batch_tokens=64) for rank in range(2)]
    rows = sorted(row for share in shares for group in share for row in group)
    assert rows == sorted(row for group in plan for row in group)
    assert [sum(len(g) for g in share) for share in shares] == [3, 2]


def test_more_processes_than_rows_in_a_step_names_the_keys_to_raise():
    with pytest.raises(DistributedError, match=r"3 rows for 4 processes; raise batching.batch_tokens or batching.accumulation"):
        Distributed(rank=1, world_size=4).share_of_step([[(0, 0), (0, 1), (1, 0)]], [[4, 4], [4]], batch_tokens=64)


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_equal_one_process_on_the_same_global_batch(toy_model_dir, tmp_path):
    overrides = {"max_steps": 3, "eval": {"every": 0}, "checkpoint": {"every": 0}}
    single = toy_config(tmp_path, toy_model_dir, "single", **overrides)
    assert single["surgery"]["method"] == "pcgrad" and "shared" in single
    assert main(["train", str(write_config(tmp_path / "single.json", single))]) == 0
    double = {**single, "output_dir": str(tmp_path / "double")}
    env = worker_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "server.cli", "train", str(write_config(tmp_path / "double.json", double))]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(finished.stdout[finished.stdout.index("{"):])["steps"] == 3  # rank 0 alone prints the summary

    one, two = read_log(tmp_path / "single" / "log.jsonl"), read_log(tmp_path / "double" / "log.jsonl")
    assert one[0]["world_size"] == 1 and two[0]["world_size"] == 2
    one_steps, two_steps = [r for r in one if r["kind"] == "train"], [r for r in two if r["kind"] == "train"]
    assert len(two_steps) == 3  # one log, written once (by rank 0)
    for a, b in zip(one_steps, two_steps):
        assert a["tokens"] == b["tokens"] and a["task_tokens"] == b["task_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for name in ("add", "copy", "chat", "shared"):
        expected = load_file(tmp_path / "single" / "last" / name / "adapter_model.safetensors")
        actual = load_file(tmp_path / "double" / "last" / name / "adapter_model.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)
