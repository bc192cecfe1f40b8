"""Offline A/B comparison of two adapters: the mixed A/B/base batch against single-adapter runs,
the statistics on known cases, and `loraplex compare`."""

import json

import pytest
import torch
import torch.nn.functional as F
from training_files import addition_records, toy_config, write_config, write_jsonl

from adapters.config import LoraConfig
from adapters.injection import inject_lora
from adapters.peft_io import load_adapter, save_adapter
from adapters.routing import AdapterRouting
from adapters.weights import AdapterWeights, write_to_slot
from backbone.generate import generate
from backbone.model_source import load_pretrained
from backbone.sampling import SamplingParams
from server.cli import main
from training.ab_compare import compare_adapters, write_outputs
from training.batching import IGNORE_INDEX, collate
from training.config import load_config
from training.data import Example, load_task_file
from training.recipe import MultiTaskTrainer


def _random_adapter(model, targets, r, seed, path):
    """An adapter with random A and B (B = 0 would make it the base model)."""
    generator = torch.Generator().manual_seed(seed)
    weights = AdapterWeights.initialized(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), model, generator)
    for name, (lora_A, lora_B) in weights.tensors.items():
        weights.tensors[name] = (lora_A, torch.randn(lora_B.shape, generator=generator) * 0.2)
    return save_adapter(path, weights)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("eval") / "add_eval.jsonl", addition_records(12, 5))


@pytest.fixture(scope="module")
def trained_pair(toy_model_dir, tmp_path_factory):
    """(untrained adapter with B = 0, the same adapter after training on the addition task)."""
    root = tmp_path_factory.mktemp("ab_train")
    config = toy_config(root, toy_model_dir, "run", shared=False, max_steps=12, eval={"every": 0}, checkpoint={"every": 0})
    config["tasks"] = config["tasks"][:1]
    trainer = MultiTaskTrainer(load_config(write_config(root / "train.json", config)))
    untrained = save_adapter(root / "untrained", AdapterWeights.initialized(
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), trainer.model))
    trainer.train()
    return untrained, root / "run" / "last" / "add"


def _alone_loss(model_dir, adapter, example) -> float:
    """The oracle: one example, one adapter, a fresh single-slot model."""
    model, _ = load_pretrained(model_dir, progress=False)
    weights = load_adapter(adapter, model.config)
    write_to_slot(inject_lora(model, weights.tensors, num_slots=1, max_rank=weights.max_rank), 0, weights)
    batch = collate([(0, example)], pad_id=0)
    with torch.no_grad():
        logits = model(batch.input_ids, routing=AdapterRouting.single(0, 1))[0]  # (L, V)
    return float(F.cross_entropy(logits, batch.labels[0], ignore_index=IGNORE_INDEX))


def test_mixed_batch_losses_match_each_adapter_alone(toy_model_dir, eval_file, tmp_path):
    model, tokenizer = load_pretrained(toy_model_dir, progress=False)
    # Different targets and ranks: the slots hold the union, each adapter only its own modules.
    a = _random_adapter(model, ["q_proj", "v_proj"], 4, 1, tmp_path / "a")
    b = _random_adapter(model, ["v_proj", "down_proj", "up_proj"], 2, 2, tmp_path / "b")
    examples = load_task_file(eval_file, "instruction", tokenizer, 256).examples[:5]
    report = compare_adapters(model, tokenizer, a, b, examples, batch_tokens=60)  # several mixed batches
    for index, example in enumerate(examples):
        assert report.losses["a"][index] == pytest.approx(_alone_loss(toy_model_dir, a, example), abs=1e-5)
        assert report.losses["b"][index] == pytest.approx(_alone_loss(toy_model_dir, b, example), abs=1e-5)
    base, _ = load_pretrained(toy_model_dir, progress=False)
    batch = collate([(0, examples[0])], pad_id=0)
    with torch.no_grad():
        base_loss = F.cross_entropy(base(batch.input_ids)[0], batch.labels[0], ignore_index=IGNORE_INDEX)
    assert report.losses["base"][0] == pytest.approx(float(base_loss), abs=1e-5)
    assert report.losses["a"] != report.losses["b"]


def test_an_adapter_against_itself_differs_by_zero(toy_model_dir, eval_file, tmp_path):
    model, tokenizer = load_pretrained(toy_model_dir, progress=False)
    a = _random_adapter(model, ["q_proj", "v_proj"], 4, 1, tmp_path / "a")
    examples = load_task_file(eval_file, "instruction", tokenizer, 256).examples
    report = compare_adapters(model, tokenizer, a, a, examples)
    assert report.difference == pytest.approx(0.0, abs=1e-6)
    low, high = report.difference_ci95
    assert low <= 1e-6 and high >= -1e-6
    assert report.examples == len(examples) == 12
    assert report.arms["a"].mean_loss == pytest.approx(report.arms["b"].mean_loss, abs=1e-6)


def test_a_trained_adapter_beats_its_untrained_start(toy_model_dir, eval_file, trained_pair):
    model, tokenizer = load_pretrained(toy_model_dir, progress=False)
    untrained, trained = trained_pair
    examples = load_task_file(eval_file, "instruction", tokenizer, 256).examples
    report = compare_adapters(model, tokenizer, untrained, trained, examples, exact_match=True)
    assert report.difference < 0 and report.difference_ci95[1] < 0  # B (trained) lower, the CI excludes 0
    assert report.win_rate_b > 0.5
    assert report.arms["a"].mean_loss == pytest.approx(report.arms["base"].mean_loss, abs=1e-5)  # B = 0: the base
    assert report.arms["b"].perplexity < report.arms["a"].perplexity
    assert all(0.0 <= report.arms[arm].exact_match <= 1.0 for arm in ("a", "b", "base"))
    # The bootstrap has a fixed seed: the same comparison gives the same CI.
    again = compare_adapters(model, tokenizer, untrained, trained, examples)
    assert again.difference_ci95 == report.difference_ci95


def test_cli_writes_report_and_chart(toy_model_dir, eval_file, trained_pair, tmp_path, capsys):
    untrained, trained = trained_pair
    out = tmp_path / "out"
    code = main(["compare", "--model", str(toy_model_dir), "--a", str(untrained), "--b", str(trained),
                 "--eval", str(eval_file), "--out", str(out), "--max-examples", "6"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["examples"] == 6 and len(report["losses"]["b"]) == 6
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "report.json"]  # no temporary files left
    printed = capsys.readouterr().out
    assert '"format": "instruction"' in printed and f"wrote {out / 'report.json'}" in printed


def test_cli_missing_adapter_is_a_one_line_error(toy_model_dir, eval_file, trained_pair, tmp_path, capsys):
    _, trained = trained_pair
    code = main(["compare", "--model", str(toy_model_dir), "--a", str(tmp_path / "nope"), "--b", str(trained),
                 "--eval", str(eval_file), "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("loraplex compare: error: adapter A") and str(tmp_path / "nope") in error
    assert "\n" not in error
    assert not (tmp_path / "out").exists()


def test_cli_bad_eval_line_and_foreign_adapter_name_the_problem(toy_model_dir, trained_pair, tmp_path, capsys):
    untrained, trained = trained_pair
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "what is 1 plus 2", "output": "3"}\n{"instruction": 7}\n')
    assert main(["compare", "--model", str(toy_model_dir), "--a", str(untrained), "--b", str(trained), "--eval", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    weights = load_adapter(trained, load_pretrained(toy_model_dir, progress=False)[0].config)
    weights.tensors = {name: (a[:, :32], b) for name, (a, b) in weights.tensors.items()}  # another model's widths
    save_adapter(foreign, weights)
    good = write_jsonl(tmp_path / "good.jsonl", addition_records(3, 0))
    assert main(["compare", "--model", str(toy_model_dir), "--a", str(untrained), "--b", str(foreign), "--eval", str(good)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("loraplex compare: error: adapter B:") and "different base model" in error


def test_write_outputs_replaces_an_earlier_report(toy_model_dir, eval_file, tmp_path):
    model, tokenizer = load_pretrained(toy_model_dir, progress=False)
    a = _random_adapter(model, ["q_proj"], 2, 3, tmp_path / "a")
    examples = load_task_file(eval_file, "instruction", tokenizer, 256).examples[:3]
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    write_outputs(compare_adapters(model, tokenizer, a, a, examples, resamples=50), out)
    assert json.loads((out / "report.json").read_text())["bootstrap"] == {"resamples": 50, "seed": 0}


def test_exact_match_counts_answers_equal_to_the_greedy_output(toy_model_dir, eval_file, tmp_path):
    model, tokenizer = load_pretrained(toy_model_dir, progress=False)
    a = _random_adapter(model, ["q_proj", "v_proj", "down_proj"], 4, 1, tmp_path / "a")
    prompts = [e.input_ids[: e.loss_mask.index(True)] for e in load_task_file(eval_file, "instruction", tokenizer, 256).examples[:4]]
    # References the base model produces itself (no stop token, so nothing is skipped in decoding).
    greedy = generate(model, prompts, SamplingParams(max_tokens=3), stop_token_ids=())
    examples = [Example(p + c.token_ids, [False] * len(p) + [True] * 3) for p, c in zip(prompts, greedy)]
    report = compare_adapters(model, tokenizer, a, a, examples, exact_match=True)
    assert report.arms["base"].exact_match == 1.0
    assert report.arms["a"].exact_match == report.arms["b"].exact_match
