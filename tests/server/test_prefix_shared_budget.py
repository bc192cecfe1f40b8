"""The prefix cache and the running rows share one budget: blocks are kept in the memory of the
cache rows that computed them and move out (to a row that holds them, into the prefix budget, or
away) when the pool hands that row to a new request. A random workload of rows that start, end and
are reused checks, after every step, that every kept block still holds its own keys and values,
that no block is kept in a row a request writes to, that blocks in use are never evicted, and that
the blocks with memory of their own stay within the budget."""

import random

import torch

from backbone.config import ModelConfig
from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import prompt_tokens, reference_completion
from router.adapter_registry import AdapterInfo
from server.batch_state import CachePool, Row
from server.engine import Engine, EngineConfig, GenerationRequest
from server.prefix_cache import chain_keys
from server.prefix_kv import InRow, PrefixCache
from tiny_models import TINY_LLAMA

BLOCK = 4
ROWS = 4
POSITIONS = 6 * BLOCK


def _fill(key: bytes) -> float:
    """The value a block's keys hold (its values hold the negative): one per block key."""
    return float(int.from_bytes(key[:3], "little") + 1)


def _row(prompt: list[int], cache_row: int, adapter: AdapterInfo | None) -> Row:
    request = GenerationRequest(prompt, SamplingParams(max_tokens=1))
    return Row(request=request, handle=None, adapter=adapter, slot=-1, cache_row=cache_row, stream=None, generator=None)


def _home(payload) -> int | None:
    """The cache row a block is kept in; None: in the budget, a payload of its own."""
    return payload.cache_row if isinstance(payload, InRow) else None


def _block_kv(pool: CachePool, payload, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(payload, InRow):
        span = slice(block * BLOCK, (block + 1) * BLOCK)
        return (torch.stack([layer[payload.cache_row, :, span] for layer in pool.cache.keys]),
                torch.stack([layer[payload.cache_row, :, span] for layer in pool.cache.values]))  # fmt: skip
    return payload[0::2], payload[1::2]


def _compute(pool: CachePool, row: Row, namespace: str) -> None:
    """Stand-in for prefill and decode: the row's uncached prompt blocks get their keys' values,
    and every later position (the partial block, padding, generated tokens) is overwritten."""
    keys = chain_keys(namespace, row.prompt, BLOCK)
    for block in range(row.prefilled // BLOCK, len(keys)):
        span = slice(block * BLOCK, (block + 1) * BLOCK)
        for layer in range(len(pool.cache.keys)):
            pool.cache.keys[layer][row.cache_row, :, span] = _fill(keys[block])
            pool.cache.values[layer][row.cache_row, :, span] = -_fill(keys[block])
    for layer in range(len(pool.cache.keys)):
        pool.cache.keys[layer][row.cache_row, :, len(keys) * BLOCK :] = float("nan")
        pool.cache.values[layer][row.cache_row, :, len(keys) * BLOCK :] = float("nan")
    row.prefilled = len(row.prompt)


def test_random_workload_keeps_blocks_intact_in_use_and_within_one_budget():
    rng = random.Random(0)
    config = ModelConfig.from_hf_dict({**TINY_LLAMA, "architectures": ["LlamaForCausalLM"]})
    pool = CachePool(config, rows=ROWS, max_positions=POSITIONS, initial_positions=POSITIONS)
    budget_blocks = 5
    cache = PrefixCache(pool, BLOCK, budget_bytes=budget_blocks * _block_bytes(config, BLOCK))
    adapters = {"a@1": AdapterInfo("a", 1, "unused", 4, ("q_proj",), None), "": None}
    running: list[Row] = []
    depth: dict[bytes, int] = {}  # block key -> its index in the chain (its positions in a row)
    moves = {"hit in place": 0, "hit in a row": 0, "hit in the budget": 0, "rehomed": 0, "spilled": 0, "evicted": 0}
    for _ in range(1500):
        if running and (rng.random() < 0.45 or len(running) == ROWS):
            row = running.pop(rng.randrange(len(running)))
            cache.release(row)
            pool.give_back(row.cache_row)
        elif rng.random() < 0.03:
            cache.drop_version("a@1")  # a version released (a running row keeps what it holds)
        else:
            namespace = rng.choice(list(adapters))
            prompt = [rng.randrange(2) for _ in range(rng.randrange(1, 5) * BLOCK + rng.randrange(1, BLOCK + 1))]
            cache_row = pool.take()
            row = _row(prompt, cache_row, adapters[namespace])
            kept_here = [key for key, block in cache.index._blocks.items() if _home(block.payload) == cache_row]
            cache.reclaim(row)
            for key in kept_here:
                home = _home(cache.index.payloads([key])[0]) if key in cache.index else "evicted"
                if home != cache_row:
                    moves["evicted" if home == "evicted" else "spilled" if home is None else "rehomed"] += 1
            usable = chain_keys(namespace, prompt, BLOCK, (len(prompt) - 1) // BLOCK)
            homes = cache.index.payloads(usable[: cache.index.match(usable)])
            if not cache.attach(row):
                cache.release(row)
                pool.give_back(cache_row)
                continue
            for home in map(_home, homes):
                moves["hit in the budget" if home is None else "hit in place" if home == cache_row else "hit in a row"] += 1
            # The copied prefix holds exactly its blocks' keys and values.
            for block, key in enumerate(row.prefix_keys):
                span = slice(block * BLOCK, (block + 1) * BLOCK)
                assert all(bool((layer[cache_row, :, span] == _fill(key)).all()) for layer in pool.cache.keys)
                assert all(bool((layer[cache_row, :, span] == -_fill(key)).all()) for layer in pool.cache.values)
            _compute(pool, row, namespace)
            depth.update((key, block) for block, key in enumerate(chain_keys(namespace, prompt, BLOCK)))
            cache.store(row)
            running.append(row)

        holders: dict[bytes, set[int]] = {}
        for row in running:
            for key in row.prefix_keys:
                holders.setdefault(key, set()).add(row.cache_row)
        busy = {row.cache_row for row in running}
        in_rows = 0
        for key, block in cache.index._blocks.items():
            keys, values = _block_kv(pool, block.payload, depth[key])
            assert bool((keys == _fill(key)).all()) and bool((values == -_fill(key)).all())
            if isinstance(block.payload, InRow):
                in_rows += 1
                # Kept in an idle row, or in a running row whose own prompt it is.
                assert block.payload.cache_row not in busy or block.payload.cache_row in holders.get(key, set())
            assert block.refs == len(holders.get(key, ()))
        assert all(key in cache.index for key in holders)  # blocks in use are never evicted
        assert cache.index.nbytes <= budget_blocks * cache.block_bytes
        assert cache.stats().row_blocks == in_rows
    assert all(count > 0 for count in moves.values()), moves
    assert cache.stats().dropped_blocks > 0


def test_idle_rows_serve_as_prefix_cache_and_the_budget_keeps_what_a_reused_row_pushes_out(model_dir, adapter_dirs):
    """Blocks live in cache rows; a row handed to a new request pushes its blocks into the budget
    (here none, or room for three blocks). Generations are those of cold prefills either way."""
    block = 8
    system = {name: prompt_tokens(seed, 3 * block + 2) for seed, name in ((5, "a"), (6, "b"), (7, None))}
    waves = [[(system[name] + prompt_tokens(10 + turn, 3 + turn % 4), name) for name in ("a", "b", None)] for turn in range(3)]
    # One client at a time always gets row 0, which the first wave left holding a's blocks.
    singles = [[(system[name] + prompt_tokens(20 + turn, 4), name)] for turn, name in enumerate(["a", "a", "b", None, "a"])]
    plan = waves[:1] + singles + waves[1:]
    params = SamplingParams(max_tokens=5)
    block_bytes = _block_bytes(load_model(model_dir).config, block)
    results, stats = {}, {}
    for budget_blocks in (None, 0, 3):  # None: no prefix cache
        config = EngineConfig(max_running=3, max_loras=2, max_lora_rank=8, prefill_chunk=64, prefix_block_tokens=block,
                              prefix_cache=budget_blocks is not None,
                              prefix_cache_mb=(budget_blocks or 0) * block_bytes / 2**20)  # fmt: skip
        engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")
        for name, path in adapter_dirs.items():
            engine.register_adapter(name, path)
        engine.start()
        results[budget_blocks] = []
        for requests in plan:
            with engine.same_versions():  # a wave is admitted together, into rows 0, 1, 2
                handles = [engine.submit(GenerationRequest(prompt, params, adapter=name)) for prompt, name in requests]
            results[budget_blocks] += [handle.result(timeout=60).token_ids for handle in handles]
        stats[budget_blocks] = engine.stats().prefix_cache
        engine.shutdown()
    assert results[0] == results[3] == results[None]
    prompts = [request for requests in plan for request in requests]
    for (prompt, name), tokens in list(zip(prompts, results[0]))[::3]:
        assert tokens == reference_completion(model_dir, adapter_dirs[name] if name else None, prompt, params)
    system_tokens = 3 * block  # every hit is a system prompt's three blocks
    # No budget: the single "b" takes row 0 and a's blocks have nowhere to go, so the next "a" misses.
    assert stats[0].hit_tokens == (len(prompts) - 3 - 1) * system_tokens and stats[0].evictions == 3
    assert stats[0].nbytes == 0 and stats[0].row_blocks == stats[0].blocks == 9
    # Room for three blocks: a's blocks move into it, and the next "a" finds them there.
    assert stats[3].hit_tokens == (len(prompts) - 3) * system_tokens and stats[3].evictions == 0
    assert stats[3].nbytes == 3 * block_bytes and stats[3].row_blocks == 6


def _block_bytes(config: ModelConfig, block: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * block * config.head_dim * 4  # fp32 K and V
