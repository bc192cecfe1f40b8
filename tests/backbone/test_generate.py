"""Generation against references: full recomputation, single-prompt runs and transformers.generate."""

import pytest
import torch

from adapters.injection import inject_lora
from adapters.routing import AdapterRouting
from backbone import KVCache, load_model
from backbone.generate import Completion, decode_step, generate, prefill, select_routing_rows
from backbone.sampling import SamplingParams
from tiny_models import load_reference, save_tiny_model

EOS = 2  # the tiny models' eos_token_id


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


class LetterTokenizer:
    """A complete tokenizer for the tiny vocabulary: token id i is one letter (or a digit)."""

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.alphabet[i % len(self.alphabet)] for i in token_ids)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_cached_decoding_matches_full_recomputation(tiny_model):
    prompts = _prompts([5, 11, 1, 8])
    cache = KVCache.for_model(tiny_model.config, max_rows=4, max_len=32)
    sequences = [list(p) for p in prompts]
    step_logits = []
    with torch.no_grad():
        logits = prefill(tiny_model, cache, prompts)
        positions = torch.tensor([len(p) for p in prompts])
        for _ in range(6):
            step_logits.append(logits)
            tokens = logits.argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                sequences[row].append(token)
            logits = decode_step(tiny_model, cache, tokens, positions)
            positions = positions + 1
        for row, sequence in enumerate(sequences):
            full = tiny_model(torch.tensor([sequence]))[0]  # (T, V) no cache
            start = len(prompts[row]) - 1
            for step, logits_at_step in enumerate(step_logits):
                torch.testing.assert_close(logits_at_step[row], full[start + step], atol=1e-4, rtol=1e-4)


def test_decoding_into_scattered_cache_rows_matches_full_recomputation(tiny_model):
    # The engine places sequences in whichever cache rows are free, in any order.
    prompts = _prompts([7, 3, 10], seed=10)
    rows = torch.tensor([4, 0, 2])
    cache = KVCache.for_model(tiny_model.config, max_rows=5, max_len=24)
    sequences = [list(p) for p in prompts]
    with torch.no_grad():
        logits = prefill(tiny_model, cache, prompts, cache_rows=rows)
        positions = torch.tensor([len(p) for p in prompts])
        for _ in range(5):
            tokens = logits.argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                sequences[row].append(token)
            logits = decode_step(tiny_model, cache, tokens, positions, cache_rows=rows)
            positions = positions + 1
        for row, sequence in enumerate(sequences):
            full = tiny_model(torch.tensor([sequence]))[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=1e-4)


def test_batched_prompts_of_different_lengths_match_each_prompt_alone(tiny_model):
    prompts = _prompts([3, 17, 9, 1, 12], seed=1)
    params = SamplingParams(max_tokens=12)
    batched = generate(tiny_model, prompts, params, stop_token_ids=())
    for prompt, completion in zip(prompts, batched):
        alone = generate(tiny_model, [prompt], params, stop_token_ids=())[0]
        assert completion.token_ids == alone.token_ids


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_tokens_match_transformers_generate(architecture, tmp_path):
    folder = save_tiny_model(tmp_path, architecture=architecture, seed=3)
    ours, reference = load_model(folder), load_reference(folder)
    new_tokens = 20
    for prompt in _prompts([4, 13], seed=2):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early eos: compare all 20 tokens
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        actual = generate(ours, [prompt], SamplingParams(max_tokens=new_tokens), stop_token_ids=())[0]
        assert actual.token_ids == expected


def test_seeded_sampling_is_reproducible(tiny_model):
    prompts = _prompts([6, 2, 9], seed=4)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=42)
    first = generate(tiny_model, prompts, params, stop_token_ids=())
    second = generate(tiny_model, prompts, params, stop_token_ids=())
    other_seed = generate(tiny_model, prompts, SamplingParams(max_tokens=10, temperature=1.0, seed=7), stop_token_ids=())
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.token_ids for c in first] != [c.token_ids for c in other_seed]
    # A seeded prompt samples the same tokens alone as in the batch.
    assert generate(tiny_model, prompts[1:2], params, stop_token_ids=())[0].token_ids == first[1].token_ids


def test_max_tokens_finishes_with_length(tiny_model):
    completion = generate(tiny_model, _prompts([5]), SamplingParams(max_tokens=7), stop_token_ids=())[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 7 and completion.text is None


def test_stop_token_finishes_the_row_before_it(tiny_model):
    prompts = _prompts([5, 9], seed=5)
    free = generate(tiny_model, prompts, SamplingParams(max_tokens=10), stop_token_ids=())
    stop_token = free[0].token_ids[4]
    cut = free[0].token_ids.index(stop_token)
    completions = generate(tiny_model, prompts, SamplingParams(max_tokens=10), stop_token_ids=[stop_token])
    assert completions[0] == Completion(free[0].token_ids[:cut], None, "stop")
    # The other row is unaffected by the first leaving the batch (unless it meets the same token).
    other = free[1].token_ids
    expected = other[: other.index(stop_token)] if stop_token in other else other
    assert completions[1].token_ids == expected


def test_default_stop_tokens_are_the_model_eos(tiny_model):
    prompts = _prompts([5], seed=6)
    free = generate(tiny_model, prompts, SamplingParams(max_tokens=30), stop_token_ids=())[0].token_ids
    completion = generate(tiny_model, prompts, SamplingParams(max_tokens=30))[0]
    expected = free[: free.index(EOS)] if EOS in free else free
    assert completion.token_ids == expected


def test_stop_string_cuts_the_text_before_it(tiny_model):
    tokenizer = LetterTokenizer()
    prompts = _prompts([7], seed=7)
    free = generate(tiny_model, prompts, SamplingParams(max_tokens=12), stop_token_ids=(), tokenizer=tokenizer)[0]
    stop = free.text[5:7]
    cut = free.text.find(stop)
    completion = generate(
        tiny_model, prompts, SamplingParams(max_tokens=12, stop=[stop, "never-there"]), stop_token_ids=(), tokenizer=tokenizer
    )[0]
    assert completion.finish_reason == "stop"
    assert completion.text == free.text[:cut]
    assert completion.token_ids == free.token_ids[: cut + len(stop)]  # up to the token completing the stop string


def test_rows_leaving_a_mixed_adapter_batch_keep_their_adapters(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    layers = inject_lora(model, model.linear_modules(), num_slots=3, max_rank=4)
    generator = torch.Generator().manual_seed(8)
    for layer in layers.values():
        for slot in range(3):
            A = torch.randn(4, layer.in_features, generator=generator) * 0.3
            B = torch.randn(layer.out_features, 4, generator=generator) * 0.3
            layer.set_slot(slot, A, B, scale=2.0)
    prompts = _prompts([4, 10, 6, 8], seed=9)
    slots = [2, -1, 0, 1]
    params = SamplingParams(max_tokens=10)
    alone = [
        generate(model, [p], params, stop_token_ids=(), routing=AdapterRouting.single(s, 1)).pop().token_ids
        for p, s in zip(prompts, slots)
    ]
    assert len({tuple(tokens) for tokens in alone}) == 4
    # A stop token from the middle of row 0 makes rows leave the batch at different steps.
    stop_token = alone[0][3]
    batched = generate(model, prompts, params, stop_token_ids=[stop_token], routing=AdapterRouting(torch.tensor(slots)))
    for tokens, completion in zip(alone, batched):
        expected = tokens[: tokens.index(stop_token)] if stop_token in tokens else tokens
        assert completion.token_ids == expected
    assert any(len(c.token_ids) == 10 for c in batched), "no row outlived the early finishers"


def test_routing_of_the_kept_rows_keeps_its_other_settings():
    routing = AdapterRouting(torch.tensor([3, -1, 5, 3]), shared_slot=7, task_ids=torch.tensor([0, 1, 2, 0]), num_tasks=3)
    kept = select_routing_rows(routing, torch.tensor([1, 2]))
    assert kept.slot_ids.tolist() == [-1, 5] and kept.task_ids.tolist() == [1, 2]
    assert (kept.shared_slot, kept.num_tasks) == (7, 3)
    assert kept.active_slots.tolist() == [5] and kept.row_to_active.tolist() == [-1, 0]
    assert select_routing_rows(None, torch.tensor([0])) is None


@pytest.mark.parametrize(
    "prompts, params, match",
    [
        ([], SamplingParams(), "prompts is empty"),
        ([[5], []], SamplingParams(), "prompt 1 is empty"),
        ([[5, 128]], SamplingParams(), "token id 128"),
        ([[5] * 250], SamplingParams(max_tokens=10), "max_position_embeddings"),
        ([[5]], SamplingParams(stop=["x"]), "tokenizer"),
    ],
)
def test_bad_requests_are_refused(tiny_model, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, prompts, params)


@pytest.mark.integration
def test_default_model_batch_matches_transformers_and_answers_paris():
    from backbone.model_source import load_pretrained, resolve_model

    model, tokenizer = load_pretrained("default", progress=False)
    reference = load_reference(resolve_model("default", progress=False))
    questions = ["What is the capital of France?", "Name three colours of the rainbow, briefly.", "Say hi."]
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in questions
    ]
    completions = generate(model, prompts, SamplingParams(max_tokens=24), tokenizer=tokenizer)
    assert completions[0].text == "The capital of France is Paris."
    assert completions[0].finish_reason == "stop"
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=24, eos_token_id=tokenizer.eos_token_ids, pad_token_id=0,
            )[0, len(prompt):].tolist()  # fmt: skip
        stop = next((i for i, t in enumerate(expected) if t in tokenizer.eos_token_ids), len(expected))
        assert completion.token_ids == expected[:stop]
