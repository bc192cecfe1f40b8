"""The prefix cache against cold prefills: reused KV blocks give the logits and the generations of
computing the whole prompt, per adapter version."""

import torch

from adapters.injection import inject_lora
from adapters.peft_io import load_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import prompt_tokens, reference_completion
from router.adapter_registry import AdapterInfo
from server.batch_state import CachePool, Row
from server.engine import Engine, EngineConfig, GenerationRequest
from server.prefix_cache import chain_keys
from server.prefix_kv import PrefixCache

BLOCK = 8


def _adapter(name: str, version: int) -> AdapterInfo:
    return AdapterInfo(name, version, "unused", 4, ("q_proj",), None)


def _row(prompt: list[int], cache_row: int, adapter: AdapterInfo | None, slot: int) -> Row:
    request = GenerationRequest(prompt, SamplingParams(max_tokens=1))
    return Row(request=request, handle=None, adapter=adapter, slot=slot, cache_row=cache_row, stream=None, generator=None)


def _prefill_rest(model, pool: CachePool, row: Row) -> torch.Tensor:
    """Logits (T, V) of the prompt positions the row has not prefilled yet, as the runner does."""
    start = row.prefilled
    pool.ensure_positions(len(row.prompt))
    logits = model(
        torch.tensor([row.prompt[start:]]),
        positions=torch.arange(start, len(row.prompt))[None],
        cache=pool.cache,
        cache_rows=torch.tensor([row.cache_row]),
        routing=AdapterRouting.single(row.slot, 1) if row.slot >= 0 else None,
    )[0]
    row.prefilled = len(row.prompt)
    return logits


def test_prefix_hit_gives_the_logits_of_a_cold_prefill(model_dir, adapter_dirs):
    model = load_model(model_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=2, max_rank=8)
    write_to_slot(layers, 0, load_adapter(adapter_dirs["a"], model.config))
    write_to_slot(layers, 1, load_adapter(adapter_dirs["b"], model.config))
    a, b = _adapter("a", 1), _adapter("b", 1)
    shared = prompt_tokens(1, 3 * BLOCK + 5)
    first, second = shared + prompt_tokens(2, 6), shared + prompt_tokens(3, 9)
    pool = CachePool(model.config, rows=3, max_positions=128)
    cache = PrefixCache(pool, BLOCK, budget_bytes=1 << 24)
    with torch.inference_mode():
        writer = _row(first, 0, a, 0)
        cache.attach(writer)
        assert writer.prefilled == 0
        _prefill_rest(model, pool, writer)
        cache.store(writer)

        reader = _row(second, 1, a, 0)
        cache.attach(reader)
        assert reader.prefilled == 3 * BLOCK  # the shared whole blocks, not the partial one
        warm = _prefill_rest(model, pool, reader)

        cold_pool = CachePool(model.config, rows=1, max_positions=128)
        cold = _prefill_rest(model, cold_pool, _row(second, 0, a, 0))[3 * BLOCK :]
        torch.testing.assert_close(warm, cold, rtol=0, atol=1e-5)

        other = _row(second, 2, b, 1)  # same tokens, another adapter: its KV differs, no reuse
        cache.attach(other)
        assert other.prefilled == 0
    assert cache.stats().hit_tokens == 3 * BLOCK


def test_a_prompt_of_whole_blocks_still_computes_its_last_token(model_dir):
    model = load_model(model_dir)
    pool = CachePool(model.config, rows=2, max_positions=64)
    cache = PrefixCache(pool, BLOCK, budget_bytes=1 << 24)
    prompt = prompt_tokens(4, 2 * BLOCK)
    with torch.inference_mode():
        writer = _row(prompt, 0, None, -1)
        cache.attach(writer)
        _prefill_rest(model, pool, writer)
        cache.store(writer)
        reader = _row(prompt, 1, None, -1)
        cache.attach(reader)
    assert reader.prefilled == BLOCK  # the last block holds the token whose logits are needed
    cache.release(writer)
    cache.release(reader)
    assert all(cache.index.refs(key) == 0 for key in chain_keys("", prompt, BLOCK))


def test_a_row_waits_for_the_prefix_another_row_is_computing(model_dir):
    model = load_model(model_dir)
    pool = CachePool(model.config, rows=3, max_positions=64)
    cache = PrefixCache(pool, BLOCK, budget_bytes=1 << 24)
    shared = prompt_tokens(5, 2 * BLOCK)
    writer, reader = _row(shared + prompt_tokens(6, 3), 0, None, -1), _row(shared + prompt_tokens(7, 4), 1, None, -1)
    stranger = _row(prompt_tokens(8, 2 * BLOCK + 3), 2, None, -1)
    with torch.inference_mode():
        assert cache.attach(writer)
        assert not cache.attach(reader)  # its first block is being computed by the writer
        assert reader.prefix_keys is None and reader.prefilled == 0
        assert cache.attach(stranger)  # another prefix: nothing to wait for
        _prefill_rest(model, pool, writer)
        cache.store(writer)
        assert cache.attach(reader) and reader.prefilled == 2 * BLOCK


def test_a_row_that_ends_before_storing_lets_waiting_rows_go(model_dir):
    pool = CachePool(load_model(model_dir).config, rows=2, max_positions=64)
    cache = PrefixCache(pool, BLOCK, budget_bytes=1 << 24)
    prompt = prompt_tokens(9, 2 * BLOCK + 1)
    first, second = _row(prompt, 0, None, -1), _row(prompt, 1, None, -1)
    assert cache.attach(first) and not cache.attach(second)
    cache.release(first)  # cancelled mid-prefill
    assert cache.attach(second) and second.prefilled == 0


def _engine(model_dir, **overrides) -> Engine:
    config = EngineConfig(**{"max_running": 3, "max_loras": 2, "max_lora_rank": 8, "prefill_chunk": 16,
                             "prefix_block_tokens": BLOCK, **overrides})
    return Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")


def _run(engine: Engine, prompts_and_adapters, max_tokens: int = 5) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens)
    handles = [engine.submit(GenerationRequest(p, params, adapter=a)) for p, a in prompts_and_adapters]
    return [handle.result(timeout=60).token_ids for handle in handles]


def test_engine_with_prefix_cache_generates_what_cold_prefills_generate(model_dir, adapter_dirs):
    system = {name: prompt_tokens(seed, 3 * BLOCK + 2) for seed, name in ((5, "a"), (6, "b"), (7, None))}
    plan = [(system[name] + prompt_tokens(10 + turn, 3 + turn % 4), name) for turn in range(9) for name in ("a", "b", None)]
    results = {}
    for enabled in (True, False):
        engine = _engine(model_dir, prefix_cache=enabled)
        for name, path in adapter_dirs.items():
            engine.register_adapter(name, path)
        engine.start()
        results[enabled] = _run(engine, plan[:3]) + _run(engine, plan[3:])  # the first wave fills the cache
        stats = engine.stats().prefix_cache
        engine.shutdown()
        if enabled:
            assert stats.hit_tokens >= 6 * 3 * BLOCK  # every request after the first wave reuses its system prompt
            assert stats.hit_tokens + stats.miss_tokens == sum(len(p) for p, _ in plan)
        else:
            assert stats is None
    assert results[True] == results[False]
    for (prompt, name), tokens in list(zip(plan, results[True]))[::4]:
        assert tokens == reference_completion(model_dir, adapter_dirs[name] if name else None, prompt, SamplingParams(max_tokens=5))


def test_hot_swapped_version_never_reuses_the_old_versions_blocks(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("x", adapter_dirs["a"])
    engine.start()
    prompt = prompt_tokens(8, 4 * BLOCK + 3)
    params = SamplingParams(max_tokens=5)
    _run(engine, [(prompt, "x")])
    assert engine.stats().prefix_cache.hit_tokens == 0
    engine.register_adapter("x", adapter_dirs["b"])  # version 2: other weights, other KV
    swapped = _run(engine, [(prompt, "x")])[0]
    assert engine.stats().prefix_cache.hit_tokens == 0
    again = _run(engine, [(prompt, "x")])[0]  # now version 2's own blocks are reused
    assert engine.stats().prefix_cache.hit_tokens == 4 * BLOCK
    engine.shutdown()
    expected = reference_completion(model_dir, adapter_dirs["b"], prompt, params)
    assert swapped == again == expected


def test_cache_stays_under_its_budget_under_a_random_workload(model_dir, adapter_dirs):
    generator = torch.Generator().manual_seed(0)
    config = load_model(model_dir).config
    block_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK * config.head_dim * 4  # fp32 K and V
    budget_blocks = 12
    engine = _engine(model_dir, prefix_cache_mb=budget_blocks * block_bytes / 2**20)
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    engine.start()
    systems = [prompt_tokens(seed, 2 * BLOCK) for seed in range(6)]
    for _ in range(8):
        plan = []
        for _ in range(3):
            system = systems[int(torch.randint(len(systems), (1,), generator=generator))]
            adapter = [None, "a", "b"][int(torch.randint(3, (1,), generator=generator))]
            plan.append((system + prompt_tokens(int(torch.randint(1000, (1,), generator=generator)), 5 + BLOCK), adapter))
        _run(engine, plan, max_tokens=2)
        stats = engine.stats().prefix_cache
        assert stats.nbytes <= budget_blocks * block_bytes
    engine.shutdown()
    assert stats.evictions > 0 and stats.hit_tokens > 0
