"""`loraplex train --nproc N`: the same command re-run under torchrun (torch.distributed.run) with N
processes on this machine, so a user need not spell out torchrun. The processes then join one job
as under a hand-typed `torchrun --nproc_per_node N $(which loraplex) train CONFIG`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from training.distributed import DistributedError


def under_torchrun() -> bool:
    """Whether this process is one of a torchrun job's workers."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise DistributedError(f"--nproc must be a positive number of processes, got {nproc}; e.g. --nproc 2")
    if nproc > 1 and under_torchrun():
        raise DistributedError("--nproc is for a plain `loraplex train`; under torchrun set --nproc_per_node instead")


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that runs `args`' train command on `args.nproc` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "server.cli"]
    if getattr(args, "verbose", False):
        command.append("--verbose")
    command += ["train", str(args.config)]
    if args.resume is True:
        command.append("--resume")
    elif args.resume:
        command += ["--resume", str(args.resume)]
    for flag in ("device", "dtype"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def launch(args: argparse.Namespace, device: torch.device) -> int:
    """Run the job under torchrun and return its exit status. Each CPU process gets an equal
    share of the cores (torchrun would otherwise leave every process one thread)."""
    if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
        raise DistributedError(
            f"--nproc {args.nproc} needs {args.nproc} GPUs (one per process), this machine has {torch.cuda.device_count()}; "
            "lower --nproc"
        )
    env = dict(os.environ)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    return subprocess.run(torchrun_command(args), env=env).returncode


def rank_device(device: torch.device) -> torch.device:
    """The device of this worker: under torchrun on CUDA, the GPU of its local rank (NCCL needs
    one GPU per process); otherwise `device` itself."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local
