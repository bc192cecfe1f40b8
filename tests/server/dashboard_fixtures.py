"""A live server set up for the dashboard tests: API keys for an admin and a tenant, adapters
(one with a name made of HTML), A/B and single-adapter tasks, and a runs folder holding one
training log written by the trainer's own `RunLog`."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.task_table import TaskRoute
from server.app import ServerSettings
from server.auth import ApiKeys
from test_http_harness import LiveServer, live_server, make_adapters, make_model_folder
from training.report import RunLog

ADMIN_KEY = "sk-admin-dashboard-1"
TENANT_KEY = "sk-tenant-a-dashboard"
KEYS = {
    ADMIN_KEY: {"tenant": "ops", "admin": True},
    TENANT_KEY: {"tenant": "team-a", "adapters": ["alpha"], "tasks": ["summarize"]},
}
HTML_NAME = '<img src=x onerror="window.__injected=1">'  # only the engine accepts such a name
RUN_NAME = "run-2026-12-01"
TRAIN_LOSSES = [2.5, 2.1, 1.8, 1.6]
EVAL_LOSS = {"summarize": 1.7, "qa": 1.9}


@dataclass
class DashboardEnv:
    server: LiveServer
    root: Path  # the adapter root HTTP clients may load from
    runs_dir: Path

    def http(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.server.base_url, timeout=60, headers=headers)

    def metric_totals(self, name: str, *labels: str) -> dict:
        """`name`'s samples summed by `labels` (one label: keyed by its value, several: by the
        tuple), as a scraper reads them from `/metrics`."""
        with self.http() as client:
            text = client.get("/metrics").text
        totals: dict = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    values = tuple(sample.labels[label] for label in labels)
                    key = values[0] if len(values) == 1 else values
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals


def write_run(runs_dir: Path) -> Path:
    folder = runs_dir / RUN_NAME
    log = RunLog(folder / "log.jsonl")
    log.write({"kind": "setup", "step": 0, "tasks": ["summarize", "qa"], "mix": {"summarize": 0.5, "qa": 0.5}})
    for step, loss in enumerate(TRAIN_LOSSES, start=1):
        log.write({"kind": "train", "step": step, "loss": loss, "task_loss": [loss + 0.1, loss - 0.1 if step > 1 else math.nan]})
    tasks = {name: {"loss": loss, "perplexity": math.exp(loss), "tokens": 100} for name, loss in EVAL_LOSS.items()}
    log.write({"kind": "eval", "step": len(TRAIN_LOSSES), "tasks": tasks, "mean_loss": 1.8, "improved": True})
    return folder


@contextmanager
def dashboard_server(tmp: Path, bulk_adapters: int = 0, max_loras: int = 4) -> Iterator[DashboardEnv]:
    """`bulk_adapters` more adapters (`bulk-000`, ...) share one folder: registering them is
    cheap, and they spread over the slot, CPU and disk tiers."""
    model_dir = make_model_folder(tmp / "tiny")
    root = tmp / "adapters"
    adapters = make_adapters(model_dir, root, {"alpha": 1, "beta": 2, "gamma": 3})
    runs_dir = tmp / "runs"
    write_run(runs_dir)
    settings = ServerSettings(
        model=str(model_dir),
        served_model_name="tiny",
        adapters={name: str(path) for name, path in adapters.items()},
        tasks={"summarize": TaskRoute.single("alpha"), "ab": TaskRoute.weighted({"alpha": 1.0, "beta": 1.0})},
        api_keys=ApiKeys.from_mapping(KEYS),
        adapter_roots=[str(root)],
        runs_dir=str(runs_dir),
    )
    settings.engine.max_loras = max_loras
    with live_server(settings) as server:
        engine = server.state.engine
        engine.register_adapter(HTML_NAME, adapters["gamma"])
        for index in range(bulk_adapters):
            engine.register_adapter(f"bulk-{index:03d}", adapters["beta"])
        yield DashboardEnv(server=server, root=root, runs_dir=runs_dir)
