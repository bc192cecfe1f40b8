"""One request's failure ends that request only: sampling, stop handling and detokenization fail
their own row, and a failed batch step is retried without its newest rows before anyone fails.
Every request that did not fail must still equal the same request generated alone."""

import pytest

import server.batch_runner as batch_runner
from backbone.loading import load_model
from backbone.sampling import SamplingParams
from backbone.tokenizer import Tokenizer
from engine_fixtures import reference_completion, save_tiny_model_with_tokenizer
from server.engine import Engine, EngineConfig, GenerationRequest
from server.text_stream import TextStream

POISON_SEED = 666  # marks the request whose processing the test breaks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("isolation_model"))


def _prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 37 + i * 11) % 120 for i in range(length)]


def _run_with_poison(model_dir, poison_params: SamplingParams) -> tuple[list, object, list]:
    """Three healthy greedy requests, then the poisoned one (the newest row), in one batch."""
    engine = Engine(load_model(model_dir), Tokenizer.from_folder(model_dir), EngineConfig(max_running=4, prefill_chunk=64), "tiny")
    healthy = [GenerationRequest(_prompt(seed, 6), SamplingParams(max_tokens=8)) for seed in range(3)]
    handles = [engine.submit(request) for request in healthy]
    poisoned = engine.submit(GenerationRequest(_prompt(9, 6), poison_params))
    engine.start()
    try:
        results = [handle.result(timeout=60) for handle in handles]
        return results, poisoned.result(timeout=60), healthy
    finally:
        engine.shutdown()


def _assert_healthy_rows_untouched(model_dir, results, healthy) -> None:
    for result, request in zip(results, healthy):
        assert result.finish_reason in ("stop", "length"), result.error
        assert result.token_ids == reference_completion(model_dir, None, request.prompt_ids, request.params)


def test_sampling_failure_ends_only_its_row(model_dir, monkeypatch):
    real = batch_runner.sample_next_tokens

    def breaks_on_poison(logits, params, generators):
        if any(p.seed == POISON_SEED for p in params):
            raise ValueError("Overflow when unpacking long long")
        return real(logits, params, generators)

    monkeypatch.setattr(batch_runner, "sample_next_tokens", breaks_on_poison)
    results, poisoned, healthy = _run_with_poison(model_dir, SamplingParams(max_tokens=8, temperature=1.0, seed=POISON_SEED))
    assert poisoned.finish_reason == "error" and "sampling" in poisoned.error
    _assert_healthy_rows_untouched(model_dir, results, healthy)


def test_stop_string_failure_ends_only_its_row(model_dir, monkeypatch):
    real = TextStream.push

    def breaks_on_poison(self, token_id):
        if "POISON" in self._stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(self, token_id)

    monkeypatch.setattr(TextStream, "push", breaks_on_poison)
    results, poisoned, healthy = _run_with_poison(model_dir, SamplingParams(max_tokens=8, stop=["POISON"]))
    assert poisoned.finish_reason == "error"
    _assert_healthy_rows_untouched(model_dir, results, healthy)


def test_failed_step_retries_without_newest_rows(model_dir, monkeypatch):
    real = batch_runner.BatchRunner._decode

    def breaks_with_poison(self, rows):
        if any(row.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("a kernel failed on this batch")
        return real(self, rows)

    monkeypatch.setattr(batch_runner.BatchRunner, "_decode", breaks_with_poison)
    results, poisoned, healthy = _run_with_poison(model_dir, SamplingParams(max_tokens=8, seed=POISON_SEED))
    assert poisoned.finish_reason == "error" and "internal error" in poisoned.error
    _assert_healthy_rows_untouched(model_dir, results, healthy)
