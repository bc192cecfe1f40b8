"""Only the engine's worker thread does parallel tensor math; every other thread stays serial.

PyTorch's OpenMP runtime (libgomp) gives each thread that starts a parallel region its own team of
workers. Once two threads own teams, there are more workers than cores and libgomp stops
spin-waiting between regions, so every small decode matmul pays a futex wake-up. Measured on 2
cores: a (16x576) @ (576x1536) matmul took 205 us while one thread used OpenMP and 310 us once a
second had; a whole decode step with four adapters went from 121 ms to 227 ms. Loading a model or
an adapter in another thread is fine, as long as that thread runs serially.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The process's parallelism before anyone changed it (torch's default: the usable cores).
DEFAULT_COMPUTE_THREADS = torch.get_num_threads()


@contextmanager
def serial_torch() -> Iterator[None]:
    """Run the block's tensor math on the calling thread alone (no OpenMP team is created)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def keep_thread_serial() -> None:
    """For helper threads (adapter loaders): never start an OpenMP team."""
    torch.set_num_threads(1)


def claim_compute(threads: int | None) -> None:
    """For the engine's worker: the one thread that runs parallel math."""
    torch.set_num_threads(threads or DEFAULT_COMPUTE_THREADS)
