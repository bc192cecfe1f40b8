"""Score and generate eval examples under several systems in one mixed batch.

A system is a LoRA slot of one model (0, 1, ...) or the base alone (-1). Every example runs once
per system in the same forward call, so S systems cost one pass over the data with S times the
rows, not S passes. `loraplex compare` (two adapters and the base) and `loraplex eval` (any number
of adapters and the base, every task) both read their numbers from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adapters.injection import inject_lora
from adapters.lora_layer import LoraLinear
from adapters.routing import AdapterRouting
from adapters.weights import AdapterWeights, clear_slot, write_to_slot
from backbone.generate import Completion, generate
from backbone.model import CausalLM
from backbone.sampling import SamplingParams
from training.batching import IGNORE_INDEX, collate, pack_by_length
from training.data import Example

BASE_SLOT = -1  # no adapter: the base model alone


def place_adapters(model: CausalLM, adapters: Sequence[AdapterWeights]) -> dict[str, LoraLinear]:
    """LoRA layers with one slot per adapter on the union of their targets; adapter i in slot i.
    A model that has LoRA layers already keeps them and needs enough slots."""
    if not adapters:
        return {}
    targets = sorted(set().union(*(adapter.tensors for adapter in adapters)))
    layers = inject_lora(model, targets, num_slots=len(adapters), max_rank=max(a.max_rank for a in adapters))
    if min(layer.num_slots for layer in layers.values()) < len(adapters):
        raise ValueError(
            f"the model already has LoRA layers with fewer than {len(adapters)} slots; load a fresh model to score "
            f"{len(adapters)} adapters side by side"
        )
    for slot, adapter in enumerate(adapters):
        write_to_slot(layers, slot, adapter)
    return layers


def clear_adapters(layers: dict[str, LoraLinear], count: int) -> None:
    for slot in range(count):
        clear_slot(layers, slot)


def pad_id_of(tokenizer: object) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else pad  # padding is never attended to nor labelled: any id works


def example_groups(lengths: Sequence[int], systems: int, batch_tokens: int) -> list[list[int]]:
    """Example indices per forward call; every example becomes one row per system."""
    return pack_by_length(lengths, max(1, batch_tokens // systems))


@torch.inference_mode()
def answer_losses(
    model: CausalLM, examples: Sequence[Example], slots: Sequence[int], batch_tokens: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, S) summed answer-token losses and (N, S) answer-token counts, columns in `slots` order."""
    device = model.inv_freq.device
    sums = np.zeros((len(examples), len(slots)))
    counts = np.zeros((len(examples), len(slots)))
    for group in example_groups([len(e) for e in examples], len(slots), batch_tokens):
        rows = [(slot, examples[index]) for index in group for slot in slots]
        batch = collate(rows, pad_id)
        labels = batch.labels.to(device)
        routing = AdapterRouting(batch.task_ids.to(device))  # the "task" of each row is its slot
        logits = model(batch.input_ids.to(device), routing=routing)  # (R, L, V)
        token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)  # (R, L)
        sums[group] = token.sum(1).double().cpu().numpy().reshape(len(group), len(slots))
        counts[group] = (labels != IGNORE_INDEX).sum(1).cpu().numpy().reshape(len(group), len(slots))
    return sums, counts


def answer_span(example: Example) -> tuple[list[int], list[int]]:
    """(prompt, reference): the tokens before the first answer token, and that answer's tokens
    (the first run of answer tokens; later turns of a chat are not generated)."""
    start = example.loss_mask.index(True)
    end = start
    while end < len(example) and example.loss_mask[end]:
        end += 1
    return example.input_ids[:start], example.input_ids[start:end]


def greedy_answers(
    model: CausalLM,
    tokenizer: object,
    prompts: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    slots: Sequence[int],
    batch_tokens: int,
) -> list[list[Completion]]:
    """[item][system] greedy completions of every prompt under every slot, mixed in one batch per
    group of prompts; item i gets at most `max_new_tokens[i]` tokens, whatever its group."""
    device = model.inv_freq.device
    if any(not prompt for prompt in prompts):
        raise ValueError("an eval example starts with its answer; generation needs a prompt to continue")
    results: list[list[Completion]] = [[] for _ in prompts]
    lengths = [len(prompt) + budget for prompt, budget in zip(prompts, max_new_tokens)]
    for group in example_groups(lengths, len(slots), batch_tokens):
        rows = [prompts[index] for index in group for _ in slots]
        routing = AdapterRouting(torch.tensor([slot for _ in group for slot in slots], device=device))
        longest = max(max_new_tokens[index] for index in group)
        completions = generate(
            model, rows, SamplingParams(max_tokens=longest, temperature=0.0), tokenizer=tokenizer, routing=routing
        )
        for position, index in enumerate(group):
            row_completions = completions[position * len(slots) : (position + 1) * len(slots)]
            results[index] = [_cut(completion, max_new_tokens[index], tokenizer) for completion in row_completions]
    return results


def _cut(completion: Completion, budget: int, tokenizer: object) -> Completion:
    """The completion as if it had been generated alone with its own budget: greedy tokens do not
    depend on the batch, only the group's longer budget may have let it run on."""
    if len(completion.token_ids) <= budget:
        return completion
    token_ids = completion.token_ids[:budget]
    return Completion(token_ids, tokenizer.decode(token_ids), "length")
