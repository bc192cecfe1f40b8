"""A live server for the HTTP tests: a tiny random model with a character-level tokenizer and a
chat template, PEFT-format adapters under an adapter root, and uvicorn on a loopback port.

Imported by the other HTTP test modules; its own tests check the harness's tokenizer."""

from __future__ import annotations

import json
import socket
import string
import threading
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, processors

from backbone.tokenizer import Tokenizer
from engine_fixtures import save_random_adapter
from server.app import ServerSettings, ServerState, create_app
from server.drain import DrainState
from server.edge_server import uvicorn_config
from tiny_models import TINY_LLAMA, save_tiny_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_char_tokenizer(folder: Path) -> None:
    """Every printable ASCII character is a token (no merges), so any text round-trips; filler
    pairs make the vocabulary exactly the tiny model's 128 so every sampled id decodes."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in string.printable:
        if char not in "\t\r\x0b\x0c":
            vocab[char] = len(vocab)
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
                 "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha"):
        vocab[pair] = len(vocab)
    assert len(vocab) == TINY_LLAMA["vocab_size"]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(  # BOS on plain prompts, as Llama adds it
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }))


# A longer context than the tiny default, so a generation can run long enough (seconds) for a
# test to disconnect in the middle of it.
MAX_CONTEXT = 2048


def make_model_folder(folder: Path) -> Path:
    save_tiny_model(folder, seed=0, max_position_embeddings=MAX_CONTEXT)
    save_char_tokenizer(folder)
    return folder


def make_adapters(model_dir: Path, root: Path, names_and_seeds: dict[str, int]) -> dict[str, Path]:
    return {name: save_random_adapter(root / name, model_dir, seed=seed) for name, seed in names_and_seeds.items()}


class LiveServer:
    def __init__(self, settings: ServerSettings, drain: DrainState | None = None) -> None:
        self.app = create_app(settings, drain)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    def start(self) -> None:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return
            if not self.thread.is_alive():
                raise RuntimeError("the test server failed to start; see the log above")
            self.thread.join(0.05)
        raise RuntimeError("the test server did not start within 30 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@contextmanager
def live_server(settings: ServerSettings):
    server = LiveServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_char_tokenizer_round_trips_text_and_renders_chat(tmp_path):
    save_char_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_folder(tmp_path)
    text = "Hello, world! 42 {json: [1, 2]}\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.bos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode(prompt)[0] == SPECIALS.index("<|im_start|>")
    assert all(tokenizer.decode([i], skip_special_tokens=False) for i in range(TINY_LLAMA["vocab_size"]))
