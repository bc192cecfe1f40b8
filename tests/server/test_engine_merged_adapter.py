"""The engine with single-adapter batches merged into a copy of the weights (adapters/merged_slot.py):
every request still equals the same request generated alone with its adapter in a slot. The
tiny model and adapters "a" and "b" come from tests/server/conftest.py."""

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import prompt_tokens, reference_completion
from server.engine import Engine, EngineConfig, GenerationRequest


def _run(engine: Engine, plan: list[tuple[str | None, int]], params: SamplingParams) -> list:
    handles = [engine.submit(GenerationRequest(prompt_tokens(seed, length), params, adapter=adapter))
               for seed, (adapter, length) in enumerate(plan)]  # fmt: skip
    return [handle.result(timeout=60) for handle in handles]


def test_merged_runs_and_the_runs_after_them_equal_single_adapter_references(model_dir, adapter_dirs):
    # One slot: "b" can only come in by replacing "a" in the very slot whose merge is in the weights'
    # copies, so a stale merge would serve "b"'s requests with "a".
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir),
                    EngineConfig(max_running=4, max_loras=1, max_lora_rank=8, prefill_chunk=8), "tiny")  # fmt: skip
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    engine.start()
    params = SamplingParams(max_tokens=16)
    phases = [
        [("a", 9), ("a", 3), ("a", 14), ("a", 6)],  # merged after a few batches
        [("b", 5), ("b", 11), ("b", 4)],  # the same slot, another adapter: merged again
        [("b", 7), (None, 6), ("b", 2)],  # rows on the base beside it: unmerged
    ]
    try:
        results, merged_batches = [], []
        for plan in phases:
            results.append(_run(engine, plan, params))
            merged_batches.append(engine.stats().merged_adapter.batches)
        nbytes = engine.stats().merged_adapter.nbytes
    finally:
        engine.shutdown()
    for plan, phase in zip(phases, results):
        for seed, ((adapter, length), result) in enumerate(zip(plan, phase)):
            expected = reference_completion(model_dir, adapter_dirs.get(adapter), prompt_tokens(seed, length), params)
            assert result.token_ids == expected, f"request {seed} on {adapter or 'base'}"
    assert 0 < merged_batches[0] < merged_batches[1]  # both adapters' phases ran merged
    model = load_model(model_dir)
    assert nbytes == sum(m.weight.numel() * m.weight.element_size() for m in model.linear_modules().values())
    # The adapters change the output, so the comparison is not vacuous.
    assert reference_completion(model_dir, None, prompt_tokens(0, 9), params) != results[0][0].token_ids


def test_merging_off_keeps_the_weights_alone(model_dir, adapter_dirs):
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir),
                    EngineConfig(max_running=4, max_loras=1, max_lora_rank=8, merge_single_adapter=False), "tiny")  # fmt: skip
    engine.register_adapter("a", adapter_dirs["a"])
    engine.start()
    try:
        results = _run(engine, [("a", 9), ("a", 3)], SamplingParams(max_tokens=12))
        assert engine.stats().merged_adapter is None
    finally:
        engine.shutdown()
    for seed, (length, result) in enumerate(zip((9, 3), results)):
        assert result.token_ids == reference_completion(model_dir, adapter_dirs["a"], prompt_tokens(seed, length), SamplingParams(max_tokens=12))
