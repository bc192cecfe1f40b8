"""Sampling against references: transformers' top-k/top-p filters and the softmax distribution."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from backbone.sampling import SamplingParams, filtered_probs, sample_next_tokens


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("seed", -3),
        ("seed", "7"),
        ("stop", [""]),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_all_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    tokens = sample_next_tokens(logits, [SamplingParams()] * 5, [None] * 5)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_ties_pick_the_first_maximum():
    logits = torch.zeros(2, 10)
    logits[0, [3, 6]] = 1.0
    logits[1, [0, 9]] = 2.0
    assert sample_next_tokens(logits, [SamplingParams()] * 2, [None] * 2).tolist() == [3, 0]


def test_greedy_rows_stay_argmax_beside_sampled_rows():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=2.0)]
    tokens = sample_next_tokens(logits, params, [None] * 4)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def _reference_kept_sets(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> list[set[int]]:
    kept = []
    for row in range(logits.shape[0]):
        scores = logits[row : row + 1].clone()
        if top_k[row] > 0:
            scores = TopKLogitsWarper(top_k[row])(None, scores)
        if top_p[row] < 1.0:
            scores = TopPLogitsWarper(top_p[row])(None, scores)
        kept.append(set(torch.isfinite(scores[0]).nonzero().flatten().tolist()))
    return kept


def test_top_k_top_p_keep_the_same_tokens_as_transformers():
    generator = torch.Generator().manual_seed(2)
    top_k = [0, 5, 20, 0, 7, 1, 0, 64]
    top_p = [0.9, 1.0, 0.5, 0.3, 0.95, 1.0, 0.05, 0.99]
    for trial in range(5):
        logits = torch.randn(len(top_k), 64, generator=generator) * (1 + trial)
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        probs = filtered_probs(sorted_logits, top_k, top_p)
        ours = [set(sorted_ids[row][probs[row] > 0].tolist()) for row in range(len(top_k))]
        assert ours == _reference_kept_sets(logits, top_k, top_p)


def test_sampled_frequencies_follow_the_filtered_softmax():
    vocab, draws, temperature, top_k = 30, 40_000, 0.7, 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    scaled = logits / temperature
    kept = scaled.topk(top_k).indices
    expected = torch.zeros(vocab)
    expected[kept] = torch.softmax(scaled[kept], dim=0)
    params = [SamplingParams(temperature=temperature, top_k=top_k)] * draws
    torch.manual_seed(4)
    tokens = sample_next_tokens(logits.expand(draws, vocab).clone(), params, [None] * draws)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k"
    want = expected[kept].double() * draws
    chi_square = float(((counts[kept] - want) ** 2 / want).sum())
    degrees = top_k - 1
    assert chi_square < degrees + 6 * (2 * degrees) ** 0.5  # far in the tail of chi2(11) only if wrong


def test_seeded_row_is_reproducible_whatever_shares_its_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone_gen = seeded.make_generator()
    alone = [int(sample_next_tokens(logits[1:2], [seeded], [alone_gen])) for _ in range(20)]
    mixed_gen = seeded.make_generator()
    others = [SamplingParams(), seeded, SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=2.0)]
    mixed = []
    for _ in range(20):
        tokens = sample_next_tokens(logits, others, [None, mixed_gen, None, SamplingParams(seed=9).make_generator()])
        mixed.append(int(tokens[1]))
    assert alone == mixed
    assert len(set(alone)) > 1  # it really sampled


def test_row_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="one of each per row"):
        sample_next_tokens(torch.zeros(2, 10), [SamplingParams()], [None, None])
