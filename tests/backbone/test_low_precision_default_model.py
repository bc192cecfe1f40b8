"""The default model (SmolLM2-135M-Instruct) in bf16 and fp16 against our own fp32: the same
greedy text for the first 8 tokens on 5 prompts, and the mean |delta logit| reported.

The prompts have answers the model is sure of. An open-ended one ("Write a short greeting for a
birthday card.") has its first two candidates 0.11 apart in fp32, below bf16's spacing of 0.125 at
logits near 23: it flips in bf16 here and in transformers alike (same bf16 logits), so it tests
the coin, not the code."""

from __future__ import annotations

import json

import pytest
import torch

from backbone.generate import generate, pad_prompts
from backbone.model_source import load_pretrained
from backbone.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 7?",
    "What is the largest planet in the solar system?",
]
GREEDY_TOKENS = 8


def _run(dtype: torch.dtype) -> tuple[list[list[int]], list[torch.Tensor]]:
    model, tokenizer = load_pretrained("default", dtype=dtype, progress=False)
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        for text in PROMPTS
    ]
    completions = generate(model, prompts, SamplingParams(max_tokens=GREEDY_TOKENS), tokenizer=tokenizer)
    input_ids, lengths = pad_prompts(prompts)  # right padding changes no real position's logits
    with torch.no_grad():  # each prompt's logits at every real position, for the |delta| figure
        logits = model(input_ids).float()
    return [c.token_ids for c in completions], [logits[row, :length] for row, length in enumerate(lengths.tolist())]


@pytest.fixture(scope="module")
def fp32_run():
    return _run(torch.float32)


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_greedy_text_matches_fp32(fp32_run, dtype):
    expected_tokens, expected_logits = fp32_run
    tokens, logits = _run(dtype)
    delta = torch.cat([(ours - ref).abs().reshape(-1) for ours, ref in zip(logits, expected_logits)])
    figure = {"dtype": str(dtype).removeprefix("torch."), "mean_abs_delta_logit": round(delta.mean().item(), 4),
              "max_abs_delta_logit": round(delta.max().item(), 3), "prompts": len(PROMPTS), "greedy_tokens": GREEDY_TOKENS}
    print(json.dumps(figure))  # the reported figure (pytest -s shows it)
    assert delta.mean().item() > 0  # the low precision really ran
    for index, (ours, reference) in enumerate(zip(tokens, expected_tokens)):
        assert ours[:GREEDY_TOKENS] == reference[:GREEDY_TOKENS], f"prompt {index}: {PROMPTS[index]!r}"
