"""--device / --dtype for the benchmarks. Their default stays cpu + float32, the setting every
figure in the README was measured in; bench/gpu_check.sh passes --device cuda --dtype bfloat16."""

from __future__ import annotations

import argparse

import torch

from backbone.precision import DEVICE_HELP, DTYPE_HELP, Precision, resolve_precision


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP.replace("default auto", "here default cpu; auto"))
    parser.add_argument("--dtype", default="float32", help=DTYPE_HELP.replace("default auto", "here default float32; auto"))


def resolve(args: argparse.Namespace) -> Precision:
    return resolve_precision(args.device, args.dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stopped next measures it (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
