"""The demo's whole path on a tiny model: generate the task suite, train it with the multi-task
recipe, `loraplex eval` it, serve the adapters and query them by task header. The served answers
must be the answers the eval recorded for the same items: one model code path end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_http_harness import live_server, make_model_folder

from backbone.model_source import load_pretrained
from router.task_table import TaskRoute
from server.app import ServerSettings
from server.cli import main
from training.config import load_config
from training.evaluate import ANSWER_SLACK_TOKENS, load_eval_task
from training.mixed_scoring import answer_span
from training.recipe import MultiTaskTrainer

REPO = Path(__file__).parents[2]
DEMO_TASKS = ("dates", "records", "support_routing", "units")


def _make_tasks(folder: Path, seed: int) -> None:
    subprocess.run([sys.executable, str(REPO / "examples" / "make_tasks.py"), "--out", str(folder), "--seed", str(seed),
                    "--train", "24", "--eval", "4", "--test", "6"], check=True, capture_output=True)


def test_task_generator_is_seeded_and_keeps_splits_apart(tmp_path):
    _make_tasks(tmp_path / "one", 0)
    _make_tasks(tmp_path / "two", 0)
    for task in DEMO_TASKS:
        declared = json.loads((tmp_path / "one" / task / "task.json").read_text())
        assert declared["metric"] in ("exact_match", "macro_f1")
        splits = {}
        for split in ("train", "eval", "test"):
            text = (tmp_path / "one" / task / f"{split}.jsonl").read_text()
            assert text == (tmp_path / "two" / task / f"{split}.jsonl").read_text()  # same seed, same files
            splits[split] = {line for line in text.splitlines()}
        assert not (splits["train"] & splits["test"]) and not (splits["eval"] & splits["test"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir = make_model_folder(root / "model")
    _make_tasks(root / "tasks", 0)
    formats = {name: json.loads((root / "tasks" / name / "task.json").read_text())["format"] for name in DEMO_TASKS}
    adapter = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    config = {
        "model": str(model_dir), "output_dir": str(root / "run"), "seed": 0, "progress": False, "plots": False,
        "tasks": [{"name": name, "train": str(root / "tasks" / name / "train.jsonl"), "format": formats[name],
                   "adapter": adapter} for name in DEMO_TASKS],
        "shared": adapter, "sampling": {"strategy": "temperature", "temperature": 2.0}, "surgery": {"method": "pcgrad"},
        "data": {"max_length": 256}, "batching": {"batch_tokens": 1024}, "optimizer": {"lr": 0.01},
        "schedule": {"max_steps": 3},
    }
    (root / "train.json").write_text(json.dumps(config))
    MultiTaskTrainer(load_config(root / "train.json")).train()
    out = root / "eval"
    assert main(["eval", "--model", str(model_dir), "--adapters", str(root / "run" / "last" / "standalone"),
                 "--suite", str(root / "tasks"), "--out", str(out), "--device", "cpu", "--dtype", "float32",
                 "--no-progress", "--resamples", "100", "--speed-rows", "0"]) == 0
    return root, model_dir, out


def test_eval_reads_each_task_metric_from_the_suite(demo):
    _, _, out = demo
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == set(DEMO_TASKS)
    assert report["tasks"]["support_routing"]["metric"] == "macro_f1"
    assert report["tasks"]["dates"]["metric"] == "exact_match"
    for task in report["tasks"].values():
        assert task["items"] == 6 and set(task["systems"]) == {"base", *DEMO_TASKS}
        assert set(task["paired"]) == set(DEMO_TASKS)
        for entry in task["systems"].values():
            assert 0.0 <= entry["ci95"][0] <= entry["value"] <= entry["ci95"][1] <= 1.0


def test_served_answers_by_task_header_are_the_evaluated_answers(demo):
    root, model_dir, out = demo
    adapters = {name: str(root / "run" / "last" / "standalone" / name) for name in DEMO_TASKS}
    answers = {(row["task"], row["item"], row["system"]): row["got"]
               for row in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    _, tokenizer = load_pretrained(model_dir, progress=False)
    task = load_eval_task("records", root / "tasks" / "records" / "test.jsonl", tokenizer)
    record = json.loads((root / "tasks" / "records" / "test.jsonl").read_text().splitlines()[0])
    messages = record["messages"][:-1]  # the conversation up to the answer
    budget = len(answer_span(task.examples[0])[1]) + ANSWER_SLACK_TOKENS
    settings = ServerSettings(model=str(model_dir), adapters=adapters, port=0,
                              tasks={"extract": TaskRoute.single("records"), "convert": TaskRoute.single("units")})
    with live_server(settings) as server:
        replies = {}
        for task_id in ("extract", "convert"):  # the same body; only the header differs
            response = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"X-Task-Id": task_id}, timeout=60,
                                  json={"model": "model", "messages": messages, "max_tokens": budget, "temperature": 0})
            assert response.status_code == 200, response.text
            replies[task_id] = (response.headers["X-Adapter"], response.json()["choices"][0]["message"]["content"])
    assert replies["extract"][0].startswith("records") and replies["convert"][0].startswith("units")
    assert replies["extract"][1] == answers[("records", 0, "records")]
    assert replies["convert"][1] == answers[("records", 0, "units")]
