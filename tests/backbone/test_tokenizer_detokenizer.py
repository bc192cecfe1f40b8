"""Streaming detokenization: the deltas add up to the full decode and never hold a broken character."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from backbone.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from backbone.tokenizer import Tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world", "capital of france is paris"] * 10
TEXTS = [
    "Hello world, the quick brown fox!",
    "emoji 😀🎉👩‍👩‍👧 mixed with text",  # 4-byte characters and a zero-width-joined family
    "中文字符和日本語のテキスト",  # 3-byte characters, none in the training corpus
    "  leading spaces\n\nand ünïcödé accents",
    "<|im_start|>assistant\nParis.<|im_end|>",
]


def byte_level_tokenizer() -> Tokenizer:
    """Tiny vocabulary: characters outside the corpus are cut into single-byte tokens."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, {"eos_token": "<|im_end|>"})


def metaspace_tokenizer() -> Tokenizer:
    """Sentencepiece-style: the decoder drops the leading space of the first token decoded, so a
    token decoded alone reads differently from the same token in context; bytes fall back to <0xNN>."""
    trained = BackendTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    model = json.loads(trained.to_str())["model"]
    # Byte tokens are ordinary vocabulary (not special), as in Llama's sentencepiece vocabularies.
    vocab = {token: index for index, token in enumerate([f"<0x{b:02X}>" for b in range(256)] + list(model["vocab"]))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend, {"eos_token": "<|im_end|>"})


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request) -> Tokenizer:
    return byte_level_tokenizer() if request.param == "byte_level" else metaspace_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token) for token in ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_multibyte_character_is_emitted_whole_once_complete():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("😀")
    assert len(ids) == 4  # one token per UTF-8 byte in this tiny vocabulary
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(token) for token in ids] == ["", "", "", "😀"]


def test_truncated_character_is_flushed_as_replacement():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("ok 😀")[:-2]  # generation stopped inside the emoji
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.push(token) for token in ids)
    assert streamed == "ok "
    assert streamed + detokenizer.flush() == tokenizer.decode(ids)


def test_special_tokens_are_skipped_unless_asked():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>")
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tokenizer)
    assert "".join(kept.push(t) for t in ids) + kept.flush() == "<|im_start|>hi<|im_end|>"
    assert "".join(skipped.push(t) for t in ids) + skipped.flush() == "hi"
