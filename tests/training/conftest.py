import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # training_toy, the helpers these tests share

from tiny_models import save_tiny_model  # noqa: E402

# A chat template in the usual shape: role markers, an end-of-turn token, a generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<unk>"]


def save_tiny_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A 128-token word-level tokenizer: the specials, the numbers 0..99 and a few words."""
    words = [str(n) for n in range(100)] + ["what", "is", "plus", "minus", "the", "answer", "yes", "no",
                                             "reverse", "copy", "say", "hello", "a", "b", "c", "d", "e", "f", "g", "h"]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    assert len(vocab) == 128
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose lm_head is large enough to express confident predictions
    (initializer_range 0.2), with a word-level tokenizer and chat template."""
    folder = save_tiny_model(tmp_path_factory.mktemp("toy_llama"), initializer_range=0.2)
    save_tiny_tokenizer(folder)
    return folder
