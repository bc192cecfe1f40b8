"""Fair admission across tenants: a tenant flooding the engine neither holds every row nor fills
the queue, and another tenant's request is admitted ahead of the flood's backlog. Asserted on
admission order (first-token order), never on durations."""

import time

import pytest

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import save_tiny_model_with_tokenizer
from server.auth import ApiKeys, AuthConfigError
from server.engine import Engine, EngineConfig, GenerationRequest
from server.engine_errors import TenantQueueFullError
from server.fair_queue import FairQueue, TenantLimits, TenantLimitTable, fair_share_defaults, limit_table

MAX_RUNNING = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("fair_model"))


def _engine(model_dir, limits: TenantLimitTable) -> Engine:
    config = EngineConfig(max_running=MAX_RUNNING, prefill_chunk=64, tenant_limits=limits)
    tokenizer = Tokenizer.from_folder(model_dir)
    # An end-of-sequence id the model cannot produce: every row runs to max_tokens, so which row
    # holds which cache row at each step, and hence the admission order, is exact.
    tokenizer.eos_token_ids = [load_model(model_dir).config.vocab_size]
    return Engine(load_model(model_dir), tokenizer, config, "tiny")


def _request(tenant: str, seed: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest([3 + (seed * 7 + i) % 120 for i in range(5)], SamplingParams(max_tokens=max_tokens), tenant=tenant)


def test_queue_takes_turns_across_tenants():
    queue: FairQueue[tuple[str, int]] = FairQueue(lambda item: item[0])
    for item in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("c", 2)]:
        queue.append(item)
    assert list(queue) == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2), ("a", 3)]
    queue.served(("a", 1))
    queue.remove({id(item) for item in list(queue) if item == ("a", 1)})
    assert list(queue)[:3] == [("b", 1), ("c", 1), ("a", 2)]  # a went to the back of the turn order
    assert queue.queued("a") == 2 and len(queue) == 5
    assert queue.drain()[0] == ("b", 1) and len(queue) == 0


def test_lower_priority_value_goes_first_then_tenants_take_turns():
    # (tenant, priority, number)
    queue: FairQueue[tuple[str, int, int]] = FairQueue(lambda item: item[0], priority_of=lambda item: item[1])
    for item in [("a", 1, 1), ("a", 0, 2), ("a", 0, 3), ("b", 1, 4), ("b", 0, 5), ("c", 2, 6), ("c", 1, 7)]:
        queue.append(item)
    assert list(queue) == [("a", 0, 2), ("b", 0, 5), ("a", 0, 3), ("a", 1, 1), ("b", 1, 4), ("c", 1, 7), ("c", 2, 6)]
    assert queue.queued("a") == 3 and queue.queued("c") == 2 and len(queue) == 7
    queue.served(("a", 0, 2))
    queue.remove({id(item) for item in list(queue) if item[2] in (2, 6)})
    assert list(queue) == [("b", 0, 5), ("a", 0, 3), ("b", 1, 4), ("c", 1, 7), ("a", 1, 1)]
    queue.remove({id(item) for item in list(queue) if item[0] == "c"})
    assert queue.queued("c") == 0 and len(queue) == 4
    queue.append(("c", 0, 8))  # c is back in the turns, still ahead of a, served last
    assert queue.drain() == [("b", 0, 5), ("c", 0, 8), ("a", 0, 3), ("b", 1, 4), ("a", 1, 1)] and len(queue) == 0


def test_limits_from_keys_fill_gaps_with_fair_share():
    keys = ApiKeys.from_mapping({
        "sk-tenant-a-1": {"tenant": "a", "max_running": 2},
        "sk-tenant-b-2": {"tenant": "b", "max_queued": 5},
        "sk-tenant-c-3": {"tenant": "c"},
    })
    table = limit_table(keys.tenant_limits(), max_running=16, max_queued=256)
    assert table.of("a") == TenantLimits(2, 128) and table.of("b") == TenantLimits(12, 5)
    assert table.of("c") == fair_share_defaults(16, 256) == TenantLimits(12, 128)
    assert fair_share_defaults(1, 1) == TenantLimits(1, 1)
    with pytest.raises(AuthConfigError, match="integer >= 1"):
        ApiKeys.from_mapping({"sk-tenant-a-1": {"max_running": 0}})
    with pytest.raises(AuthConfigError, match="same limits"):
        ApiKeys.from_mapping({
            "sk-tenant-a-1": {"tenant": "a", "max_queued": 1}, "sk-tenant-a-2": {"tenant": "a", "max_queued": 2},
        }).tenant_limits()


def _first_token_rank(model_dir, limits: TenantLimitTable) -> int:
    """Tenant a floods with 10x max_running long requests; once a's rows are decoding, tenant b
    sends one. Returns how many of a's requests got their first token before b's did."""
    engine = _engine(model_dir, limits)
    try:
        # The whole flood waits before the worker starts, so its first step sees all of it.
        flood = [engine.submit(_request("a", seed, max_tokens=40)) for seed in range(10 * MAX_RUNNING)]
        engine.start()
        for _ in range(2000):
            if engine.stats().running > 0:
                break
            time.sleep(0.005)
        b = engine.submit(_request("b", 99, max_tokens=2)).result(timeout=120)
        results = [handle.result(timeout=300) for handle in flood]
    finally:
        engine.shutdown()
    assert {result.finish_reason for result in results} == {"length"}
    return sum(result.first_token_time < b.first_token_time for result in results)


def test_flooding_tenant_leaves_a_row_for_another(model_dir):
    limits = TenantLimitTable(fair_share_defaults(MAX_RUNNING, 256))
    # a holds 3 of the 4 rows; b takes the free one at once, ahead of a's whole backlog.
    assert _first_token_rank(model_dir, limits) == fair_share_defaults(MAX_RUNNING, 256).max_running


def test_turns_put_another_tenant_before_the_backlog_without_row_limits(model_dir):
    # No row limit: a fills every row, and b goes first when they free, ahead of a's backlog.
    assert _first_token_rank(model_dir, TenantLimitTable()) == MAX_RUNNING


def test_tenant_queue_limit_refuses_that_tenant_only(model_dir):
    engine = _engine(model_dir, TenantLimitTable(TenantLimits(max_queued=3)))  # not started: nothing leaves the queue
    try:
        for seed in range(3):
            engine.submit(_request("a", seed, 4))
        with pytest.raises(TenantQueueFullError, match="tenant 'a' already has 3 requests waiting"):
            engine.submit(_request("a", 3, 4))
        engine.submit(_request("b", 4, 4))
    finally:
        engine.shutdown()


def test_server_applies_tenant_limits_only_with_keys():
    from server.app import ServerSettings, engine_config

    assert engine_config(ServerSettings()).tenant_limits == TenantLimitTable()  # one open tenant: no caps
    keys = ApiKeys.from_mapping({"sk-tenant-a-1": {"tenant": "a", "max_running": 1}, "sk-tenant-b-2": {"tenant": "b"}})
    table = engine_config(ServerSettings(api_keys=keys, tenant_limits=TenantLimits(max_queued=9))).tenant_limits
    assert table.of("a") == TenantLimits(1, 9) and table.of("b") == TenantLimits(12, 9)
