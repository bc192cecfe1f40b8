"""The PEFT reference of bench/train.py computes the training loss ours does, padded and packed
alike: the benchmark's speed and memory ratios compare the same work."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))

from tiny_models import save_tiny_model  # noqa: E402
from train import make_batch, peft_model, reference_inputs  # noqa: E402

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tied_llama"), tie_word_embeddings=True)
    model = peft_model(folder, torch.float32, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, so every LoRA weight has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def test_lora_on_the_seven_projections_only(reference):
    wrapped = {name.rsplit(".", 1)[-1] for name, module in reference.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_padded_and_packed_reference_losses_equal_answer_token_cross_entropy(reference):
    batch = make_batch(rows=6, length=40, vocab=128, tasks=4, seed=3)
    assert len(set(batch.lengths.tolist())) > 1  # padding to remove
    with torch.no_grad():
        logits = reference(input_ids=batch.input_ids, use_cache=False).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum") / batch.num_answer_tokens

    padded_loss, padded_grads = loss_and_grads(reference, reference_inputs(batch, packed=False))
    packed_inputs = reference_inputs(batch, packed=True)
    assert packed_inputs["input_ids"].shape == (1, int(batch.lengths.sum()))
    packed_loss, packed_grads = loss_and_grads(reference, packed_inputs)

    torch.testing.assert_close(padded_loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed_loss, expected, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        assert padded_grads[name].abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_do_not_see_each_other(reference):
    """A row's packed losses do not change when the row before it changes (block-diagonal mask)."""
    batch = make_batch(rows=3, length=30, vocab=128, tasks=1, seed=5)
    inputs = reference_inputs(batch, packed=True)
    first = int(batch.lengths[0])
    changed = {name: tensor.clone() for name, tensor in inputs.items()}
    changed["input_ids"][0, :first] = (changed["input_ids"][0, :first] + 7) % 128
    with torch.no_grad():
        logits = reference(**inputs, use_cache=False).logits[0, first:]
        changed_logits = reference(**changed, use_cache=False).logits[0, first:]
    torch.testing.assert_close(changed_logits, logits, rtol=1e-5, atol=1e-5)
