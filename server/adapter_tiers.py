"""Adapters in tiers (DESIGN decision 6): registry -> CPU cache -> resident slots.

Registration parses and validates an adapter fully on the caller's thread before the name points
at it, so a bad adapter never becomes visible. A request holds its exact version from submit to
finish; a version replaced by a newer one (hot swap) or unregistered is retired, and its slot and
CPU copy are dropped once no request holds it. A version an experiment pins is not retired when
replaced: it stays registered as "name@version" until its last pin is released. While pinned, its
parsed weights are held in the CPU tier (a slot may still drop it): its folder may be overwritten
in place for the next version, so the disk may no longer have its bytes. Held versions count
against `max_cpu_loras`, and at most `max_cpu_loras - 1` versions are pinned, so one entry is
always left for the adapters in rotation. Disk reads of adapters that fell out of the CPU cache
run on a background thread, so only the requests that need them wait; a read-back refuses bytes
other than those registered, so a version is served with its own weights or not at all.

Methods marked "worker" touch the slot table and the LoRA buffers and run only on the engine's
worker thread; the rest are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterChangedError
from adapters.lora_layer import LoraLinear
from adapters.peft_io import load_adapter
from adapters.weights import AdapterWeights
from backbone.config import ModelConfig
from router.adapter_registry import AdapterInfo, AdapterRegistry, adapter_path
from router.cpu_cache import CpuAdapterCache
from router.slot_manager import SlotManager
from server.compute_threads import keep_thread_serial
from server.engine_errors import AdapterSupersededError
from server.slot_copies import SlotCopier, host_tier_weights

log = logging.getLogger(__name__)


TIMINGS_KEPT = 1024  # load/write timings kept for the latency quantiles in stats


class AdapterUnavailableError(RuntimeError):
    """A registered adapter version could not be read back from disk for a request."""


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    version: int
    slot: int
    in_use: int  # running requests on it
    pinned: bool


class AdapterTiers:
    def __init__(
        self,
        model_config: ModelConfig,
        layers: dict[str, LoraLinear],
        *,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        strict_base: bool,
        served_model_name: str,
        wake: Callable[[], None],
    ) -> None:
        self._model_config = model_config
        self._layers = layers
        self._max_rank = max_rank
        self._max_pinned_versions = max_cpu_loras - 1  # held in the CPU tier, leaving one entry for the rest
        self._strict_base = strict_base
        self._served_model_name = served_model_name
        self._wake = wake  # tells the worker something it waits for has happened
        first = next(iter(layers.values()))
        self._slot_dtype, self._slot_device = first.lora_A.dtype, first.lora_A.device
        self.copier = SlotCopier(self._slot_device)  # async slot writes on a GPU
        self.registry = AdapterRegistry()
        self.cpu = CpuAdapterCache(max_cpu_loras)
        self.slots = SlotManager(max_loras)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load", initializer=keep_thread_serial)
        self._lock = threading.Lock()
        self._pin_lock = threading.Lock()  # a version's pin count and its CPU hold change together
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, str] = {}  # key -> why the disk read failed
        self._holds: Counter[str] = Counter()  # key -> requests (queued or running) holding it
        self._retired: set[str] = set()
        self._pinned_names: set[str] = set()
        # The latest timings (for quantiles) and running totals: bounded, however long the server runs.
        self.disk_load_seconds: deque[float] = deque(maxlen=TIMINGS_KEPT)
        self.slot_write_seconds: deque[float] = deque(maxlen=TIMINGS_KEPT)
        self.disk_loads = 0
        self.slot_writes = 0

    # ---- registration (any thread) ---------------------------------------------------------

    def parse(self, path: str | Path, expected_hash: str | None = None) -> AdapterWeights:
        """Read and validate an adapter for this model (raises AdapterError subclasses), as the
        CPU tier keeps it (the slots' dtype; pinned for a GPU); with `expected_hash`, only the
        exact bytes registered are accepted."""
        weights = load_adapter(
            path,
            self._model_config,
            max_rank=self._max_rank,
            strict_base=self._strict_base,
            served_model_name=self._served_model_name,
            expected_hash=expected_hash,
        )
        return host_tier_weights(weights, self._slot_dtype, self._slot_device)

    def register(self, name: str, path: str | Path, publish_lock: AbstractContextManager = nullcontext()) -> AdapterInfo:
        """Parse and validate (slow, no lock), then publish the new version under `publish_lock`."""
        if not name or "@" in name:
            raise ValueError(f"adapter name {name!r} is invalid: use a non-empty name without '@'")
        started = time.monotonic()
        weights = self.parse(path)
        seconds = time.monotonic() - started
        version = self.registry.reserve_version(name)
        info = AdapterInfo(
            name=name,
            version=version,
            path=adapter_path(path),
            rank=weights.max_rank,
            target_modules=tuple(sorted(weights.tensors)),
            base_model_name_or_path=weights.config.base_model_name_or_path,
            warnings=tuple(weights.warnings),
            content_hash=weights.content_hash,
        )
        self.cpu.put(info.key, weights)
        with self._lock:
            self.disk_load_seconds.append(seconds)
            self.disk_loads += 1
        with publish_lock:
            replaced = self.registry.publish(info)
            if replaced is not None and not self.registry.is_kept(replaced.key):
                self.retire(replaced.key)
            if replaced is info:  # a newer registration of the name won while this one loaded
                current = self.registry.current(name)
                raise AdapterSupersededError(name, info.version, current.version if current else info.version)
        log.info("adapter %s registered from %s (rank %d, %d modules)", info.key, info.path, info.rank, len(info.target_modules))
        return info

    def unregister(self, name: str) -> AdapterInfo | None:
        info = self.registry.remove(name)
        if info is not None:
            if not self.registry.is_kept(info.key):
                self.retire(info.key)
            with self._lock:
                self._pinned_names.discard(name)
        return info

    def pin_version(self, reference: str) -> AdapterInfo:
        """Keep "name@version" registered and its weights in CPU memory until `release_version`,
        even after `name` is hot swapped or unregistered (raises UnknownVersionError, OverflowError
        past the bound). A version already out of the CPU tier is read back in the background."""
        with self._pin_lock:
            info = self.registry.pin(reference, self._max_pinned_versions)
            self.cpu.hold(info.key)
        if info.key not in self.cpu:
            self._prefetch(info)
        return info

    def release_version(self, key: str) -> None:
        """Release one pin; the last one lets the weights leave the CPU tier, and retires a
        replaced version like any old version."""
        with self._pin_lock:
            released = self.registry.unpin(key)
            if key not in self.registry.pinned():
                self.cpu.unhold(key)
        if released is not None:
            self.retire(released.key)

    # ---- request lifetime (any thread) -------------------------------------------------------

    def hold(self, info: AdapterInfo) -> None:
        with self._lock:
            self._holds[info.key] += 1

    def drop(self, info: AdapterInfo) -> None:
        with self._lock:
            self._holds[info.key] -= 1
            if self._holds[info.key] <= 0:
                del self._holds[info.key]

    def retire(self, key: str) -> None:
        """No new requests get `key`; the worker frees it when nothing holds it."""
        with self._lock:
            self._retired.add(key)
        self._wake()

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock:
            if pinned and name not in self._pinned_names and len(self._pinned_names) + 1 >= self.slots.num_slots:
                # Every slot pinned would leave other adapters' requests waiting forever.
                raise ValueError(
                    f"pinning {name!r} would leave no unpinned slot of {self.slots.num_slots}; "
                    "unpin another adapter or raise max_loras"
                )
            (self._pinned_names.add if pinned else self._pinned_names.discard)(name)
        self._wake()

    def pinned_names(self) -> set[str]:
        """Names pinned by an operator (resident now, or as soon as a slot frees)."""
        with self._lock:
            return set(self._pinned_names)

    # ---- the worker --------------------------------------------------------------------------

    def slot_for(self, info: AdapterInfo) -> int | None:
        """worker: the slot serving `info` for one more request (acquired), or None when the
        request must wait (its weights are being read, or every slot is busy)."""
        key = info.key
        if self.slots.slot_of(key) is not None:
            return self.slots.acquire(key)
        weights = self.cpu.get(key)
        if weights is None:
            self._start_disk_load(info)
            return None
        if not self.slots.can_place():
            return None
        self._place(key, weights)
        return self.slots.acquire(key)

    def release(self, info: AdapterInfo) -> None:
        """worker: a running request on `info` finished."""
        self.slots.release(info.key)

    def collect(self) -> set[str]:
        """worker: drop retired versions nothing holds; apply pins. Returns the keys of the
        versions dropped: from now on no request, queued or running, can use them."""
        with self._lock:
            idle = {key for key in self._retired if self._holds[key] == 0}
            self._retired -= idle
            pinned_names = set(self._pinned_names)
            for key in idle:
                self._failed.pop(key, None)
        for key in idle:
            slot = self.slots.slot_of(key)
            if self.slots.retire(key) and slot is not None:
                self.copier.clear(self._layers, slot)  # so a stale adapter cannot leak into a bug's output
            self.cpu.pop(key)
        for _, entry in self.slots.entries():
            if not entry.retired:
                name = entry.key.rpartition("@")[0]
                current = self.registry.current(name) if name in pinned_names else None
                wanted = current is not None and current.key == entry.key  # only the current version
                (self.slots.pin if wanted else self.slots.unpin)(entry.key)
        for name in pinned_names:
            info = self.registry.current(name)
            if info is None or self.slots.slot_of(info.key) is not None:
                continue
            weights = self.cpu.get(info.key)
            if weights is None:
                self._start_disk_load(info)
            elif self.slots.can_place():
                self._place(info.key, weights)
                self.slots.pin(info.key)
        return idle

    def resident(self) -> list[ResidentAdapter]:
        """worker: the slot table."""
        return [
            ResidentAdapter(entry.key.rpartition("@")[0], int(entry.key.rpartition("@")[2]), slot, entry.refcount, entry.pinned)
            for slot, entry in self.slots.entries()
        ]

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- internals ---------------------------------------------------------------------------

    def _place(self, key: str, weights: AdapterWeights) -> None:
        started = time.monotonic()
        placement = self.slots.place(key, weights.nbytes)
        self.copier.write(self._layers, placement.slot, weights)
        with self._lock:
            self.slot_write_seconds.append(time.monotonic() - started)
            self.slot_writes += 1
        if placement.evicted:
            log.debug("adapter %s evicted from slot %d for %s", placement.evicted, placement.slot, key)

    def _start_disk_load(self, info: AdapterInfo) -> None:
        with self._lock:
            if info.key in self._failed:
                raise AdapterUnavailableError(self._failed[info.key])
        self._prefetch(info)

    def _prefetch(self, info: AdapterInfo) -> None:
        """Start reading `info` back from disk unless a read is running or has failed."""
        with self._lock:
            if info.key in self._loading or info.key in self._failed:
                return
            self._loading[info.key] = self._loader.submit(self._load_from_disk, info)

    def _load_from_disk(self, info: AdapterInfo) -> None:
        started = time.monotonic()
        try:
            # A path can be swapped after registration (a file replaced, a symlink pointed out of
            # the root): only the bytes that were validated and registered are served.
            weights = self.parse(info.path, expected_hash=info.content_hash or None)
        except Exception as err:  # the file changed or vanished since registration
            log.error("adapter %s could not be read back from %s: %s", info.key, info.path, err)
            # Clients see no server paths or exception text; the log above has them.
            why = ": its files changed on disk since it was registered" if isinstance(err, AdapterChangedError) else ""
            # Loading a name again makes a new version, which a pinned version's experiment does not follow.
            fix = ("register its files again and point the experiment at the new version"
                   if info.key in self.cpu.held() else "load it again")  # fmt: skip
            with self._lock:
                self._failed[info.key] = f"adapter {info.key} could not be read back from disk{why}; {fix}"
        else:
            self.cpu.put(info.key, weights)
            with self._lock:
                self.disk_load_seconds.append(time.monotonic() - started)
                self.disk_loads += 1
        finally:
            with self._lock:
                self._loading.pop(info.key, None)
            self._wake()
