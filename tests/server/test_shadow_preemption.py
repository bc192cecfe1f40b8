"""A running shadow copy gives its batch row to a live request that waits for one, on a real
engine with one row: the live request runs, the shadow copy ends "cancelled", is counted as
preempted and records no output; with a row to spare nothing is preempted."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import save_random_adapter, save_tiny_model_with_tokenizer
from router.request_router import RouteDecision
from server.engine import Engine, EngineConfig, GenerationRequest
from server.experiment_runtime import build_experiments

PROMPT = [5, 6, 7]
LONG = 100  # new tokens of the live request, and so of its shadow copy
EXPERIMENT = {"task": "qa", "arms": [{"name": "a", "adapter": "live"}], "shadow": {"adapter": "candidate", "rate": 1.0}}
DECISION = RouteDecision(adapter="live", task="qa", ab_arm=True, experiment="exp", arm="a")


def make_engine(tmp_path, max_running: int) -> Engine:
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    config = EngineConfig(max_running=max_running, max_loras=2, max_lora_rank=8, prefill_chunk=8)
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")
    engine.start()
    for name, seed in (("live", 1), ("candidate", 2)):
        engine.register_adapter(name, save_random_adapter(tmp_path / name, model_dir, seed=seed))
    return engine


async def shadow_running(experiments, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not experiments.preemption._started:
        assert time.monotonic() < deadline, "the shadow copy never produced a token"
        await asyncio.sleep(0.001)


def test_a_live_request_waiting_for_a_row_preempts_the_running_shadow_copy(tmp_path):
    engine = make_engine(tmp_path, max_running=1)
    alone = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_tokens=LONG), adapter="candidate")).result(60)
    assert alone.completion_tokens > 30  # the shadow copy runs long unless something stops it
    experiments = build_experiments(None, {"exp": EXPERIMENT}, lambda: {"live", "candidate"}, CollectorRegistry(), engine)
    experiments.preemption.poll_s = 3600.0  # the test makes each check itself

    async def scenario():
        first = experiments.submit(engine, GenerationRequest(PROMPT, SamplingParams(max_tokens=LONG), adapter="live"),
                                   DECISION, "r1", time.monotonic())
        await shadow_running(experiments)  # the live request has ended; its copy holds the one row
        assert first.done
        with engine._lock:  # the worker waits: the shadow copy cannot end before the check
            (shadow,) = experiments.preemption._in_flight
            assert not shadow.done
            assert not experiments.preemption.check(engine)  # nothing waits for the row yet
            waiting = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_tokens=3), adapter="live"))
            assert experiments.preemption.check(engine)
            assert not experiments.preemption.check(engine)  # one preemption per waiting request
        finished = await asyncio.to_thread(waiting.result, 60)
        await experiments.drain()
        return shadow, finished

    try:
        shadow, finished = asyncio.run(scenario())
        assert finished.finish_reason == "length"
        shadow_end = shadow.result(0)
        assert shadow_end.finish_reason == "cancelled" and shadow_end.completion_tokens < alone.completion_tokens
        figures = experiments.summary("exp")["shadow"]
        assert (figures["preempted"], figures["requests"]) == (1, 0)
        assert experiments.store.shadow_outputs("exp", 10) == []  # a cut-short text is not recorded
    finally:
        engine.shutdown()
        experiments.store.close()


def test_a_shadow_copy_is_left_alone_while_rows_are_free(tmp_path):
    engine = make_engine(tmp_path, max_running=4)
    experiments = build_experiments(None, {"exp": EXPERIMENT}, lambda: {"live", "candidate"}, CollectorRegistry(), engine)

    async def scenario():
        experiments.submit(engine, GenerationRequest(PROMPT, SamplingParams(max_tokens=8), adapter="live"),
                           DECISION, "r1", time.monotonic())
        others = [engine.submit(GenerationRequest(PROMPT, SamplingParams(max_tokens=8), adapter="live")) for _ in range(2)]
        await experiments.drain()
        return [await asyncio.to_thread(handle.result, 60) for handle in others]

    try:
        assert [end.finish_reason for end in asyncio.run(scenario())] == ["length", "length"]
        figures = experiments.summary("exp")["shadow"]
        assert (figures["preempted"], figures["requests"]) == (0, 1)
        (output,) = experiments.store.shadow_outputs("exp", 10)
        assert output["finish_reason"] == "length"
    finally:
        engine.shutdown()
        experiments.store.close()
