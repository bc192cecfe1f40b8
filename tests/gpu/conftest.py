"""The CUDA suite: the CPU suite's oracles on a GPU. Every test here is marked `gpu` and skipped
on a machine without CUDA; bench/gpu_check.sh runs them with `pytest -m gpu`."""

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
for folder in ("server", "training", "adapters"):  # the CPU suite's fixtures, reused as they are
    sys.path.insert(0, str(TESTS / folder))


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if Path(str(item.fspath)).resolve().parent == Path(__file__).resolve().parent:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 oracles compare at 1e-4/1e-5: TF32 matmuls (10-bit mantissa) would not hold them."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
