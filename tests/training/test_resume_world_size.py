"""A checkpoint resumes under another world size: written by 2 processes it continues in 1, and
written by 1 it continues in 2, both ending where the uninterrupted run ends. The 2-process runs
go through `loraplex train --nproc 2`, which starts torchrun itself."""

import argparse
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from server.cli import main
from training.distributed import DistributedError
from training.launch import check_nproc, torchrun_command
from training.report import read_log

from torchrun_helpers import gloo_available, worker_env
from training_files import toy_config, write_config

ADAPTERS = ("add", "copy", "chat", "shared")


def _train_nproc(config_path, *extra: str) -> None:
    command = [sys.executable, "-m", "server.cli", "train", str(config_path), "--nproc", "2", *extra]
    finished = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "rank 1 of 2 (gloo)" in finished.stderr  # two processes joined one job


def _resume_from(checkpoint, root, name: str, config: dict):
    """A fresh output folder holding only `checkpoint`, and the config that writes there."""
    (root / name / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, root / name / "checkpoints")
    return write_config(root / f"{name}.json", {**config, "output_dir": str(root / name)})


def _steps(folder) -> dict[int, dict]:
    return {r["step"]: r for r in read_log(folder / "log.jsonl") if r["kind"] == "train"}


def _assert_same_end(folder, reference, resumed_steps: list[int]) -> None:
    ours, theirs = _steps(folder), _steps(reference)
    assert sorted(ours) == resumed_steps
    for step in resumed_steps:
        assert ours[step]["tokens"] == theirs[step]["tokens"] and ours[step]["task_tokens"] == theirs[step]["task_tokens"]
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5)
    for name in ADAPTERS:
        expected = load_file(reference / "last" / name / "adapter_model.safetensors")
        actual = load_file(folder / "last" / name / "adapter_model.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_checkpoints_resume_under_another_world_size_and_end_as_the_uninterrupted_run(toy_model_dir, tmp_path):
    overrides = {"max_steps": 4, "eval": {"every": 0}, "checkpoint": {"every": 2, "keep": 5}}
    config = toy_config(tmp_path, toy_model_dir, "single", **overrides)
    assert main(["train", str(write_config(tmp_path / "single.json", config))]) == 0  # the uninterrupted reference
    single = tmp_path / "single"

    # 2 processes write the checkpoint, 1 process finishes the run.
    _train_nproc(write_config(tmp_path / "double.json", {**config, "output_dir": str(tmp_path / "double")}))
    two_then_one = _resume_from(tmp_path / "double" / "checkpoints" / "step-000002.pt", tmp_path, "two_then_one", config)
    assert main(["train", str(two_then_one), "--resume"]) == 0
    _assert_same_end(tmp_path / "two_then_one", single, [3, 4])

    # 1 process writes the checkpoint, 2 processes finish the run.
    one_then_two = _resume_from(single / "checkpoints" / "step-000002.pt", tmp_path, "one_then_two", config)
    _train_nproc(one_then_two, "--resume")
    _assert_same_end(tmp_path / "one_then_two", single, [3, 4])


def test_nproc_re_runs_the_same_command_under_torchrun():
    args = argparse.Namespace(nproc=3, config="run.yaml", resume=True, device=None, dtype="float32", verbose=False)
    command = torchrun_command(args)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    assert command[6:] == ["-m", "server.cli", "train", "run.yaml", "--resume", "--dtype", "float32"]
    args.resume = "ckpt/step-000004.pt"
    assert torchrun_command(args)[-4:] == ["--resume", "ckpt/step-000004.pt", "--dtype", "float32"]


def test_bad_nproc_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(DistributedError, match="--nproc must be a positive number of processes, got 0"):
        check_nproc(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="under torchrun set --nproc_per_node instead"):
        check_nproc(2)
    check_nproc(1)  # a torchrun worker itself runs with the default


def test_nproc_zero_from_the_command_line_names_the_flag(tmp_path, toy_model_dir, capsys):
    config = write_config(tmp_path / "c.json", toy_config(tmp_path, toy_model_dir, "out"))
    assert main(["train", str(config), "--nproc", "0"]) == 2
    assert "--nproc must be a positive number" in capsys.readouterr().err
