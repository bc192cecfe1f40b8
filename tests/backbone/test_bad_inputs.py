"""Each bad model input fails with a specific error whose one-line message names the problem,
from the library and from the `loraplex` command (exit code 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from backbone import ModelLoadError, UnsupportedArchitectureError, load_model
from backbone.model_source import load_pretrained, resolve_model
from server.cli import main

REPO = Path(__file__).resolve().parents[2]


def broken_copy(source: Path, destination: Path, kind: str) -> Path:
    """A copy of the tiny model folder with one defect."""
    shutil.copytree(source, destination)
    weights = destination / "model.safetensors"
    if kind == "unsupported_architecture":
        config = json.loads((destination / "config.json").read_text())
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (destination / "config.json").write_text(json.dumps(config))
    elif kind == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "missing_tensor":
        state = load_file(weights)
        del state["model.layers.1.mlp.down_proj.weight"]
        save_file(state, weights)
    elif kind == "no_config":
        (destination / "config.json").unlink()
    return destination


CASES = {
    # kind: (error type, words the message must contain)
    "missing_folder": (ModelLoadError, "does not exist"),
    "unsupported_architecture": (UnsupportedArchitectureError, "'GPT2LMHeadModel' is not supported"),
    "truncated_weights": (ModelLoadError, "truncated or corrupt"),
    "missing_tensor": (ModelLoadError, "'model.layers.1.mlp.down_proj.weight'"),
    "no_config": (ModelLoadError, "needs config.json"),
}


@pytest.fixture(params=CASES)
def bad_folder(request, tiny_llama_dir, tmp_path) -> tuple[Path, str]:
    if request.param == "missing_folder":
        return tmp_path / "no_such_model", request.param
    return broken_copy(tiny_llama_dir, tmp_path / request.param, request.param), request.param


def test_load_model_names_the_problem(bad_folder):
    folder, kind = bad_folder
    error_type, words = CASES[kind]
    with pytest.raises(error_type) as caught:
        load_model(folder)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_cli_prints_one_line_error(bad_folder, capsys):
    folder, kind = bad_folder
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraplex generate: error: ")
    # `--model` is resolved first, which words a missing path its own way.
    words = "not found: no such folder" if kind == "missing_folder" else CASES[kind][1]
    assert words in lines[0] and captured.out == ""


def test_cli_subprocess_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--model", str(tmp_path / "absent"), "--prompt", "hi"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"loraplex generate: error: model {str(tmp_path / 'absent')!r} not found: no such folder or file; pass "
        "`default`, a Hugging Face model folder (config.json + model.safetensors) or a .gguf file"
    ]


def test_folder_without_tokenizer_is_refused_by_load_pretrained(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="needs a tokenizer.json"):
        load_pretrained(tiny_llama_dir)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf file"):
        resolve_model(path)
