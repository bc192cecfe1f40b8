"""The engine on a bf16 model (CPU): the KV cache, slots and CPU tier follow the model's dtype,
and a continuously batched mixed-adapter run equals each request generated alone in bf16."""

import torch

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import reference_completion, save_random_adapter, save_tiny_model_with_tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest


def _prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 37 + i * 11) % 120 for i in range(length)]


def test_bf16_engine_mixed_batch_matches_single_adapter_runs_in_bf16(tmp_path):
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    adapters = {name: save_random_adapter(tmp_path / name, model_dir, seed=seed) for seed, name in enumerate(["a", "b", "c"], 1)}
    model = load_model(model_dir, dtype=torch.bfloat16)
    config = EngineConfig(max_running=4, max_loras=2, max_lora_rank=8, prefill_chunk=8)
    engine = Engine(model, Tokenizer.from_folder(model_dir), config, "tiny")
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    cache = engine._pool.cache
    assert cache.keys[0].dtype == torch.bfloat16  # the KV cache follows the model, not fp32
    layer = next(iter(engine.tiers._layers.values()))
    assert layer.lora_A.dtype == torch.bfloat16
    assert all(a.dtype == torch.bfloat16 for a, _ in engine.tiers.cpu.get(engine.tiers.registry.current("a").key).tensors.values())
    engine.start()
    plan = [(None, 5), ("a", 14), ("b", 3), ("a", 7), ("c", 10), (None, 12), ("b", 9)]
    params = SamplingParams(max_tokens=10)
    try:
        handles = [engine.submit(GenerationRequest(_prompt(i, n), params, adapter=name)) for i, (name, n) in enumerate(plan)]
        results = [handle.result(timeout=120) for handle in handles]
    finally:
        engine.shutdown()
    for index, ((name, length), result) in enumerate(zip(plan, results)):
        expected = reference_completion(model_dir, adapters.get(name), _prompt(index, length), params, dtype=torch.bfloat16)
        assert result.token_ids == expected, f"request {index} on {name or 'base'}"
    assert results[1].token_ids != reference_completion(model_dir, None, _prompt(1, 14), params, dtype=torch.bfloat16)
