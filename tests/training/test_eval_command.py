"""`loraplex eval` end to end on a tiny model: the report's numbers against an independent
computation (each adapter alone on a fresh model, each item alone), and the errors users meet."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_model
from training_files import addition_records, chat_records, copy_records, toy_config, write_config, write_jsonl

from adapters.injection import inject_lora
from adapters.peft_io import load_adapter
from adapters.routing import AdapterRouting
from adapters.weights import write_to_slot
from backbone.generate import generate
from backbone.model_source import load_pretrained
from backbone.sampling import SamplingParams
from server.cli import main
from training.batching import IGNORE_INDEX, collate
from training.config import load_config
from training.evaluate import ANSWER_SLACK_TOKENS, load_eval_task
from training.mixed_scoring import answer_span
from training.recipe import MultiTaskTrainer

TASKS = {"add": "instruction", "copy": "prompt_completion", "chat": "chat"}


@pytest.fixture(scope="module")
def trained_run(toy_model_dir, tmp_path_factory):
    """Three toy tasks trained with a shared adapter and evaluated at the end; their test files."""
    root = tmp_path_factory.mktemp("eval_run")
    config = toy_config(root, toy_model_dir, "run", shared=True, max_steps=12, checkpoint={"every": 0},
                        eval={"every": 0, "metrics": {"add": "exact_match", "chat": "rouge_l"}})
    MultiTaskTrainer(load_config(write_config(root / "train.json", config))).train()
    tests = {
        "add": write_jsonl(root / "test" / "add.jsonl", addition_records(8, 11)),
        "copy": write_jsonl(root / "test" / "copy.jsonl", copy_records(6, 12)),
        "chat": write_jsonl(root / "test" / "chat.jsonl", chat_records(5, 13)),
    }
    return root / "run" / "last" / "standalone", tests


def _single_adapter_model(model_dir, adapter):
    """The oracle's model: fresh, with only this adapter in a single slot (or none)."""
    model, tokenizer = load_pretrained(model_dir, progress=False)
    if adapter is None:
        return model, tokenizer, None
    weights = load_adapter(adapter, model.config)
    write_to_slot(inject_lora(model, weights.tensors, num_slots=1, max_rank=weights.max_rank), 0, weights)
    return model, tokenizer, AdapterRouting.single(0, 1)


def _alone(model, tokenizer, routing, example):
    """One item alone in its batch: its mean answer-token loss and its greedy answer."""
    batch = collate([(0, example)], pad_id=0)
    with torch.no_grad():
        logits = model(batch.input_ids, routing=routing)[0]
    loss = float(F.cross_entropy(logits, batch.labels[0], ignore_index=IGNORE_INDEX))
    prompt, reference = answer_span(example)
    params = SamplingParams(max_tokens=len(reference) + ANSWER_SLACK_TOKENS, temperature=0.0)
    (completion,) = generate(model, [prompt], params, tokenizer=tokenizer, routing=routing)
    return loss, completion.text.strip()


def _run_eval(model_dir, adapters, tests, out, *extra):
    argv = ["eval", "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--dtype", "float32",
            "--no-progress", "--resamples", "200", "--batch-tokens", "256", "--speed-rows", "2", *extra]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    for name, path in tests.items():
        argv += ["--data", f"{name}={path}"]
    return main(argv)


def test_report_matches_each_system_alone(toy_model_dir, trained_run, tmp_path):
    adapters_dir, tests = trained_run
    adapters = {name: adapters_dir / name for name in ("add", "chat")}
    out = tmp_path / "out"
    assert _run_eval(toy_model_dir, adapters, tests, out) == 0
    report = json.loads((out / "report.json").read_text())
    answers = {(row["task"], row["item"], row["system"]): row for row in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    _, tokenizer = load_pretrained(toy_model_dir, progress=False)
    oracles = {system: _single_adapter_model(toy_model_dir, adapters.get(system)) for system in ("base", "add", "chat")}
    for task_name, path in tests.items():
        task = load_eval_task(task_name, path, tokenizer, data_format=TASKS[task_name])
        entry = report["tasks"][task_name]
        assert entry["metric"] == "exact_match" and entry["items"] == len(task.examples)
        for system, oracle in oracles.items():
            alone = [_alone(*oracle, example) for example in task.examples]
            for item, (loss, answer) in enumerate(alone):
                row = answers[(task_name, item, system)]
                assert row["got"].strip() == answer and row["loss"] == pytest.approx(loss, abs=1e-4)
            exact = sum(answer == reference.strip() for (_, answer), reference in zip(alone, task.references))
            assert entry["systems"][system]["value"] == pytest.approx(exact / len(alone), abs=1e-9)
            mean_loss = sum(loss for loss, _ in alone) / len(alone)
            assert entry["systems"][system]["loss"]["value"] == pytest.approx(mean_loss, abs=1e-4)
            low, high = entry["systems"][system]["ci95"]
            assert low <= entry["systems"][system]["value"] <= high
        for adapter in adapters:
            paired = entry["paired"][adapter]
            expected = entry["systems"][adapter]["value"] - entry["systems"]["base"]["value"]
            assert paired["vs"] == "base" and paired["diff"] == pytest.approx(expected)
            assert 0.0 <= paired["p_value"] <= 1.0 and paired["test"] == "mcnemar"
        assert set(entry["paired_adapters"]) == {"chat vs add"}
    assert report["forgetting"]["add"]["own_task"] == "add"
    assert set(report["forgetting"]["add"]["off_task"]) == {"copy", "chat"}
    add = report["systems"]["add"]
    weights = load_adapter(adapters["add"], load_pretrained(toy_model_dir, progress=False)[0].config)
    assert add["trainable_parameters"] == weights.num_params
    assert add["trainable_share"] == pytest.approx(weights.num_params / report["systems"]["base"]["parameters"])
    assert add["adapter_bytes"] == sum(f.stat().st_size for f in adapters["add"].iterdir())
    assert add["tokens_per_second"] > 0 and report["systems"]["base"]["tokens_per_second"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "matrix.png", "metrics.png", "report.json", "report.md"]
    for chart in ("matrix.png", "metrics.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "### add (exact_match" in markdown and "## Off-task" in markdown


def test_a_trained_adapter_beats_the_base_on_its_task(toy_model_dir, trained_run, tmp_path):
    adapters_dir, tests = trained_run
    out = tmp_path / "out"
    assert _run_eval(toy_model_dir, {"add": adapters_dir / "add"}, {"add": tests["add"]}, out) == 0
    task = json.loads((out / "report.json").read_text())["tasks"]["add"]
    assert task["paired_loss"]["add"]["diff"] < 0  # the trained adapter puts more mass on the answers
    assert task["systems"]["add"]["loss"]["value"] < task["systems"]["base"]["loss"]["value"]


def test_label_metric_on_free_text_names_the_file_and_the_fix(toy_model_dir, trained_run, tmp_path, capsys):
    _, tests = trained_run
    code = _run_eval(toy_model_dir, {}, {"copy": tests["copy"]}, tmp_path / "out", "--metric", "copy=macro_f1")
    assert code == 2
    error = capsys.readouterr().err
    assert str(tests["copy"]) in error and "macro_f1" in error and "chrf" in error


def test_unknown_format_names_the_file(toy_model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "odd.jsonl", [{"question": "what is 1 plus 1", "answer": "2"}])
    assert _run_eval(toy_model_dir, {}, {"odd": bad}, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "--format" in error


def test_adapter_for_another_base_names_the_adapter(toy_model_dir, trained_run, tmp_path_factory, capsys):
    _, tests = trained_run
    other = save_tiny_model(tmp_path_factory.mktemp("other"), hidden_size=32, intermediate_size=48)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_model_dir / name, other / name)
    adapters_dir, _ = trained_run
    assert _run_eval(other, {"add": adapters_dir / "add"}, {"add": tests["add"]}, tmp_path_factory.mktemp("o")) == 2
    error = capsys.readouterr().err
    assert "adapter add" in error and str(adapters_dir / "add") in error


def test_unknown_metric_is_refused_before_the_model_loads(toy_model_dir, trained_run, tmp_path, capsys):
    _, tests = trained_run
    assert _run_eval(toy_model_dir, {}, {"add": tests["add"]}, tmp_path / "out", "--metric", "add=f2") == 2
    assert "unknown metric 'f2'" in capsys.readouterr().err


def test_train_writes_the_eval_report_that_eval_writes(toy_model_dir, trained_run, tmp_path):
    adapters_dir, _ = trained_run
    run = adapters_dir.parent.parent
    from_train = json.loads((run / "eval" / "report.json").read_text())
    data = run.parent / "data"
    out = tmp_path / "out"
    assert _run_eval(toy_model_dir, {n: adapters_dir / n for n in ("add", "copy", "chat")},
                     {"add": data / "add_eval.jsonl", "chat": data / "chat_eval.jsonl"}, out,
                     "--metric", "chat=rouge_l", "--resamples", "1000", "--batch-tokens", "4096") == 0
    from_eval = json.loads((out / "report.json").read_text())
    assert from_train["tasks"]["chat"]["metric"] == "rouge_l"
    for task in ("add", "chat"):
        for system in ("base", "add", "copy", "chat"):
            ours, theirs = from_train["tasks"][task]["systems"][system], from_eval["tasks"][task]["systems"][system]
            assert ours["value"] == pytest.approx(theirs["value"]) and ours["ci95"] == pytest.approx(theirs["ci95"])
            assert ours["loss"]["value"] == pytest.approx(theirs["loss"]["value"], abs=1e-5)


@pytest.mark.parametrize("metrics, message", [
    ({"nope": "exact_match"}, "eval.metrics names task 'nope'"),
    ({"copy": "exact_match"}, "task 'copy' has no eval file"),
    ({"add": "f2"}, "eval.metrics.add: 'f2' is not one of"),
])
def test_train_refuses_a_bad_eval_metrics_entry(toy_model_dir, tmp_path, metrics, message):
    from training.config import ConfigError

    config = toy_config(tmp_path, toy_model_dir, "run", eval={"metrics": metrics})
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "train.json", config))
