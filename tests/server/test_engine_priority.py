"""Admission order: a waiting request of lower priority (a shadow copy) goes after live ones."""

from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import save_tiny_model_with_tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest


def test_live_request_queued_after_a_shadow_copy_is_admitted_first(tmp_path):
    model_dir = save_tiny_model_with_tokenizer(tmp_path)
    config = EngineConfig(max_running=1, max_loras=1, max_lora_rank=8, prefill_chunk=8)
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), config, "tiny")
    engine.start()
    try:
        blocker = engine.submit(GenerationRequest([3, 4, 5], SamplingParams(max_tokens=200)))
        next(blocker.events(timeout=30))  # the one row is taken; the next two wait in the queue
        shadow = engine.submit(GenerationRequest([6, 7, 8], SamplingParams(max_tokens=3), priority=1))
        live = engine.submit(GenerationRequest([9, 10, 11], SamplingParams(max_tokens=3)))
        blocker.cancel()
        live_done, shadow_done = live.result(timeout=30), shadow.result(timeout=30)
        assert live_done.finish_reason == shadow_done.finish_reason == "length"
        assert live_done.end_time < shadow_done.first_token_time  # one row: live ran first, to its end
    finally:
        engine.shutdown()
