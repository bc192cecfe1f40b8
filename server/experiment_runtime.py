"""Running experiments: definitions checked against the loaded adapters, sticky assignment,
the live request's outcome and its shadow copy recorded in the background, and feedback.

The live answer never waits on anything here beyond the submit itself: outcomes are read from
the request's handle by a background task, and the shadow copy is a separate engine request at
lower priority whose failures are only counted, and which gives its row back when live requests
wait for one (server.shadow_preemption)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary

from router.experiments import Arm, Experiment, assign, experiment_from_json, mirrors_to_shadow, with_buckets
from router.feedback_index import FeedbackIndex
from router.latency_histogram import bin_of
from router.request_router import RouteDecision
from server.engine import Engine
from server.experiment_pins import AdapterVersions, ExperimentAdapterError, VersionPins
from server.experiment_store import ExperimentStore
from server.experiment_summary import SHADOW_ARM, VERSION_PREFIX, summarize
from server.request_handle import Finished, GenerationRequest, RequestHandle
from server.shadow_preemption import ShadowPreemption

log = logging.getLogger("loraplex.experiments")

SHADOW_PRIORITY = 1  # admitted after every waiting live request (live requests have 0)
SNAPSHOT_INTERVAL_S = 60.0  # history for the report: at most one snapshot a minute per experiment


class UnknownExperimentError(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"experiment {name!r} does not exist; create it with PUT /v1/experiments/{name}")


class ExperimentConflictError(ValueError):
    """Another running experiment holds the task."""


class UnknownFeedbackRequestError(LookupError):
    """Feedback for a request id the index does not know (never in an experiment, or forgotten)."""


class ExperimentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["experiment", "arm"]
        self.assignments = Counter("loraplex_experiment_assignments", "Units assigned to an arm", labels, registry=registry)
        self.requests = Counter("loraplex_experiment_requests", "Requests served by an arm", labels, registry=registry)
        self.errors = Counter("loraplex_experiment_errors", "Requests of an arm that failed", labels, registry=registry)
        self.feedback = Counter("loraplex_experiment_feedback", "Feedback received", [*labels, "kind"], registry=registry)
        self.reward = Summary("loraplex_experiment_reward", "Rewards received", labels, registry=registry)
        self.shadow = Counter(
            "loraplex_experiment_shadow_requests", "Shadow copies by outcome", ["experiment", "outcome"], registry=registry
        )


class Experiments:
    def __init__(
        self,
        store: ExperimentStore,
        adapter_names: Callable[[], set[str]],
        registry: CollectorRegistry,
        index: FeedbackIndex | None = None,
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
        versions: AdapterVersions | None = None,
    ) -> None:
        self.store = store
        self.adapter_names = adapter_names
        self.metrics = ExperimentMetrics(registry)
        writer = store.writer
        Gauge("loraplex_experiment_writes_queued", "Experiment writes waiting for the writer thread",
              registry=registry).set_function(writer.queued)
        Gauge("loraplex_experiment_writes_failed", "Experiment writes lost to errors since start (each logged)",
              registry=registry).set_function(lambda: writer.failed_writes)
        self.index = index or FeedbackIndex()
        self.preemption = ShadowPreemption()
        self.snapshot_interval_s = snapshot_interval_s
        self._lock = threading.Lock()
        self._by_name = {experiment.name: experiment for experiment in store.load_all()}
        self.pins = VersionPins(versions)
        for experiment in list(self._by_name.values()):
            self._restore_pins(experiment)
        self._last_snapshot: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them mid-way

    # ---- definitions -----------------------------------------------------------------------

    def put(self, name: str, body: object) -> Experiment:
        experiment = experiment_from_json(name, body)
        loaded = self.adapter_names()
        # A pinned version may outlive its name (kept for another experiment): `pins.pin` checks those.
        missing = [adapter for adapter in experiment.adapters if "@" not in adapter and adapter not in loaded]
        if missing:
            raise ExperimentAdapterError(
                f"experiment {name!r} names adapter(s) {missing} that are not loaded; "
                "load them first with POST /v1/load_lora_adapter"
            )
        pins = self.pins.pin(experiment)
        try:
            with self._lock:
                holder = next((other for other in self._by_name.values()
                               if other.name != name and other.running and other.task == experiment.task), None)
                if experiment.running and holder is not None:
                    raise ExperimentConflictError(
                        f"task {experiment.task!r} is already in running experiment {holder.name!r}; stop it "
                        f"(PUT with \"status\": \"stopped\") or DELETE /v1/experiments/{holder.name} first"
                    )
                experiment = with_buckets(experiment, self._by_name.get(name))
                self.store.put(experiment, {info.key: info.content_hash for info in pins})
                self._by_name[name] = experiment
                pins = self.pins.hold(name, pins)  # the old definition's pins go
        finally:
            self.pins.release(pins)
        return experiment

    def _restore_pins(self, experiment: Experiment) -> None:
        """At startup. Version numbers restart with the process, so a stored "name@3" may now be
        unregistered or other weights: such an experiment is stopped (its task falls back to the
        task table) rather than served by the wrong version; PUT it again with a registered one."""
        problem = self.pins.restore(experiment, self.store.pinned_hashes(experiment.name))
        if problem:
            log.warning("experiment %s is stopped at startup: %s; PUT it again with registered versions",
                        experiment.name, problem)
            if experiment.running:
                experiment = replace(experiment, status="stopped")
                self.store.put(experiment)
                self._by_name[experiment.name] = experiment

    def get(self, name: str) -> Experiment:
        with self._lock:
            experiment = self._by_name.get(name)
        if experiment is None:
            raise UnknownExperimentError(name)
        return experiment

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def delete(self, name: str) -> Experiment:
        with self._lock:
            experiment = self._by_name.pop(name, None)
            if experiment is None:
                raise UnknownExperimentError(name)
            self.store.delete(name)
        self.pins.drop(name)
        self.index.forget_experiment(name)
        return experiment

    def summary(self, name: str) -> dict:
        experiment = self.get(name)
        summary = summarize(experiment, self.store.counters(name), self.store.latency_bins(name), self.store.labels(name))
        summary["routing"] = experiment.routes_at(time.time())  # running and inside its start/stop window
        summary["feedback_index"] = self.index.describe()
        return summary

    # ---- routing (router.request_router.ExperimentSource) ----------------------------------

    def experiment_on(self, task: str) -> Experiment | None:
        with self._lock:
            now = time.time()
            return next((e for e in self._by_name.values() if e.routes_at(now) and e.task == task), None)

    def assign(self, experiment: Experiment, user_key: str, request_id: str) -> Arm:
        """The unit's remembered arm if it still exists, else the bucket table's (remembered)."""
        key = request_id if experiment.unit == "request" else user_key
        unit = hashlib.sha256(key.encode()).hexdigest()[:32]  # raw user ids stay out of the state file
        try:
            remembered = self.store.remembered_arm(experiment.name, unit)
            arm = experiment.arm(remembered) if remembered else None
            if arm is None or arm.weight == 0:
                arm = assign(experiment, key)
                self.store.remember_unit(experiment.name, unit, arm.name, experiment.shares())
                self.metrics.assignments.labels(experiment.name, arm.name).inc()
        except sqlite3.Error:  # the state file is unwritable: serve from the bucket table, say so
            log.exception("experiment %s: cannot read or remember unit assignments", experiment.name)
            arm = assign(experiment, key)
        return arm

    # ---- requests --------------------------------------------------------------------------

    def submit(self, engine: Engine, request: GenerationRequest, decision: RouteDecision, request_id: str,
               arrival: float) -> RequestHandle:
        """Submit the live request, then (maybe) its shadow copy; record both in the background."""
        name, arm = decision.experiment, decision.arm
        with self._lock:
            experiment = self._by_name.get(name)
        if experiment is None:  # deleted since routing: serve the request, record nothing
            return engine.submit(request)
        self.metrics.requests.labels(name, arm).inc()
        try:
            handle = engine.submit(request)
        except Exception:
            self.metrics.errors.labels(name, arm).inc()
            self.store.add(name, arm, {"requests": 1, "errors": 1})
            raise
        self.index.remember(request_id, name, arm)
        shadow_handle = None
        if mirrors_to_shadow(experiment, request_id):
            copy = replace(request, adapter=experiment.shadow.adapter, request_id=f"{request_id}-shadow",
                           priority=SHADOW_PRIORITY)
            try:
                shadow_handle = engine.submit(copy)
            except Exception as err:  # the shadow adapter was unloaded, the queue is full...: count, go on
                self.metrics.shadow.labels(name, "dropped").inc()
                self.store.add(name, SHADOW_ARM, {"dropped": 1})
                log.info("shadow copy of %s for experiment %s not submitted: %s", request_id, name, err)
        self._spawn(self._record_live(name, arm, handle, arrival))
        if shadow_handle is not None:
            self._spawn(self._record_shadow(engine, name, arm, request_id, handle, shadow_handle, arrival))
        return handle

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(_logged(coroutine))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_live(self, name: str, arm: str, handle: RequestHandle, arrival: float) -> None:
        finished = await _finished(handle)
        if not self._exists(name):
            return  # deleted while this request ran: its counters are gone with it
        # Which version answered: a hot swap mid-experiment shows up in the arm's figures.
        served = {f"{VERSION_PREFIX}{handle.adapter.version}": 1} if handle.adapter else {}
        self.store.add(name, arm, _outcome_counters(finished) | served, _latency_bins(finished, arrival))
        if finished.finish_reason == "error":
            self.metrics.errors.labels(name, arm).inc()
        self._maybe_snapshot(name)

    async def _record_shadow(self, engine: Engine, name: str, live_arm: str, request_id: str, live: RequestHandle,
                             shadow: RequestHandle, arrival: float) -> None:
        finished, preempted = await self.preemption.follow(engine, shadow)
        live_finished = await _finished(live)
        if not self._exists(name):
            return
        if preempted:  # its row went to live work; a cut-short text says nothing about the candidate
            self.store.add(name, SHADOW_ARM, {"preempted": 1})
            self.metrics.shadow.labels(name, "preempted").inc()
            return
        self.store.add(name, SHADOW_ARM, _outcome_counters(finished), _latency_bins(finished, arrival))
        self.store.record_shadow(name, request_id, live_arm, live_finished.text, finished.text,
                                 finished.finish_reason, finished.error)
        self.metrics.shadow.labels(name, "error" if finished.finish_reason == "error" else "recorded").inc()

    def _exists(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    async def drain(self) -> None:
        """Wait for the background recorders (tests, and shutdown after the engine has stopped)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ---- feedback --------------------------------------------------------------------------

    def feedback(self, request_id: str, reward: float | None, label: str | None, thumbs: str | None) -> dict:
        claimed = self.index.claim(request_id)
        if claimed is None:
            index = self.index.describe()
            raise UnknownFeedbackRequestError(
                f"request id {request_id!r} was not served by a running experiment, or its feedback window closed "
                f"(ids are kept {index['ttl_s']:g} s, at most {index['max_entries']}; "
                f"{index['dropped_expired']} expired and {index['dropped_over_capacity']} dropped so far)"
            )
        served, first = claimed
        if first:
            amounts: dict[str, float] = {"feedback_count": 1}
            if reward is not None:
                amounts |= {"reward_n": 1, "reward_sum": reward, "reward_sumsq": reward * reward}
                self.metrics.reward.labels(served.experiment, served.arm).observe(reward)
            if thumbs is not None:
                amounts |= {"thumbs_n": 1, "thumbs_up": 1.0 if thumbs == "up" else 0.0}
            kind = "reward" if reward is not None else "thumbs" if thumbs is not None else "label"
            self.store.add(served.experiment, served.arm, amounts, label=label)
            self.metrics.feedback.labels(served.experiment, served.arm, kind).inc()
            self._maybe_snapshot(served.experiment)
        return {"request_id": request_id, "experiment": served.experiment, "arm": served.arm, "duplicate": not first}

    def _maybe_snapshot(self, name: str) -> None:
        now = time.time()
        if now - self._last_snapshot.get(name, 0.0) >= self.snapshot_interval_s and self._exists(name):
            self._last_snapshot[name] = now
            self.store.snapshot(name, now)


async def _logged(coroutine: Coroutine[Any, Any, None]) -> None:
    """A recorder's failure (say, a full disk) is logged; it never reaches a live request."""
    try:
        await coroutine
    except Exception:
        log.exception("recording an experiment outcome failed")


async def _finished(handle: RequestHandle) -> Finished:
    async for event in handle.aevents():
        if isinstance(event, Finished):
            return event
    raise RuntimeError(f"request {handle.request_id} ended without a Finished event")


def _outcome_counters(finished: Finished) -> dict[str, float]:
    return {
        "requests": 1,
        "errors": 1 if finished.finish_reason == "error" else 0,
        "cancelled": 1 if finished.finish_reason == "cancelled" else 0,
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
    }


def _latency_bins(finished: Finished, arrival: float) -> dict[str, int]:
    """Latency only of generations that ran to their end (a cancelled one says little)."""
    if finished.finish_reason not in ("stop", "length") or finished.end_time is None:
        return {}
    bins = {"total": bin_of(finished.end_time - arrival)}
    if finished.first_token_time is not None:
        bins["ttft"] = bin_of(finished.first_token_time - arrival)
    return bins



def build_experiments(state_dir: str | None, configured: dict[str, object], adapter_names: Callable[[], set[str]],
                      registry: CollectorRegistry, versions: AdapterVersions | None = None) -> Experiments:
    """The store (persistent with a state folder) and the experiments it holds, with those of the
    serve config applied on top: a configured experiment replaces its stored definition but
    keeps its counters and remembered units."""
    if state_dir is None and not configured:
        log.info("no state folder: experiments created over HTTP last until the server stops")
    experiments = Experiments(ExperimentStore(state_dir), adapter_names, registry, versions=versions)
    for name, body in configured.items():
        experiments.put(name, body)
    return experiments
