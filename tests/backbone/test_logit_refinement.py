"""Next-token logits of a low-precision model: the top candidates recomputed in fp32."""

import torch
import torch.nn.functional as F

from backbone import load_model
from backbone.logit_refinement import refine_top_logits


def test_a_near_tie_lost_to_bf16_rounding_goes_to_the_larger_logit():
    # True logits 16.0 and 16.03125; bf16 keeps 0.125 steps near 16, so both round to 16.0 and
    # the rounded argmax is token 0. The refined logits pick token 1, as fp32 does.
    hidden = torch.ones(1, 1, 4, dtype=torch.bfloat16)
    weight = torch.tensor([[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.03125], [1.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    rounded = F.linear(hidden, weight)
    assert rounded[0, 0, 0] == rounded[0, 0, 1]
    refined = refine_top_logits(rounded, hidden, weight, None, candidates=2)
    assert refined.dtype == torch.float32
    assert int(refined[0, 0].argmax()) == int(F.linear(hidden.float(), weight.float())[0, 0].argmax()) == 1


def test_refined_candidates_are_the_fp32_products_and_the_rest_are_unchanged():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 1, 32, generator=generator).bfloat16()
    weight = torch.randn(100, 32, generator=generator).bfloat16()
    bias = torch.randn(100, generator=generator).bfloat16()
    rounded = F.linear(hidden, weight, bias)
    refined = refine_top_logits(rounded, hidden, weight, bias, candidates=5)
    exact = F.linear(hidden.float(), weight.float(), bias.float())
    top = rounded.topk(5, dim=-1).indices
    torch.testing.assert_close(refined.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=1e-5)
    others = torch.ones_like(refined, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(refined[others], rounded.float()[others])


def test_a_bf16_model_returns_refined_fp32_next_token_logits(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    input_ids = torch.tensor([[5, 9, 17, 33], [7, 7, 2, 40]])
    with torch.inference_mode():
        last = model(input_ids, logits_for="last")
        hidden = model.hidden_states(input_ids, torch.arange(4).expand(2, 4), plain_causal=True)[:, -1:]
    assert last.dtype == torch.float32
    expected = refine_top_logits(F.linear(hidden, model.lm_head.weight), hidden, model.lm_head.weight, None)
    torch.testing.assert_close(last, expected)
    # fp32 models are untouched: their logits are already exact.
    assert load_model(tiny_llama_dir)(input_ids, logits_for="last").dtype == torch.float32
