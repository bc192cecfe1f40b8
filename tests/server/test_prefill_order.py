"""A tenant with nothing running (a newcomer) gets its prefill in the first step after its request
arrives, and alone: other tenants' new prompts wait that one step out. Asserted on which rows
prefill in which step, never on durations: the test drives the engine's steps itself."""

import pytest

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import save_tiny_model_with_tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest
from server.fair_queue import TenantLimitTable, fair_share_defaults

MAX_RUNNING = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("prefill_order_model"))


def _engine(model_dir, prefill_chunk: int = 64, prefix_cache: bool = True) -> Engine:
    config = EngineConfig(
        max_running=MAX_RUNNING, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache, prefix_block_tokens=16,
        tenant_limits=TenantLimitTable(fair_share_defaults(MAX_RUNNING, 256)),
    )  # fmt: skip
    tokenizer = Tokenizer.from_folder(model_dir)
    # An end-of-sequence id the model cannot produce: every row runs to exactly max_tokens.
    tokenizer.eos_token_ids = [load_model(model_dir).config.vocab_size]
    # Not started: each test runs the worker's steps itself, so what happens in which step is exact.
    return Engine(load_model(model_dir), tokenizer, config, "tiny")


def _record_prefills(engine: Engine) -> list[list[str]]:
    """Per engine step, the tenants of the rows whose prompts advanced in it (in batch order)."""
    steps: list[list[str]] = []
    run = engine._runner.step

    def step(rows):
        before = {id(row): row.prefilled for row in rows}
        run(rows)
        steps.append([row.request.tenant for row in rows if row.prefilled > before[id(row)]])

    engine._runner.step = step
    return steps


def _request(tenant: str, prompt: list[int], max_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens), tenant=tenant)


def _prompt(seed: int, length: int = 5) -> list[int]:
    return [3 + (seed * 7 + i) % 120 for i in range(length)]


def test_newcomer_prefills_alone_in_the_first_step_after_it_arrives(model_dir):
    engine = _engine(model_dir)
    prefills = _record_prefills(engine)
    try:
        flood = [engine.submit(_request("a", _prompt(seed))) for seed in range(12)]
        engine._step()  # a's first three rows (its row limit) prefill, decode their second token, end
        assert prefills[-1] == ["a", "a", "a"]
        b = engine.submit(_request("b", _prompt(99)))
        engine._step()  # b and a's next three are admitted together; b's prompt goes alone
        assert prefills[-1] == ["b"]
        assert b.result(timeout=0).first_token_time is not None
        engine._step()  # a's rows waited one step, not more
        assert prefills[-1] == ["a", "a", "a"]
        while any(not handle.done for handle in flood):
            engine._step()
        assert {handle.result(timeout=0).finish_reason for handle in flood} == {"length"}
    finally:
        engine.shutdown()


def test_newcomer_goes_before_the_rest_of_another_tenants_first_prompts(model_dir):
    # 8 prompt tokens a step: a's three 5-token prompts need two steps, and b arrives after the first.
    engine = _engine(model_dir, prefill_chunk=8)
    prefills = _record_prefills(engine)
    try:
        for seed in range(3):
            engine.submit(_request("a", _prompt(seed), max_tokens=4))
        engine._step()
        assert prefills[-1] == ["a", "a"]  # the first whole, the second's first 3 tokens
        engine.submit(_request("b", _prompt(99), max_tokens=4))
        engine._step()
        assert prefills[-1] == ["b"]
        engine._step()
        assert prefills[-1] == ["a", "a"]
    finally:
        engine.shutdown()


def test_rows_of_one_tenant_prefill_together(model_dir):
    engine = _engine(model_dir)
    prefills = _record_prefills(engine)
    try:
        for seed in range(2):
            engine.submit(_request("", _prompt(seed), max_tokens=4))
        engine._step()
        assert prefills[-1] == ["", ""]  # an idle server's first requests are not held back
        engine.submit(_request("", _prompt(3)))
        engine._step()
        assert prefills[-1] == [""]  # a running tenant's next request goes at once too
    finally:
        engine.shutdown()


def test_newcomer_waiting_for_a_prefix_being_computed_holds_nobody_back(model_dir):
    # a's 48-token prompt prefills 16 tokens a step; b's shares its first 32 tokens, so b waits
    # for a's blocks rather than computing them again, and a's prefill must go on meanwhile.
    engine = _engine(model_dir, prefill_chunk=16)
    prefills = _record_prefills(engine)
    try:
        shared = _prompt(1, length=48)
        a = engine.submit(_request("a", shared, max_tokens=3))
        engine._step()
        b = engine.submit(_request("b", shared[:32] + _prompt(2, length=8), max_tokens=3))
        for _ in range(20):
            if a.done and b.done:
                break
            engine._step()
        assert prefills[:3] == [["a"], ["a"], ["a"]]  # b found its prefix in flight: a went on
        assert a.result(timeout=0).finish_reason == b.result(timeout=0).finish_reason == "length"
        assert engine.stats().prefix_cache.hit_tokens == 32
    finally:
        engine.shutdown()
