"""Device and dtype choice for every command (DESIGN decision 8).

`auto` means CUDA + bfloat16 where there is a GPU. On a CPU it means bfloat16 only when the CPU
computes bf16 natively (AMX or AVX-512-BF16), where a bf16 matmul is 2-7x faster than fp32, and
float32 otherwise, where bf16 would be emulated and slower. The chosen pair carries the reason so
the log can say why.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")

DEVICE_HELP = "auto | cpu | cuda | cuda:N (default auto: the GPU if CUDA is available, else the CPU)"
DTYPE_HELP = (
    "auto | float32 | bfloat16 | float16 (default auto: bfloat16 on a GPU, and on a CPU with native bf16 "
    "(AMX or AVX-512-BF16); float32 elsewhere)"
)


class PrecisionError(ValueError):
    """A --device or --dtype value that cannot be used on this machine."""


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype
    reason: str  # why this pair, for the log

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def add_precision_args(parser: argparse.ArgumentParser, config_keys: bool = False) -> None:
    """--device and --dtype. With `config_keys`, the defaults are None so a config file can set them."""
    default = None if config_keys else "auto"
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument("--dtype", default=default, metavar="DTYPE", help=DTYPE_HELP)


def cpu_has_native_bf16() -> bool:
    """True when this CPU has AMX or AVX-512-BF16 (bf16 matmuls in hardware)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).lower()
    if "amx" in capability:
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(device: str | None = "auto", dtype: str | None = "auto") -> Precision:
    """Turn the flags' values into a device and dtype, or a PrecisionError naming the flag and the fix."""
    device = (device or "auto").strip().lower()
    dtype = (dtype or "auto").strip().lower()
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype != "auto" and dtype not in DTYPES:
        raise PrecisionError(f"--dtype {dtype!r} is not a dtype we serve; use auto, float32, bfloat16 or float16")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not _CUDA_DEVICE.fullmatch(device):
        raise PrecisionError(f"--device {device!r} is not a device we run on; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrecisionError(
                f"--device {device} but this machine has no usable CUDA (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or install a CUDA build of torch"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise PrecisionError(
                f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) exist; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    torch_device = torch.device(device)
    if dtype != "auto":
        return Precision(torch_device, DTYPES[dtype], f"--dtype {dtype}")
    if torch_device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch_device, torch.bfloat16, "auto: CUDA with bf16 support")
        return Precision(torch_device, torch.float16, "auto: CUDA without bf16 support, so float16")
    if cpu_has_native_bf16():
        return Precision(torch_device, torch.bfloat16, "auto: this CPU has native bf16 (AMX or AVX-512-BF16)")
    return Precision(torch_device, torch.float32, "auto: this CPU lacks native bf16 (no AMX or AVX-512-BF16), so float32")
