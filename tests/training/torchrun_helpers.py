"""What the tests that start torchrun jobs share: whether gloo is there, and the workers' env."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def worker_env() -> dict[str, str]:
    """This checkout first on the path (workers import it, not an installed copy); one thread per
    worker, so two workers do not fight over a small machine's cores."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
