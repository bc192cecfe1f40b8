"""--device / --dtype on every command: serve's flags and config keys, and the one-line errors
of a device or dtype this machine cannot use."""

from __future__ import annotations

import pytest
import torch

from backbone.precision import cpu_has_native_bf16
from server.cli import build_parser, main
from server.serve_command import settings_from_args
from engine_fixtures import save_tiny_model_with_tokenizer


def parse(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_flags_and_config_keys_pick_device_and_dtype(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: default\ndevice: cpu\ndtype: bf16\ngpu_memory_fraction: 0.5\n")
    settings = parse("--config", str(config))
    assert (settings.device, settings.dtype, settings.engine.gpu_memory_fraction) == ("cpu", "bfloat16", 0.5)
    settings = parse("--config", str(config), "--dtype", "float32")  # a flag wins over the file
    assert settings.dtype == "float32"


def test_serve_auto_follows_the_machine():
    settings = parse()
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    expected_dtype = "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"
    assert (settings.device, settings.dtype) == (expected_device, expected_dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["serve", "generate", "train", "compare"])
def test_cuda_without_cuda_is_a_one_line_error_naming_the_flag(command, tmp_path, capsys):
    argv = {
        "serve": ["serve", "--model", "default"],
        "generate": ["generate", "--model", "default", "--prompt", "hi"],
        "train": ["train", str(_train_config(tmp_path))],
        "compare": ["compare", "--model", "default", "--a", str(tmp_path), "--b", str(tmp_path), "--eval", "x.jsonl"],
    }[command]
    assert main([*argv, "--device", "cuda"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"loraplex {command}: error: --device cuda but this machine has no usable CUDA")
    assert "use --device cpu, or install a CUDA build of torch" in lines[0]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_unknown_dtype_is_a_one_line_error_naming_the_flag(command, capsys):
    argv = ["serve"] if command == "serve" else ["generate", "--prompt", "hi"]
    assert main([*argv, "--dtype", "float8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"loraplex {command}: error: --dtype 'float8' is not a dtype we serve; use auto, float32, bfloat16 or float16"
    ]


def test_unknown_device_is_a_one_line_error(capsys):
    assert main(["generate", "--prompt", "hi", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "loraplex generate: error: --device 'tpu' is not a device we run on; use auto, cpu, cuda or cuda:N"
    )


def test_float16_generate_runs_on_this_cpu_and_agrees_with_float32(tmp_path, capsys):
    # Every op the model uses has a CPU fp16 kernel in this torch (matmul, SDPA, embedding,
    # index_copy_, sort/top-k sampling), so --dtype float16 is served, not refused.
    folder = save_tiny_model_with_tokenizer(tmp_path / "model")
    outputs = {}
    for dtype in ("float32", "float16"):
        argv = ["generate", "--model", str(folder), "--prompt", "w5 w17 w40", "--max-tokens", "6", "--dtype", dtype]
        assert main(argv) == 0
        outputs[dtype] = capsys.readouterr().out
    assert outputs["float16"] == outputs["float32"] and outputs["float32"].strip()


def _train_config(tmp_path):
    import json

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"model": "default", "output_dir": str(tmp_path / "run"), "tasks": [{"name": "t", "train": "x.jsonl"}]}))
    return path
