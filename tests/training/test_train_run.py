"""End to end: `loraplex train` on a tiny random Llama — outputs, resume, add-a-task, PEFT logits."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from adapters.routing import AdapterRouting
from server.cli import main
from training.config import load_config
from training.recipe import MultiTaskTrainer
from training.report import read_log

from training_files import toy_config, write_config


def _losses(output):
    return {r["step"]: r["loss"] for r in read_log(output / "log.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def first_run(toy_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config_path = write_config(root / "train.json", toy_config(root, toy_model_dir, "run", plots=True))
    assert main(["train", str(config_path)]) == 0
    return root, config_path


def test_run_writes_adapters_log_plots_and_checkpoints(first_run):
    root, _ = first_run
    out = root / "run"
    for task in ("add", "copy", "chat"):
        for kind in ("last", "best"):
            assert (out / kind / task / "adapter_model.safetensors").is_file()
            assert (out / kind / "standalone" / task / "adapter_config.json").is_file()
    assert (out / "last" / "shared" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32") and summary["peak_device_memory_bytes"] > 0
    records = read_log(out / "log.jsonl")
    setup = records[0]
    assert setup["kind"] == "setup" and set(setup["mix"]) == {"add", "copy", "chat"} and setup["world_size"] == 1
    steps = [r for r in records if r["kind"] == "train"]
    for r in steps:
        assert r["step_seconds"] > 0 and r["tokens_per_second"] == pytest.approx(r["tokens"] / r["step_seconds"])
    assert steps[-1]["eta_seconds"] == 0
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(len(r["cosines"]) == 3 and 0 <= r["conflict_rate"] <= 1 for r in steps)
    assert steps[0]["lr"] == pytest.approx(0.01 / 2)  # warm-up step 1 of 2
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and set(evals[0]["tasks"]) == {"add", "chat"}
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "lr.png", "grad_norm.png", "conflicts.png"}
    assert [p.name for p in (out / "checkpoints").iterdir() if p.suffix == ".pt"] != []


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(first_run, toy_model_dir, caplog):
    root, config_path = first_run
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    checkpoint = Path(shutil.copy(root / "run" / "checkpoints" / "step-000003.pt", resumed / "checkpoints"))
    # What the killed save of step 4 left behind, and a file of the user's beside it.
    leftover = resumed / "checkpoints" / f".step-000004.pt.tmp-{'ab' * 16}"
    leftover.write_bytes(b"half a checkpoint")
    (resumed / "checkpoints" / "notes.txt").write_text("mine")
    checkpoint_bytes = checkpoint.read_bytes()
    config = json.loads(config_path.read_text())
    config["output_dir"] = str(resumed)
    with caplog.at_level(logging.INFO):
        assert main(["train", str(write_config(root / "resumed.json", config)), "--resume"]) == 0
    uninterrupted, continued = _losses(root / "run"), _losses(resumed)
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(uninterrupted[step], abs=1e-9, rel=0)
    assert not leftover.exists() and (resumed / "checkpoints" / "notes.txt").read_text() == "mine"
    assert checkpoint.read_bytes() == checkpoint_bytes
    messages = [record.getMessage() for record in caplog.records]
    removal = next(i for i, message in enumerate(messages) if leftover.name in message)
    assert removal < messages.index("resumed at step 3")  # removed by the resume, not only by the next save


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_add_a_task_trains_only_the_new_adapter_and_leaves_the_others_byte_identical(first_run, toy_model_dir):
    root, config_path = first_run
    last = root / "run" / "last"
    before = _digest(last)
    config = json.loads(config_path.read_text())
    for task in config["tasks"]:
        task["adapter"] = {"init_from": str(last / task["name"]), "frozen": True}
        task.pop("train")
    config["shared"] = {"init_from": str(last / "shared"), "frozen": True}
    config["tasks"].append({**json.loads(config_path.read_text())["tasks"][0], "name": "add2"})
    config["output_dir"] = str(root / "added")
    config["checkpoint"] = {"every": 0}
    assert main(["train", str(write_config(root / "added.json", config))]) == 0
    assert _digest(last) == before
    added = root / "added" / "last"
    assert sorted(p.name for p in added.iterdir()) == ["add2", "standalone"]
    steps = [r for r in read_log(root / "added" / "log.jsonl") if r["kind"] == "train"]
    assert all(r["task_tokens"][:3] == [0, 0, 0] and r["task_tokens"][3] > 0 for r in steps)


def test_trained_adapter_loads_in_peft_with_the_same_logits(first_run, toy_model_dir):
    peft = pytest.importorskip("peft")
    from tiny_models import load_reference

    root, config_path = first_run
    config = load_config(config_path)
    config.output_dir = str(root / "logits")
    config.schedule.max_steps = 2
    trainer = MultiTaskTrainer(config)
    trainer.train()
    ids = torch.tensor([[5, 3, 20, 30, 40, 11, 12]])
    for folder, routing in (
        ("chat", AdapterRouting(torch.tensor([2]))),  # the task adapter alone
        ("standalone/chat", AdapterRouting(torch.tensor([2]), shared_slot=3)),  # task + shared, stacked
    ):
        reference = peft.PeftModel.from_pretrained(load_reference(toy_model_dir), root / "logits" / "last" / folder).eval()
        with torch.no_grad():
            expected = reference(ids).logits
            ours = trainer.model(ids, routing=routing)
            with reference.disable_adapter():
                base = reference(ids).logits
        assert (expected - base).abs().max() > 1e-4  # the adapter does something
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_dry_run_validates_and_prints_the_plan(toy_model_dir, tmp_path, capsys):
    config = toy_config(tmp_path, toy_model_dir, "dry", surgery={"method": "gradvac"})
    assert main(["train", str(write_config(tmp_path / "c.json", config)), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert '"trainable_parameters"' in printed and '"mix"' in printed
    assert not (tmp_path / "dry").exists()


def test_bad_config_is_a_one_line_error_naming_the_key(toy_model_dir, tmp_path, capsys):
    config = toy_config(tmp_path, toy_model_dir, "bad")
    config["tasks"][0]["adapter"]["rank"] = 4
    assert main(["train", str(write_config(tmp_path / "c.json", config))]) == 2
    assert "unknown key 'tasks[0].adapter.rank'" in capsys.readouterr().err


def test_resumed_log_drops_a_line_cut_short_by_a_crash(tmp_path):
    from training.report import RunLog

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.')  # the crash cut step 3
    RunLog(path, resume_step=2)
    assert read_log(path) == [{"step": 1}, {"step": 2}]
