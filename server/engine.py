"""The serving engine: continuous batching over mixed adapters (DESIGN decisions 5 and 6).

One worker thread owns the model. HTTP handlers (any thread) call `submit`, `register_adapter`
and friends, which only validate, enqueue and wake the worker. Each worker step admits queued
requests whose adapter has (or can get) a slot, prefills a chunk of new prompts, and runs one
decode step for every running row; rows join and leave between steps.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters.injection import inject_lora
from adapters.merged_slot import MergeStats, SlotMerger
from backbone.model import CausalLM
from backbone.tokenizer import Tokenizer
from router.adapter_registry import AdapterInfo
from server.adapter_tiers import AdapterTiers, ResidentAdapter
from server.admission import Admission, Pending
from server.batch_runner import BatchRunner
from server.batch_state import CachePool, Row
from server.compute_threads import claim_compute, serial_torch
from server.device_memory import check_device_memory, plan_memory
from server.engine_errors import EngineStoppedError, InvalidRequestError, PromptTooLongError, UnknownAdapterError
from server.fair_queue import TenantLimitTable
from server.prefix_kv import PrefixCache, PrefixCacheStats
from server.request_handle import Finished, GenerationRequest, RequestHandle, TextDelta
from server.step_isolation import step_isolating
from server.text_stream import TextStream

__all__ = [
    "AdapterInfo",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Finished",
    "GenerationRequest",
    "RequestHandle",
    "ResidentAdapter",
    "TextDelta",
]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_running: int = 16  # rows decoding at once (= KV-cache rows)
    max_queued: int = 256  # waiting requests; beyond -> QueueFullError at submit (fail fast)
    max_context: int | None = None  # prompt + max_tokens limit; None = the model's max_position_embeddings
    max_loras: int = 8  # resident adapter slots in the stacked LoRA buffers
    max_cpu_loras: int = 32  # parsed adapters kept in CPU memory (LRU)
    max_lora_rank: int = 64  # largest adapter rank; a batch computes only up to its own largest rank
    prefill_chunk: int = 256  # prompt tokens per step across new rows, so decoding rows don't stall long
    strict_base: bool = False  # refuse adapters that record another base model
    compute_threads: int | None = None  # the worker's parallelism; None = the usable cores
    gpu_memory_fraction: float = 0.9  # share of a GPU's memory the server may use (KV cache, slots, activations)
    tenant_limits: TenantLimitTable = field(default_factory=TenantLimitTable)  # per-tenant rows and queue (fair_queue)
    prefix_cache: bool = True  # reuse the KV of prompt prefixes seen before, per adapter version
    prefix_cache_mb: float = 256.0  # prefix blocks moved out of cache rows reused by new requests (idle rows keep theirs free)
    prefix_block_tokens: int = 16  # cache granularity: a prefix is reused in whole blocks
    merge_single_adapter: bool = True  # a batch all on one adapter runs on a merged copy of the weights


@dataclass
class EngineStats:
    queued: int
    running: int
    max_running: int
    max_loras: int
    resident: list[ResidentAdapter]  # the slot table: name, version, slot, in_use, pinned
    running_adapters: dict[str, int]  # adapter name -> running requests
    waiting_adapters: dict[str, int]  # adapter name -> queued requests
    cpu_cache_entries: int
    cpu_cache_bytes: int
    resident_bytes: int
    kv_cache_bytes: int
    disk_loads: int  # adapter reads from disk (registrations and reloads)
    disk_load_seconds_p50: float | None
    disk_load_seconds_p95: float | None
    slot_writes: int  # CPU -> slot copies
    slot_write_seconds_p50: float | None
    slot_write_seconds_p95: float | None
    prompt_tokens: int
    completion_tokens: int
    completion_tokens_by_adapter: dict[str, int]  # "" = the base model
    finished: dict[str, int]  # finish_reason -> requests
    steps: int
    prefix_cache: PrefixCacheStats | None = None  # None = the prefix cache is off
    merged_adapter: MergeStats | None = None  # None = single-adapter batches are never merged


@dataclass
class _Counters:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_adapter: Counter = field(default_factory=Counter)
    finished: Counter = field(default_factory=Counter)
    steps: int = 0


class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, config: EngineConfig, served_model_name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.served_model_name = served_model_name
        self.max_context = config.max_context or model.config.max_position_embeddings
        if config.max_running < 1 or config.max_queued < 0 or config.prefill_chunk < 1:
            raise ValueError(
                f"max_running ({config.max_running}) and prefill_chunk ({config.prefill_chunk}) must be >= 1 "
                f"and max_queued ({config.max_queued}) >= 0"
            )
        # A padded prefill chunk may write up to prefill_chunk positions past a prompt's end.
        positions = self.max_context + config.prefill_chunk
        device = model.inv_freq.device
        prefix_bytes = int(config.prefix_cache_mb * 2**20) if config.prefix_cache else 0
        plan = plan_memory(model, config.max_running, positions, config.max_loras, config.max_lora_rank, config.prefill_chunk,
                           prefix_bytes, config.merge_single_adapter)  # fmt: skip
        check_device_memory(plan, device, config.gpu_memory_fraction)  # before anything is allocated
        layers = inject_lora(model, model.linear_modules(), num_slots=config.max_loras, max_rank=config.max_lora_rank)
        self._lock = threading.RLock()  # re-entered when an adapter call under it wakes the worker
        self._wakeup = threading.Condition(self._lock)
        self._dirty = False  # something happened that the worker has not looked at yet
        self._load_listeners: list[Callable[[], None]] = []  # see watch_load
        self.tiers = AdapterTiers(
            model.config,
            layers,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_rank=config.max_lora_rank,
            strict_base=config.strict_base,
            served_model_name=served_model_name,
            wake=self._wake,
        )
        # The KV cache in the model dtype. On a GPU all positions are allocated now, as budgeted,
        # so the cache never grows (or runs out) mid-request; a CPU grows it as sequences need.
        self._pool = CachePool(
            model.config, config.max_running, positions, dtype=model.lm_head.weight.dtype, device=device,
            initial_positions=positions if device.type == "cuda" else 256,
        )  # fmt: skip
        self._prefix = None
        if config.prefix_cache:
            self._prefix = PrefixCache(self._pool, config.prefix_block_tokens, prefix_bytes)
        stop_ids = set(tokenizer.eos_token_ids or model.config.eos_token_ids)
        self._runner = BatchRunner(
            model, self._pool, stop_ids, config.prefill_chunk, self._row_finished,
            slot_copies=self.tiers.copier, prefix_cache=self._prefix,
            merger=SlotMerger(model) if config.merge_single_adapter else None,
        )  # fmt: skip
        self._admission = Admission(config, self._lock)
        self._rows: list[Row] = []
        self._counters = _Counters()
        self._resident: list[ResidentAdapter] = []  # the worker's last view of the slot table
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        if self._stopped:
            raise EngineStoppedError()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker is running and accepting requests (readiness)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._stopped = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._finish_everything("the engine shut down before it started")
        self.tiers.shutdown()

    # ---- adapters --------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate the adapter fully, then make it `name`'s current version (a new version if
        the name exists: requests already submitted finish on the version they got)."""
        with serial_torch():  # see compute_threads: only the worker runs parallel math
            # Publishing under the engine's lock pairs with submit's lookup-and-hold: no request
            # can pick up the old version after the worker has already let it go.
            return self.tiers.register(name, path, publish_lock=self._lock)

    def unregister_adapter(self, name: str) -> None:
        with self._lock:  # with submit's lookup-and-hold, so no request slips between
            if self.tiers.unregister(name) is None:
                raise UnknownAdapterError(name)

    def pin_adapter_version(self, reference: str) -> AdapterInfo:
        """Keep "name@version" servable until released, across hot swaps of `name`."""
        return self.tiers.pin_version(reference)

    def release_adapter_version(self, key: str) -> None:
        with self._lock:  # with submit's lookup-and-hold, as unregister_adapter
            self.tiers.release_version(key)

    def adapter_infos(self) -> list[AdapterInfo]:
        return self.tiers.registry.infos()

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Keep `name`'s current version resident (loaded into a slot as soon as one is free)."""
        if self.tiers.registry.current(name) is None:
            raise UnknownAdapterError(name)
        self.tiers.set_pinned(name, pinned)

    def pinned_not_resident(self) -> list[str]:
        """Pinned adapters whose current version is not in a slot yet: readiness waits for them."""
        with self._lock:
            resident = {(entry.name, entry.version) for entry in self._resident}
        missing = []
        for name in sorted(self.tiers.pinned_names()):
            info = self.tiers.registry.current(name)
            if info is not None and (info.name, info.version) not in resident:
                missing.append(name)
        return missing

    # ---- requests --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        prompt = request.prompt_ids
        if not prompt:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab}); re-tokenize the prompt")
        if request.params.top_k > vocab:
            raise InvalidRequestError(
                f"top_k={request.params.top_k} is larger than the vocabulary ({vocab} tokens); send at most {vocab}, or 0 for off"
            )
        if len(prompt) + request.params.max_tokens > self.max_context:
            raise PromptTooLongError(len(prompt), request.params.max_tokens, self.max_context)
        with self._lock:
            if self._stopped:
                raise EngineStoppedError()
            adapter = None
            if request.adapter is not None:
                adapter = self.tiers.registry.lookup(request.adapter)  # "name" or a pinned "name@version"
                if adapter is None:
                    raise UnknownAdapterError(request.adapter)
            self._admission.check_room(request.tenant)
            handle = RequestHandle(request, adapter, self._cancel)
            if adapter is not None:
                self.tiers.hold(adapter)
            self._admission.enqueue(Pending(request, handle, adapter))
            self._dirty = True
            self._wakeup.notify_all()
        self._load_changed()
        return handle

    @contextmanager
    def same_versions(self) -> Iterator[None]:
        """Requests submitted inside this block get the same version of an adapter: a hot swap
        publishes under the same lock, so it waits until the block ends (a few submits)."""
        with self._lock:
            yield

    def load(self) -> tuple[int, int]:
        """(queued, running) requests now: the part of `stats` a watcher reads at every change."""
        with self._lock:
            return len(self._admission), len(self._rows)

    def watch_load(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` each time a request is queued or queued requests start running (the
        changes that can leave a request waiting while every row is busy), on the thread that
        made the change, holding no lock: it must only hand the news on. Returns the function
        that stops the calls."""
        with self._lock:
            self._load_listeners.append(listener)

        def stop() -> None:
            with self._lock:
                if listener in self._load_listeners:
                    self._load_listeners.remove(listener)

        return stop

    def _load_changed(self) -> None:
        with self._lock:
            listeners = list(self._load_listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # a watcher's failure must not fail a submit or a step
                log.exception("load listener failed")

    def stats(self) -> EngineStats:
        tiers = self.tiers
        with self._lock:
            loads, writes = list(tiers.disk_load_seconds), list(tiers.slot_write_seconds)
            return EngineStats(
                queued=len(self._admission),
                running=len(self._rows),
                max_running=self.config.max_running,
                max_loras=self.config.max_loras,
                resident=list(self._resident),
                running_adapters=dict(Counter(row.adapter.name for row in self._rows if row.adapter)),
                waiting_adapters=dict(Counter(p.adapter.name for p in self._admission if p.adapter)),
                cpu_cache_entries=len(tiers.cpu),
                cpu_cache_bytes=tiers.cpu.nbytes,
                resident_bytes=tiers.slots.resident_bytes,
                kv_cache_bytes=self._pool.nbytes,
                disk_loads=tiers.disk_loads,
                disk_load_seconds_p50=_quantile(loads, 0.5),
                disk_load_seconds_p95=_quantile(loads, 0.95),
                slot_writes=tiers.slot_writes,
                slot_write_seconds_p50=_quantile(writes, 0.5),
                slot_write_seconds_p95=_quantile(writes, 0.95),
                prompt_tokens=self._counters.prompt_tokens,
                completion_tokens=self._counters.completion_tokens,
                completion_tokens_by_adapter=dict(self._counters.by_adapter),
                finished=dict(self._counters.finished),
                steps=self._counters.steps,
                prefix_cache=self._prefix.stats() if self._prefix is not None else None,
                merged_adapter=self._runner.merger.stats() if self._runner.merger is not None else None,
            )

    # ---- the worker ------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            self._dirty = True
            self._wakeup.notify_all()

    def _cancel(self, request_id: str) -> None:  # noqa: ARG002 - the worker reads handle.cancelled
        self._wake()

    def _run(self) -> None:
        claim_compute(self.config.compute_threads)
        try:
            while True:
                with self._lock:
                    self._wakeup.wait_for(lambda: self._stopping or self._dirty or bool(self._rows))
                    if self._stopping:
                        break
                    self._dirty = False
                try:
                    self._step()
                except Exception:  # a bug must not kill the server: fail the rows in flight
                    log.exception("engine step failed")
                    for row in list(self._rows):
                        self._runner.finish(row, "error", error="internal error; the server log has the details")
        finally:
            # Even if the loop itself dies, nothing waits forever: submit refuses from now on.
            with self._lock:
                self._stopped = True
            self._finish_everything("the engine shut down")

    def _step(self) -> None:
        self._collect_versions()
        for row in [row for row in self._rows if row.handle.cancelled]:
            self._runner.finish(row, "cancelled")
        running = len(self._rows)
        self._admission.admit(self._rows, self.tiers.slot_for, self._start_row, self._end_unadmitted)
        if len(self._rows) > running:  # announced once admission has also taken them off the queue
            self._load_changed()
        if self._rows:
            step_isolating(self._runner.step, list(self._rows), lambda row, why: self._runner.finish(row, "error", error=why))
        self._collect_versions()  # versions whose last request just finished
        with self._lock:
            self._resident = self.tiers.resident()
            self._counters.steps += 1

    def _collect_versions(self) -> None:
        """Free released adapter versions (hot swapped, unloaded or unpinned, and no request holds
        them): their slots and CPU copies, and their prefix blocks, which nothing can hit again."""
        for key in self.tiers.collect():
            if self._prefix is not None:
                self._prefix.drop_version(key)

    def _start_row(self, pending: Pending, slot: int, newcomer: bool) -> None:
        params = pending.request.params
        row = Row(
            request=pending.request,
            handle=pending.handle,
            adapter=pending.adapter,
            slot=slot,
            cache_row=self._pool.take(),
            stream=TextStream(self.tokenizer, params.stop),
            generator=params.make_generator(),
            newcomer=newcomer,
        )
        if self._prefix is not None:
            self._prefix.reclaim(row)  # prefix blocks kept in the cache row's memory, before it is written
        with self._lock:  # stats() reads the rows from other threads
            self._rows.append(row)

    def _row_finished(self, row: Row, finished: Finished) -> None:
        """Called by the runner as a row ends: free its cache row and slot at once."""
        with self._lock:
            self._rows.remove(row)
        self._pool.give_back(row.cache_row)
        if self._prefix is not None:
            self._prefix.release(row)
        if row.adapter is not None:
            self.tiers.release(row.adapter)
            self.tiers.drop(row.adapter)
        with self._lock:
            self._count(finished, row.adapter)
            self._resident = self.tiers.resident()
            self._dirty = True  # a freed row or slot may admit a waiting request

    def _end_unadmitted(self, pending: Pending, reason: str, error: str | None) -> None:
        finished = Finished(reason, "", [], len(pending.request.prompt_ids), 0, error=error)
        if pending.adapter is not None:
            self.tiers.drop(pending.adapter)
        with self._lock:
            self._count(finished, pending.adapter)
        pending.handle.push(finished)

    def _count(self, finished: Finished, adapter: AdapterInfo | None) -> None:
        counters = self._counters
        counters.prompt_tokens += finished.prompt_tokens
        counters.completion_tokens += finished.completion_tokens
        counters.by_adapter[adapter.name if adapter else ""] += finished.completion_tokens
        counters.finished[finished.finish_reason] += 1

    def _finish_everything(self, reason: str) -> None:
        for row in list(self._rows):
            self._runner.finish(row, "cancelled", error=reason)
        with self._lock:
            waiting = self._admission.drain()
        for pending in waiting:
            self._end_unadmitted(pending, "cancelled", reason)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
