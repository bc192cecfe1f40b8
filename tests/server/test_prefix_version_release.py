"""A released adapter version's prefix blocks go at its release, not at LRU's pace: after a hot
swap, an unload or the last experiment pin, exactly that version's blocks are dropped, once no
request (queued or running) can use them. The engine is stepped by hand, so each check sees the
state between two worker steps."""

from prometheus_client.parser import text_string_to_metric_families

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import prompt_tokens, reference_completion
from router.experiments import experiment_from_json
from server.engine import Engine, EngineConfig, GenerationRequest, RequestHandle
from server.experiment_pins import VersionPins
from server.metrics import ServerMetrics
from server.prefix_cache import BASE_NAMESPACE

BLOCK = 8
BLOCKS_PER_PROMPT = 3
PARAMS = SamplingParams(max_tokens=4)


def _prompt(seed: int) -> list[int]:
    return prompt_tokens(seed, BLOCKS_PER_PROMPT * BLOCK + 2)


def _engine(model_dir) -> Engine:
    config = EngineConfig(max_running=3, max_loras=2, max_lora_rank=8, prefill_chunk=64, prefix_block_tokens=BLOCK)
    return Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")


def _serve(engine: Engine, requests, params: SamplingParams = PARAMS) -> list[RequestHandle]:
    """Submit and step the engine until every request has finished."""
    handles = [engine.submit(GenerationRequest(prompt, params, adapter=adapter)) for prompt, adapter in requests]
    while not all(handle.done for handle in handles):
        engine._step()
    return handles


def _blocks(engine: Engine, namespace: str) -> int:
    return engine._prefix.index.blocks_of(namespace)


def _exposed(metrics: ServerMetrics, name: str) -> float:
    text = metrics.exposition().decode()
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name)


def test_hot_swap_drops_the_old_versions_blocks_and_no_others(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    metrics = ServerMetrics(engine.stats)
    engine.register_adapter("x", adapter_dirs["a"])
    engine.register_adapter("y", adapter_dirs["b"])
    workload = [(_prompt(1), "x"), (_prompt(2), "x"), (_prompt(3), "y"), (_prompt(4), None)]
    _serve(engine, workload)
    before = engine.stats().prefix_cache
    assert _blocks(engine, "x@1") == 2 * BLOCKS_PER_PROMPT
    assert _blocks(engine, "y@1") == _blocks(engine, BASE_NAMESPACE) == BLOCKS_PER_PROMPT
    # Three rows for four requests: the fourth reused the first one's row, whose blocks moved
    # into the budget; the others are still kept in their (now idle) rows.
    budgeted = engine._prefix.index.bytes_of("x@1") // engine._prefix.block_bytes
    assert budgeted == BLOCKS_PER_PROMPT

    engine.register_adapter("x", adapter_dirs["b"])  # x@2
    engine._step()
    after = engine.stats().prefix_cache
    assert _blocks(engine, "x@1") == 0
    assert before.nbytes - after.nbytes == budgeted * engine._prefix.block_bytes
    assert before.row_blocks - after.row_blocks == 2 * BLOCKS_PER_PROMPT - budgeted
    assert after.dropped_blocks == after.blocks and after.blocks == before.blocks - 2 * BLOCKS_PER_PROMPT
    assert _blocks(engine, "y@1") == _blocks(engine, BASE_NAMESPACE) == BLOCKS_PER_PROMPT
    assert after.evictions == 0
    assert _exposed(metrics, "loraplex_prefix_cache_dropped_blocks_total") == 2 * BLOCKS_PER_PROMPT
    assert _exposed(metrics, "loraplex_prefix_cache_bytes") == after.nbytes

    # The new version fills and keeps its own chain; y and the base still hit theirs.
    swapped = _serve(engine, [(_prompt(1), "x")])[0]
    hits = engine.stats().prefix_cache.hit_tokens
    again = _serve(engine, [(_prompt(1), "x"), (_prompt(3), "y"), (_prompt(4), None)])
    assert engine.stats().prefix_cache.hit_tokens - hits == 3 * BLOCKS_PER_PROMPT * BLOCK
    assert _blocks(engine, "x@2") == BLOCKS_PER_PROMPT and engine.stats().prefix_cache.dropped_blocks == 2 * BLOCKS_PER_PROMPT
    expected = reference_completion(model_dir, adapter_dirs["b"], _prompt(1), PARAMS)
    assert swapped.result(timeout=0).token_ids == again[0].result(timeout=0).token_ids == expected
    engine.shutdown()


def test_unloading_an_adapter_drops_its_blocks(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("x", adapter_dirs["a"])
    engine.register_adapter("y", adapter_dirs["b"])
    _serve(engine, [(_prompt(1), "x"), (_prompt(1), "y")])
    engine.unregister_adapter("y")
    engine._step()
    assert _blocks(engine, "y@1") == 0 and _blocks(engine, "x@1") == BLOCKS_PER_PROMPT
    assert engine.stats().prefix_cache.dropped_blocks == BLOCKS_PER_PROMPT
    engine.shutdown()


def test_a_version_pinned_by_an_experiment_keeps_its_blocks_until_the_experiment_goes(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("x", adapter_dirs["a"])
    pins = VersionPins(engine)
    arms = {"task": "qa", "control": "old", "arms": [{"name": "old", "adapter": "x@1", "weight": 1.0},
                                                     {"name": "new", "adapter": "x", "weight": 1.0}]}
    _serve(engine, [(_prompt(1), "x")])

    early = experiment_from_json("early", arms)
    pins.hold("early", pins.pin(early))
    pins.drop("early")  # x@1 is still the current version: nothing is released
    engine._step()
    assert _blocks(engine, "x@1") == BLOCKS_PER_PROMPT

    pins.hold("ab", pins.pin(experiment_from_json("ab", arms)))
    engine.register_adapter("x", adapter_dirs["b"])
    engine._step()
    assert _blocks(engine, "x@1") == BLOCKS_PER_PROMPT  # still served, as "x@1"
    hits = engine.stats().prefix_cache.hit_tokens
    pinned = _serve(engine, [(_prompt(1), "x@1")])[0]
    assert engine.stats().prefix_cache.hit_tokens - hits == BLOCKS_PER_PROMPT * BLOCK
    assert pinned.result(timeout=0).token_ids == reference_completion(model_dir, adapter_dirs["a"], _prompt(1), PARAMS)

    pins.drop("ab")  # the experiment is deleted: its pin was x@1's last
    engine._step()
    assert _blocks(engine, "x@1") == 0 and engine.stats().prefix_cache.dropped_blocks == BLOCKS_PER_PROMPT
    engine.shutdown()


def test_a_row_running_on_the_old_version_keeps_its_blocks_until_it_finishes(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("x", adapter_dirs["a"])
    _serve(engine, [(_prompt(1), "x")])
    params = SamplingParams(max_tokens=6)
    running = engine.submit(GenerationRequest(_prompt(2), params, adapter="x"))
    engine._step()  # admitted, prefilled (its blocks stored and held), first token out
    assert not running.done and _blocks(engine, "x@1") == 2 * BLOCKS_PER_PROMPT

    engine.register_adapter("x", adapter_dirs["b"])
    engine._step()
    assert not running.done
    assert _blocks(engine, "x@1") == 2 * BLOCKS_PER_PROMPT and engine.stats().prefix_cache.dropped_blocks == 0
    while not running.done:
        engine._step()
    assert _blocks(engine, "x@1") == 0 and engine.stats().prefix_cache.dropped_blocks == 2 * BLOCKS_PER_PROMPT
    assert engine.stats().prefix_cache.nbytes == 0
    assert running.result(timeout=0).token_ids == reference_completion(model_dir, adapter_dirs["a"], _prompt(2), params)
    engine.shutdown()
