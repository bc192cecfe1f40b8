"""lm-evaluation-harness as a real client: `loraplex serve` with an adapter in a subprocess, and
`lm_eval --model local-completions` in another, on two local tasks (a log-likelihood multiple
choice and a generate-until) over local JSONL files, offline.

The oracle is our own scoring of the same documents from transformers + PEFT logits on the same
weights: the answers are set so that we know which documents the adapter gets right, and the
harness's accuracy must equal that fraction exactly; its per-choice log-likelihoods must equal
ours to 1e-4."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import peft
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer

from test_http_harness import make_adapters, make_model_folder
from tiny_models import load_reference

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["The sea is", "Ships sail to", "At night the", "Gulls fly over", "Old sailors say", "The tide is",
             "A storm comes", "Harbours are"]  # fmt: skip
CHOICES = ["blue", "far", "calm", "grey"]
RIGHT = 5  # documents whose answer is the adapter's own pick; the other 3 get another choice
MAX_GEN_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Reference:
    """transformers + PEFT on the adapter's weights, with the model folder's tokenizer."""

    def __init__(self, model_dir: Path, adapter_dir: Path) -> None:
        self.model = peft.PeftModel.from_pretrained(load_reference(model_dir), adapter_dir).eval()
        self.tokenizer = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # the harness adds no BOS

    def loglikelihood(self, context: str, continuation: str) -> float:
        context_ids, continuation_ids = self.encode(context), self.encode(continuation)
        ids = context_ids + continuation_ids
        with torch.no_grad():
            logprobs = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return sum(float(logprobs[len(context_ids) + i - 1, token]) for i, token in enumerate(continuation_ids))

    def greedy(self, context: str, until: str) -> str:
        ids = self.encode(context)
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(MAX_GEN_TOKENS):
                token = int(self.model(torch.tensor([ids + generated])).logits[0, -1].argmax())
                if token == 2:  # </s>
                    break
                generated.append(token)
        text = self.tokenizer.decode(generated)
        return text.split(until)[0]


def _write_tasks(folder: Path, reference: Reference) -> tuple[float, float, dict[str, list[float]]]:
    """The two task YAMLs and their JSONL data; returns the accuracies our own scoring predicts and
    our log-likelihood of every choice per question."""
    folder.mkdir()
    mc_docs, gen_docs, likelihoods = [], [], {}
    for index, question in enumerate(QUESTIONS):
        scores = [reference.loglikelihood(question, " " + choice) for choice in CHOICES]
        likelihoods[question] = scores
        pick = max(range(len(CHOICES)), key=scores.__getitem__)
        mc_docs.append({"question": question, "choices": CHOICES, "answer": pick if index < RIGHT else (pick + 1) % len(CHOICES)})
        generated = reference.greedy(question, "\n")
        gen_docs.append({"question": question, "answer": generated if index < RIGHT else generated + "#"})
    for name, docs in (("mc", mc_docs), ("gen", gen_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: {path}\n"
        "test_split: test\n"
        "doc_to_text: question\n"
        "doc_to_target: answer\n"
    )
    (folder / "mc.yaml").write_text(
        "task: loraplex_mc\n" + common.format(path=folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        "task: loraplex_gen\n" + common.format(path=folder / "gen.jsonl")
        + "output_type: generate_until\n"
        + f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN_TOKENS}\n  do_sample: false\n  temperature: 0\n"
        + "metric_list:\n  - metric: exact_match\n"
    )
    return RIGHT / len(QUESTIONS), RIGHT / len(QUESTIONS), likelihoods


def test_lm_eval_local_completions_accuracy_equals_our_own_scoring(tmp_path):
    model_dir = make_model_folder(tmp_path / "tiny")
    adapter_dir = make_adapters(model_dir, tmp_path / "adapters", {"alpha": 1})["alpha"]
    expected_mc, expected_gen, likelihoods = _write_tasks(tmp_path / "tasks", Reference(model_dir, adapter_dir))
    offline = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", "tiny",
         "--adapter", f"alpha={adapter_dir}", "--port", str(port), "--no-dashboard", "--dtype", "float32"],
        cwd=REPO, env=offline, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server)
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
             "--model_args", f"model=alpha,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={model_dir},"
                             "tokenizer_backend=huggingface,max_retries=1",
             "--tasks", "loraplex_mc,loraplex_gen", "--include_path", str(tmp_path / "tasks"),
             "--output_path", str(tmp_path / "results"), "--log_samples"],
            cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    finally:
        server.terminate()
        server.wait(60)
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    assert results["loraplex_mc"]["acc,none"] == expected_mc
    assert results["loraplex_gen"]["exact_match,none"] == expected_gen
    samples = [json.loads(line) for path in (tmp_path / "results").rglob("samples_loraplex_mc_*.jsonl")
               for line in path.read_text().splitlines()]  # fmt: skip
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        question = sample["doc"]["question"]
        arguments = list(sample["arguments"].values())  # the (context, continuation) the harness scored
        assert [(a["arg_0"], a["arg_1"]) for a in arguments] == [(question, " " + choice) for choice in CHOICES]
        harness = [float(resp[0][0]) for resp in sample["resps"]]
        assert harness == pytest.approx(likelihoods[question], abs=1e-4)


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"loraplex serve exited early:\n{server.stdout.read()}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("loraplex serve did not become ready within 120 s")
