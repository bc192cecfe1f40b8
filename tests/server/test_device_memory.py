"""The serving memory budget: what the engine allocates is counted exactly, and a configuration
that does not fit fails at start with the numbers and the fix."""

import pytest
import torch

from backbone.loading import load_model
from backbone.tokenizer import Tokenizer
from engine_fixtures import save_tiny_model_with_tokenizer
from server.device_memory import GIB, DeviceMemoryError, check_fits, plan_memory
from server.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("memory_model"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_counts_what_the_engine_allocates(model_dir, dtype):
    model = load_model(model_dir, dtype=dtype)
    config = EngineConfig(max_running=3, max_loras=2, max_lora_rank=8, prefill_chunk=8, max_context=64)
    positions = 64 + 8
    plan = plan_memory(model, 3, positions, 2, 8, 8)
    engine = Engine(model, Tokenizer.from_folder(model_dir), config, "tiny")
    engine._pool.ensure_positions(positions)  # a CPU pool grows on demand; a GPU pool starts full
    assert plan.kv_cache_bytes == engine._pool.nbytes
    layers = engine.tiers._layers.values()
    slot_bytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.lora_A, layer.lora_B, layer.lora_scale))
    assert plan.lora_slot_bytes == slot_bytes
    assert plan.prefix_cache_bytes == 0  # the plan's default: no prefix cache
    assert plan.merged_adapter_bytes == 0  # nor a merged adapter
    # A merged adapter is a copy of every weight the LoRA layers adapt, in the model dtype.
    merged = plan_memory(model, 3, positions, 2, 8, 8, merge_single_adapter=True)
    assert merged.merged_adapter_bytes == sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    assert merged.total_bytes - plan.total_bytes == merged.merged_adapter_bytes
    assert f"merged adapter {merged.merged_adapter_bytes / GIB:.2f} GiB" in _refusal(merged)


def test_the_prefix_cache_budget_counts_in_the_plan(model_dir):
    model = load_model(model_dir)
    without = plan_memory(model, 3, 72, 2, 8, 8)
    with_cache = plan_memory(model, 3, 72, 2, 8, 8, prefix_cache_bytes=5 * 2**20)
    assert with_cache.total_bytes - without.total_bytes == 5 * 2**20
    assert "prefix cache 3.00 GiB" in _refusal(plan_memory(model, 3, 72, 2, 8, 8, prefix_cache_bytes=3 * GIB))
    config = EngineConfig(max_running=3, max_loras=2, max_lora_rank=8, prefill_chunk=8, max_context=64, prefix_cache_mb=5)
    engine = Engine(model, Tokenizer.from_folder(model_dir), config, "tiny")
    assert engine._prefix.stats().budget_bytes == with_cache.prefix_cache_bytes  # what the cache may fill


def _refusal(plan) -> str:
    with pytest.raises(DeviceMemoryError) as caught:
        check_fits(plan, "cuda:0", free_bytes=0, total_bytes=plan.total_bytes, fraction=1.0)
    return str(caught.value)


def test_a_plan_that_does_not_fit_names_the_numbers_and_the_fix(model_dir):
    plan = plan_memory(load_model(model_dir), 16, 8192, 8, 64, 256)
    total = plan.total_bytes * 2
    check_fits(plan, "cuda:0", free_bytes=total, total_bytes=total, fraction=0.9)  # fits an empty device
    with pytest.raises(DeviceMemoryError) as caught:
        check_fits(plan, "cuda:0", free_bytes=int(0.6 * total), total_bytes=total, fraction=0.9)
    message = str(caught.value)
    assert "\n" not in message
    assert f"needs {plan.total_bytes / GIB:.2f} GiB on cuda:0" in message
    assert "KV cache 16 rows x 8192 positions" in message and "LoRA slots 8 x rank 64" in message
    assert ("lower --max-running, --max-context, --max-loras, --max-lora-rank or --prefix-cache-mb, pass "
            "--no-merge-single-adapter, or raise --gpu-memory-fraction") in message


def test_memory_fraction_outside_0_1_is_refused(model_dir):
    plan = plan_memory(load_model(model_dir), 1, 16, 1, 4, 8)
    with pytest.raises(DeviceMemoryError, match=r"--gpu-memory-fraction must be in \(0, 1\], got 1.5"):
        check_fits(plan, "cuda:0", free_bytes=GIB, total_bytes=GIB, fraction=1.5)
