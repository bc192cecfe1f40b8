"""A running shadow copy gives its batch row to a live request that waits for one, on a real
engine with one row: the live request runs, the shadow copy ends "cancelled", is counted as
preempted and records no output; with a row to spare nothing is preempted. The watcher looks when
the engine announces a change, not on a timer."""

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


def make_engine(tmp_path, max_running: int, start: bool = True) -> Engine:
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    config = EngineConfig(max_running=max_running, max_loras=2, max_lora_rank=8, prefill_chunk=8)
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")
    if start:
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
    experiments.preemption.fallback_s = 3600.0  # no timed look: only the test's checks and announced changes

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


def test_the_watcher_looks_when_a_live_request_is_queued_not_on_a_timer(tmp_path):
    # The engine is stepped by hand on the event loop's thread: between two steps nothing runs
    # but the loop, so whatever preempts the shadow copy there is the watcher, woken by the submit.
    engine = make_engine(tmp_path, max_running=1, start=False)
    experiments = build_experiments(None, {"exp": EXPERIMENT}, lambda: {"live", "candidate"}, CollectorRegistry(), engine)
    experiments.preemption.fallback_s = 3600.0  # a timed look would come an hour late
    preemption = experiments.preemption

    async def step_until(condition, what: str) -> None:
        for _ in range(2000):
            if condition():
                return
            engine._step()
            await asyncio.sleep(0)  # the loop hands the new tokens on
        raise AssertionError(f"gave up stepping until {what}")

    async def turns_until(condition) -> bool:
        for _ in range(50):  # turns of the loop, no engine step and no timer due
            if condition():
                return True
            await asyncio.sleep(0)
        return condition()

    async def scenario():
        first = experiments.submit(engine, GenerationRequest(PROMPT, SamplingParams(max_tokens=LONG), adapter="live"),
                                   DECISION, "r1", time.monotonic())
        await step_until(lambda: first.done and preemption._started, "the shadow copy holds the one row")
        (shadow,) = preemption._in_flight
        assert not await turns_until(lambda: shadow.cancelled)  # no live request waits: nothing to preempt
        waiting = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_tokens=3), adapter="live"))
        assert await turns_until(lambda: shadow.cancelled), "the queued live request did not wake the watcher"
        await step_until(lambda: waiting.done and not preemption._in_flight, "the live request has its row")
        assert await turns_until(preemption._watcher.done)  # with no shadow copy in flight it stops at once
        assert engine._load_listeners == []
        await experiments.drain()
        return shadow, waiting.result(0)

    try:
        shadow, finished = asyncio.run(scenario())
        assert finished.finish_reason == "length"
        assert shadow.result(0).finish_reason == "cancelled"
        figures = experiments.summary("exp")["shadow"]
        assert (figures["preempted"], figures["requests"]) == (1, 0)
    finally:
        engine.shutdown()
        experiments.store.close()
