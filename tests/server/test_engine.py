"""The engine against references: each request of a continuously batched, mixed-adapter run
equals the same request generated alone by backbone.generate with its adapter in a single slot."""

import asyncio
import threading
import time

import pytest

from adapters.errors import AdapterNotFoundError, ShapeMismatchError
from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import reference_completion, save_random_adapter, save_tiny_model_with_tokenizer
from tiny_models import save_tiny_model
from server.engine import Engine, EngineConfig, GenerationRequest, TextDelta
from server.engine_errors import InvalidRequestError, PromptTooLongError, QueueFullError, UnknownAdapterError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("engine_model"))


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_adapters")
    adapters = {name: save_random_adapter(root / name, model_dir, seed=seed) for seed, name in enumerate(["a", "b"], 1)}
    # "c" and "d" target q/v only at another rank, as PEFT's defaults do: every other module of a
    # batch holding only them has nothing to add.
    for seed, name in ((3, "c"), (4, "d")):
        adapters[name] = save_random_adapter(root / name, model_dir, seed=seed, rank=2, targets=["q_proj", "v_proj"])
    return adapters


def _engine(model_dir, **overrides) -> Engine:
    config = EngineConfig(**{"max_running": 4, "max_loras": 2, "max_lora_rank": 8, "prefill_chunk": 8, **overrides})
    return Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")


def _wait_until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"gave up waiting for {what}")


def _prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 37 + i * 11) % 120 for i in range(length)]


def test_mixed_batch_matches_single_adapter_runs(model_dir, adapter_dirs):
    # 3 adapters + base over 2 slots and 4 rows: requests queue for rows and for slots, long
    # prompts are prefilled in chunks of 8 while other rows decode, rows join at staggered times.
    engine = _engine(model_dir)
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    engine.start()
    plan = [(None, 5), ("a", 19), ("b", 3), ("a", 7), ("c", 12), (None, 25), ("c", 4), ("b", 9), ("a", 2)]
    params = SamplingParams(max_tokens=12)
    handles = []
    try:
        for index, (adapter, length) in enumerate(plan):
            handles.append(engine.submit(GenerationRequest(_prompt(index, length), params, adapter=adapter)))
            if index % 3 == 2:  # let the batch run before the next ones join
                next(handles[-1].events(timeout=30))
        results = [handle.result(timeout=60) for handle in handles]
    finally:
        engine.shutdown()
    for index, ((adapter, length), result) in enumerate(zip(plan, results)):
        expected = reference_completion(model_dir, adapter_dirs.get(adapter), _prompt(index, length), params)
        assert result.token_ids == expected, f"request {index} on {adapter or 'base'}"
        assert result.finish_reason == ("length" if len(expected) == params.max_tokens else "stop")
        assert result.prompt_tokens == length
    # the adapters really change the output, so the comparison above is not vacuous
    assert reference_completion(model_dir, None, _prompt(1, 19), params) != results[1].token_ids


def test_adapters_targeting_only_some_modules_share_a_decode_batch(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    for name in ("c", "d"):
        engine.register_adapter(name, adapter_dirs[name])
    engine.start()
    plan = [("c", 6), ("d", 7), ("c", 5), ("d", 4)]  # two rows on each adapter, decoding together
    params = SamplingParams(max_tokens=8)
    try:
        handles = [engine.submit(GenerationRequest(_prompt(i, n), params, adapter=a)) for i, (a, n) in enumerate(plan)]
        results = [handle.result(timeout=60) for handle in handles]
    finally:
        engine.shutdown()
    for index, ((adapter, length), result) in enumerate(zip(plan, results)):
        assert result.finish_reason != "error", result.error
        assert result.token_ids == reference_completion(model_dir, adapter_dirs[adapter], _prompt(index, length), params)


def test_streamed_deltas_add_up_to_the_result(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("a", adapter_dirs["a"])
    engine.start()
    try:
        handle = engine.submit(GenerationRequest(_prompt(3, 6), SamplingParams(max_tokens=10), adapter="a"))
        events = list(handle.events(timeout=30))
        async def collect():
            other = engine.submit(GenerationRequest(_prompt(3, 6), SamplingParams(max_tokens=10), adapter="a"))
            return [event async for event in other.aevents()]
        async_events = asyncio.run(collect())
    finally:
        engine.shutdown()
    for stream in (events, async_events):
        deltas, finished = stream[:-1], stream[-1]
        assert all(isinstance(d, TextDelta) for d in deltas)
        assert "".join(d.text for d in deltas) == finished.text
        assert [t for d in deltas for t in d.token_ids] == finished.token_ids
        assert finished.first_token_time <= finished.end_time
    assert handle.adapter.key == "a@1"


def test_stop_string_matches_generate(model_dir, adapter_dirs):
    free = SamplingParams(max_tokens=12)
    tokenizer = Tokenizer.from_folder(model_dir)
    expected = reference_completion(model_dir, adapter_dirs["b"], _prompt(4, 5), free)
    stop = tokenizer.decode(expected[3:5])[1:]  # spans a token boundary, starts mid-token
    params = SamplingParams(max_tokens=12, stop=[stop])
    engine = _engine(model_dir)
    engine.register_adapter("b", adapter_dirs["b"])
    engine.start()
    try:
        handle = engine.submit(GenerationRequest(_prompt(4, 5), params, adapter="b"))
        events = list(handle.events(timeout=30))
    finally:
        engine.shutdown()
    finished = events[-1]
    assert finished.finish_reason == "stop"
    assert finished.token_ids == reference_completion(model_dir, adapter_dirs["b"], _prompt(4, 5), params)
    assert finished.text == tokenizer.decode(expected)[: tokenizer.decode(expected).find(stop)]
    assert "".join(e.text for e in events[:-1]) == finished.text  # the stop string was never streamed


def test_hot_swap_under_load_serves_the_version_each_handle_reports(model_dir, adapter_dirs):
    versions = {str(adapter_dirs["a"]): adapter_dirs["a"], str(adapter_dirs["b"]): adapter_dirs["b"]}
    prompts = [_prompt(seed, 4 + seed) for seed in range(3)]
    params = SamplingParams(max_tokens=8)
    expected = {(path, i): reference_completion(model_dir, versions[path], p, params) for path in versions for i, p in enumerate(prompts)}
    engine = _engine(model_dir, max_loras=2)
    engine.register_adapter("x", adapter_dirs["a"])
    engine.start()
    handles, errors, stop = [], [], threading.Event()

    def client(worker: int) -> None:
        count = 0
        while not stop.is_set() or count < 3:
            index = (worker + count) % len(prompts)
            try:
                handle = engine.submit(GenerationRequest(prompts[index], params, adapter="x"))
                handles.append((index, handle, handle.result(timeout=60)))
            except Exception as err:  # every request must succeed
                errors.append(err)
                return
            count += 1

    clients = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for thread in clients:
        thread.start()
    try:
        for swap in range(6):  # x: a -> b -> a -> b ... (versions 2..7), each swap while requests run
            _wait_until(lambda: engine.stats().running > 0, "requests in flight")
            version = engine.register_adapter("x", adapter_dirs["b" if swap % 2 == 0 else "a"]).version
            _wait_until(lambda: any(h.adapter.version == version for _, h, _ in list(handles)), f"x@{version} served")
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    finally:
        engine.shutdown()
    assert not errors
    served_versions = {handle.adapter.version for _, handle, _ in handles}
    assert served_versions == set(range(1, 8))
    for index, handle, result in handles:
        assert result.finish_reason in ("length", "stop")
        assert result.token_ids == expected[(handle.adapter.path, index)], f"x@{handle.adapter.version}"
    # retired versions free their slots once idle: only the current version may stay resident
    _wait_until(lambda: {r.version for r in engine.stats().resident} <= {7}, "old versions to leave their slots")


def test_request_waits_for_busy_slots_then_runs(model_dir, adapter_dirs):
    engine = _engine(model_dir, max_loras=1)
    engine.register_adapter("a", adapter_dirs["a"])
    engine.register_adapter("b", adapter_dirs["b"])
    engine.start()
    try:
        first = engine.submit(GenerationRequest(_prompt(1, 4), SamplingParams(max_tokens=40), adapter="a"))
        next(first.events(timeout=30))
        second = engine.submit(GenerationRequest(_prompt(2, 4), SamplingParams(max_tokens=5), adapter="b"))
        base = engine.submit(GenerationRequest(_prompt(3, 4), SamplingParams(max_tokens=5)))
        assert base.result(timeout=30).finish_reason == "length"  # the base does not wait behind b
        stats = engine.stats()
        # a's 40 tokens (no early end of sequence on these weights) outlast the base's 5.
        assert not first.done
        assert stats.waiting_adapters == {"b": 1} and [r.name for r in stats.resident] == ["a"]
        result = second.result(timeout=60)
    finally:
        engine.shutdown()
    assert result.token_ids == reference_completion(model_dir, adapter_dirs["b"], _prompt(2, 4), SamplingParams(max_tokens=5))


def test_adapter_evicted_from_cpu_is_read_back_from_disk(model_dir, adapter_dirs):
    engine = _engine(model_dir, max_cpu_loras=1)
    engine.register_adapter("a", adapter_dirs["a"])
    engine.register_adapter("b", adapter_dirs["b"])  # pushes a out of the CPU cache
    assert engine.stats().cpu_cache_entries == 1
    engine.start()
    try:
        result = engine.submit(GenerationRequest(_prompt(5, 6), SamplingParams(max_tokens=6), adapter="a")).result(timeout=30)
    finally:
        engine.shutdown()
    assert result.token_ids == reference_completion(model_dir, adapter_dirs["a"], _prompt(5, 6), SamplingParams(max_tokens=6))
    assert engine.stats().disk_loads == 3


def test_cancel_frees_the_row_at_once(model_dir):
    engine = _engine(model_dir, max_running=1)
    engine.start()
    try:
        running = engine.submit(GenerationRequest(_prompt(1, 4), SamplingParams(max_tokens=200)))
        queued = engine.submit(GenerationRequest(_prompt(2, 4), SamplingParams(max_tokens=3)))
        next(running.events(timeout=30))
        running.cancel()
        assert running.result(timeout=30).finish_reason == "cancelled"
        assert running.result().completion_tokens < 200
        assert queued.result(timeout=30).finish_reason == "length"  # got the freed row
        waiting = engine.submit(GenerationRequest(_prompt(3, 4), SamplingParams(max_tokens=200)))
        waiting.cancel()
        assert waiting.result(timeout=30).finish_reason == "cancelled"
        _wait_until(lambda: engine.stats().running == 0, "the row to be freed")
    finally:
        engine.shutdown()
    assert engine.stats().finished == {"cancelled": 2, "length": 1}


def test_full_queue_refuses_at_submit(model_dir):
    engine = _engine(model_dir, max_queued=2)  # not started: nothing leaves the queue
    params = SamplingParams(max_tokens=2)
    handles = [engine.submit(GenerationRequest([5, 6], params)) for _ in range(2)]
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(GenerationRequest([5, 6], params))
    engine.shutdown()
    assert all(h.result(timeout=5).finish_reason == "cancelled" for h in handles)


def test_over_long_prompt_is_refused_with_the_numbers(model_dir):
    engine = _engine(model_dir, max_context=32)
    with pytest.raises(PromptTooLongError, match=r"30 tokens and max_tokens is 5, together 35 > .* 32") as refused:
        engine.submit(GenerationRequest([5] * 30, SamplingParams(max_tokens=5)))
    assert (refused.value.prompt_tokens, refused.value.max_tokens, refused.value.max_context) == (30, 5, 32)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.submit(GenerationRequest([5, 999], SamplingParams(max_tokens=5)))
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        engine.submit(GenerationRequest([5], SamplingParams(max_tokens=5), adapter="nope"))
    engine.shutdown()


def test_bad_adapter_is_refused_and_nothing_changes(model_dir, adapter_dirs, tmp_path):
    narrow = save_tiny_model(tmp_path / "narrow", hidden_size=32)
    wrong_shapes = save_random_adapter(tmp_path / "wrong_shapes", narrow, seed=1)
    engine = _engine(model_dir)
    engine.register_adapter("a", adapter_dirs["a"])
    with pytest.raises(ShapeMismatchError, match="different base model"):
        engine.register_adapter("a", wrong_shapes)
    with pytest.raises(AdapterNotFoundError):
        engine.register_adapter("a", tmp_path / "missing")
    assert [info.key for info in engine.adapter_infos()] == ["a@1"]
    engine.start()
    try:
        result = engine.submit(GenerationRequest(_prompt(1, 3), SamplingParams(max_tokens=4), adapter="a")).result(timeout=30)
    finally:
        engine.shutdown()
    assert result.token_ids == reference_completion(model_dir, adapter_dirs["a"], _prompt(1, 3), SamplingParams(max_tokens=4))


def test_unload_frees_slot_and_cpu_copy(model_dir, adapter_dirs):
    engine = _engine(model_dir)
    engine.register_adapter("a", adapter_dirs["a"])
    engine.start()
    try:
        engine.submit(GenerationRequest(_prompt(1, 3), SamplingParams(max_tokens=3), adapter="a")).result(timeout=30)
        loaded = engine.stats()
        assert loaded.resident_bytes > 0 and loaded.cpu_cache_bytes == loaded.resident_bytes
        engine.unregister_adapter("a")
        _wait_until(lambda: engine.stats().resident == [], "the slot to be freed")
        freed = engine.stats()
        assert (freed.resident_bytes, freed.cpu_cache_bytes, freed.cpu_cache_entries) == (0, 0, 0)
        with pytest.raises(UnknownAdapterError):
            engine.unregister_adapter("a")
    finally:
        engine.shutdown()


def test_pinned_adapter_stays_resident(model_dir, adapter_dirs):
    engine = _engine(model_dir, max_loras=2)
    for name in "abc":
        engine.register_adapter(name, adapter_dirs[name])
    engine.pin_adapter("a")
    engine.start()
    try:
        _wait_until(lambda: [(r.name, r.pinned) for r in engine.stats().resident] == [("a", True)], "a pinned")
        for name in "bcb":  # b and c share the one unpinned slot
            engine.submit(GenerationRequest(_prompt(1, 3), SamplingParams(max_tokens=2), adapter=name)).result(timeout=30)
        assert [(r.name, r.slot) for r in engine.stats().resident] == [("a", 0), ("b", 1)]
        with pytest.raises(ValueError, match="no unpinned slot"):
            engine.pin_adapter("b")  # both slots pinned would starve c
    finally:
        engine.shutdown()


def test_concurrent_registrations_of_a_name_the_one_finishing_last_is_current(model_dir, adapter_dirs):
    # Versions are numbered when validation ends, so the registration that finishes last gets
    # the higher version and is current; each caller is told the version it really got.
    engine = _engine(model_dir)
    parse, entered, release = engine.tiers.parse, threading.Event(), threading.Event()

    def slow_parse(path):
        if path == adapter_dirs["a"]:  # the first registration stalls while reading
            entered.set()
            release.wait(30)
        return parse(path)

    engine.tiers.parse = slow_parse
    outcome = {}
    first = threading.Thread(target=lambda: outcome.update(info=engine.register_adapter("x", adapter_dirs["a"])))
    first.start()
    assert entered.wait(30)
    quick = engine.register_adapter("x", adapter_dirs["b"])
    release.set()
    first.join(30)
    engine.shutdown()
    slow = outcome["info"]
    assert (quick.version, slow.version) == (1, 2) and slow.path.endswith("/a")
    assert [(info.name, info.version) for info in engine.adapter_infos()] == [("x", 2)]
