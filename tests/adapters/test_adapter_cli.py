"""`loraplex adapter validate | merge | list` through the real command-line entry point."""

import json

import torch
from adapter_fixtures import our_adapter

from adapters.peft_io import save_adapter
from adapters.store import AdapterStore
from backbone import load_model
from server.cli import main


def test_validate_prints_a_one_line_summary(tiny_llama_dir, tmp_path, capsys):
    adapter = save_adapter(tmp_path / "a", our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert main(["adapter", "validate", str(adapter), "--model", str(tiny_llama_dir), "--max-rank", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK ")
    assert "rank 4" in out[0] and "4 modules (q_proj x2, v_proj x2)" in out[0] and "1,792 params" in out[0]  # 2 x (4x64 + 64x4 + 4x64 + 32x4)


def test_validate_reports_the_error_and_exits_2(tiny_llama_dir, tmp_path, capsys):
    adapter = save_adapter(tmp_path / "a", our_adapter(tiny_llama_dir, r=8, lora_alpha=8, target_modules=["q_proj"]))
    assert main(["adapter", "validate", str(adapter), "--model", str(tiny_llama_dir), "--max-rank", "4"]) == 2
    assert "above the maximum rank 4" in capsys.readouterr().err


def test_validate_strict_base(tiny_llama_dir, tmp_path, capsys):
    adapter = save_adapter(tmp_path / "a", our_adapter(tiny_llama_dir, r=4, target_modules=["q_proj"]))
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "other/model"}))
    assert main(["adapter", "validate", str(adapter), "--model", str(tiny_llama_dir)]) == 0
    assert "warning: adapter was trained on base model 'other/model'" in capsys.readouterr().out
    assert main(["adapter", "validate", str(adapter), "--model", str(tiny_llama_dir), "--strict-base"]) == 2


def test_merge_writes_a_loadable_folder(tiny_llama_dir, tmp_path):
    weights = our_adapter(tiny_llama_dir, r=4, lora_alpha=8, target_modules="all-linear")
    adapter = save_adapter(tmp_path / "a", weights)
    out = tmp_path / "merged"
    assert main(["adapter", "merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    merged, base = load_model(out), load_model(tiny_llama_dir)
    name = "model.layers.0.mlp.up_proj"
    expected = base.linear_modules()[name].weight + weights.delta(name)
    torch.testing.assert_close(merged.linear_modules()[name].weight, expected, atol=1e-6, rtol=0)
    # An existing output folder is never overwritten.
    assert main(["adapter", "merge", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(out)]) == 2


def test_list_shows_names_versions_and_latest(tiny_llama_dir, tmp_path, capsys):
    store = AdapterStore(tmp_path / "store")
    weights = our_adapter(tiny_llama_dir, r=4, target_modules=["q_proj"])
    store.put("sql", weights)
    store.put("sql", weights)
    store.put("chat", weights)
    assert main(["adapter", "list", "--root", str(store.root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["chat\tlatest=v1\tversions=v1", "sql\tlatest=v2\tversions=v1,v2"]
