"""GGUF import against its references: the HF model the GGUF was written from, and transformers'
own GGUF loader. The tiny GGUF is written here the way llama.cpp's converter writes one,
q/k rows permuted, so the inverse permutation is checked without the default model."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from backbone import ModelLoadError, UnsupportedArchitectureError, load_model
from backbone.gguf_import import import_gguf, permute_rows, unpermute_rows
from backbone.tokenizer import Tokenizer
from tiny_models import load_reference, save_tiny_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, the answer is 42", "what is the capital"] * 20


def train_tiny_byte_level_bpe(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a tiny byte-level BPE: the specials, the 256 byte symbols, some merges."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
    return tokens, merges


def write_tiny_gguf(hf_folder: Path, path: Path, tokens: list[str], merges: list[str]) -> Path:
    """The HF folder as llama.cpp's convert_hf_to_gguf.py would write it (F32; a Llama's q/k permuted)."""
    config = json.loads((hf_folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    arch = config["model_type"]  # "llama" or "qwen2"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in load_file(hf_folder / "model.safetensors").items():
        values = tensor.float().numpy()
        if name.startswith("model.layers."):
            _, _, index, *module, kind = name.split(".")
            if arch == "llama" and module[-1] == "q_proj":
                values = permute_rows(values, heads)
            elif arch == "llama" and module[-1] == "k_proj":
                values = permute_rows(values, kv_heads)
            gguf_name = f"blk.{index}.{names[module[-1]]}.{kind}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_bpe() -> tuple[list[str], list[str]]:
    return train_tiny_byte_level_bpe()


def make_tiny_gguf(folder: Path, tiny_bpe, **overrides) -> tuple[Path, Path]:
    tokens, merges = tiny_bpe
    hf_folder = save_tiny_model(folder / "hf", vocab_size=len(tokens), **overrides)
    return hf_folder, write_tiny_gguf(hf_folder, folder / "tiny.gguf", tokens, merges)


def test_unpermute_inverts_llama_cpp_permute():
    weights = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_rows(permute_rows(weights, 8), 8), weights)
    assert not np.array_equal(permute_rows(weights, 8), weights)


SOURCES = {
    "llama_untied": dict(architecture="llama", tie_word_embeddings=False),
    "llama_tied": dict(architecture="llama", tie_word_embeddings=True),
    "qwen2_qkv_bias": dict(architecture="qwen2", tie_word_embeddings=False),
}


@pytest.mark.parametrize("source", SOURCES)
def test_imported_gguf_logits_match_source_model(tmp_path, tiny_bpe, source):
    tied = SOURCES[source]["tie_word_embeddings"]
    hf_folder, gguf_path = make_tiny_gguf(tmp_path, tiny_bpe, **SOURCES[source])
    folder = import_gguf(gguf_path, tmp_path / "imported", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    input_ids = torch.randint(3, len(tiny_bpe[0]), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_reference(hf_folder)(input_ids).logits
        actual = load_model(folder)(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_import_matches_transformers_gguf_loader(tmp_path, tiny_bpe, architecture):
    import transformers

    _, gguf_path = make_tiny_gguf(tmp_path, tiny_bpe, architecture=architecture)
    folder = import_gguf(gguf_path, tmp_path / "imported", progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    tokenizer = Tokenizer.from_folder(folder)
    chat = [{"role": "user", "content": "what is the capital?"}]
    prompt = tokenizer.apply_chat_template(chat)
    assert prompt == reference_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in [prompt, "the quick brown fox, 42!", "  spaced\n\nlines\t", "héllo wörld 😀 你好"]:
        assert tokenizer.encode(text) == reference_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.encode(text, add_special_tokens=True) == reference_tokenizer.encode(text), text
    input_ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(input_ids), reference(input_ids).logits, atol=1e-4, rtol=1e-4)


def test_import_writes_tokenizer_special_tokens_and_generation_config(tmp_path, tiny_bpe):
    _, gguf_path = make_tiny_gguf(tmp_path, tiny_bpe)
    folder = import_gguf(gguf_path, tmp_path / "imported", progress=False)
    tokenizer = Tokenizer.from_folder(folder)
    tokens = tiny_bpe[0]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_ids == [tokens.index("<|im_end|>")]
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.pad_token_id == tokens.index("<|endoftext|>")
    assert tokenizer.vocab_size == len(tokens)
    assert tokenizer.encode("<|im_start|>user") [0] == tokens.index("<|im_start|>")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokens.index("<|im_end|>")


def test_reimport_replaces_folder_and_leaves_no_temporaries(tmp_path, tiny_bpe):
    _, gguf_path = make_tiny_gguf(tmp_path, tiny_bpe)
    destination = tmp_path / "out" / "model"
    import_gguf(gguf_path, destination, progress=False)
    (destination / "stale.txt").write_text("from an older import")
    import_gguf(gguf_path, destination, progress=False)
    assert not (destination / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


def test_not_a_gguf_file_is_a_model_load_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_gguf_file_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out", progress=False)


def test_non_llama_gguf_is_unsupported(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        import_gguf(path, tmp_path / "out", progress=False)
