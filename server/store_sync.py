"""Follow a shared adapter store (DESIGN decision 11): replicas share a store, not state.

A replica started with `--adapter-store DIR --sync` serves every adapter of the store under its
name and polls the store's LATEST pointers. Publishing a version once (`loraplex adapter publish`)
reaches every replica within a poll interval; each registers it as a new version of the name, so
requests already running finish on the old one (the engine's hot swap). An adapter removed from
the store is unregistered, but only if this sync registered it: adapters loaded by hand stay.

Polling, not inotify: shared storage (NFS, a Kubernetes volume) rarely delivers inotify events
from other hosts, and listing a few hundred small LATEST files every couple of seconds is cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import AdapterError
from adapters.store import AdapterStore
from router.path_guard import AdapterPathError, AdapterPathNotFoundError

log = logging.getLogger("loraplex.store_sync")

STORE_PREFIX = "store:"


@dataclass
class SyncReport:
    """What one pass over the store did: shown in the log and returned to tests."""

    registered: list[str] = field(default_factory=list)  # "name@store-version"
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # "name@store-version" -> why


class StoreSync:
    def __init__(
        self,
        store: AdapterStore,
        register: Callable[[str, Path], object],
        unregister: Callable[[str], None],
        interval: float = 2.0,
    ) -> None:
        self.store = store
        self._register = register  # Engine.register_adapter
        self._unregister = unregister  # Engine.unregister_adapter
        self.interval = interval
        self._served: dict[str, str] = {}  # adapter name -> store version this replica serves
        self._refused: dict[str, str] = {}  # name -> store version that failed (not retried until it changes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def sync_once(self) -> SyncReport:
        """Register every adapter whose store LATEST differs from what we serve; drop the gone."""
        report = SyncReport()
        names = self.store.list_adapters()
        for name in names:
            version = self.store.latest(name)
            if version is None or self._served.get(name) == version or self._refused.get(name) == version:
                continue
            key = f"{name}@{version}"
            try:
                self._register(name, self.store.path(name, version))
            except (AdapterError, ValueError, OSError) as err:
                # A broken version must not stop the others, nor be retried every pass: the
                # previous version (if any) keeps serving until a good one is published.
                self._refused[name] = version
                report.failed[key] = str(err)
                log.error("store adapter %s refused, still serving %s: %s", key, self._served.get(name, "nothing"), err)
                continue
            self._served[name] = version
            self._refused.pop(name, None)
            report.registered.append(key)
            log.info("store adapter %s now served", key)
        for name in sorted(set(self._served) - set(names)):
            try:
                self._unregister(name)
            except (KeyError, ValueError):
                pass  # already unloaded by an admin
            del self._served[name]
            report.removed.append(name)
            log.info("store adapter %s left the store; unloaded", name)
        self.passes += 1
        return report

    @property
    def served(self) -> dict[str, str]:
        return dict(self._served)

    def start(self) -> None:
        """Poll in a daemon thread until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-sync", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync_once()
            except Exception:  # a flaky shared filesystem must not end the sync for good
                log.exception("adapter store sync pass failed; retrying in %.1f s", self.interval)


def resolve_store_reference(reference: str, store: AdapterStore | None) -> Path:
    """The folder of `store:NAME` (latest) or `store:NAME@VERSION`."""
    spec = reference[len(STORE_PREFIX) :]
    if store is None:
        raise AdapterPathError(
            f"lora_path {reference!r} names the adapter store, but this server has none; start it with --adapter-store DIR"
        )
    name, _, version = spec.partition("@")
    try:
        return store.path(name, version or None)
    except AdapterError as err:  # a malformed name or an absent version
        raise AdapterPathNotFoundError(f"lora_path {reference!r}: {err}") from None
