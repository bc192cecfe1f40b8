"""Registered adapters by name, each with numbered versions.

A name points at its current version; registering the name again publishes a new version (a hot
swap) while requests already holding the old `AdapterInfo` keep it. Version numbers only grow,
across unregistering too, so "name@version" names one set of weights for the life of the process.
Thread-safe: HTTP handlers register while the engine looks names up.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: int
    path: str
    rank: int
    target_modules: tuple[str, ...]  # module paths the adapter changes
    base_model_name_or_path: str | None  # as recorded in adapter_config.json (advisory)
    warnings: tuple[str, ...] = ()  # e.g. a base model name that differs from the served one
    content_hash: str = ""  # of the files as registered: a later read must find the same bytes
    created: float = field(default_factory=time.time)  # unix time of registration

    @property
    def key(self) -> str:
        """Identifies these exact weights: slots and caches are keyed by it."""
        return f"{self.name}@{self.version}"


class AdapterRegistry:
    def __init__(self) -> None:
        self._current: dict[str, AdapterInfo] = {}
        self._last_version: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve_version(self, name: str) -> int:
        """The version number a registration of `name` in progress will publish."""
        with self._lock:
            version = self._last_version.get(name, 0) + 1
            self._last_version[name] = version
            return version

    def publish(self, info: AdapterInfo) -> AdapterInfo | None:
        """Make `info` the current version of its name; returns the version it replaces (None
        if none). A slower registration that finishes after a newer one does not win."""
        with self._lock:
            previous = self._current.get(info.name)
            if previous is not None and previous.version > info.version:
                return info  # already superseded: the caller retires it at once
            self._current[info.name] = info
            return previous

    def remove(self, name: str) -> AdapterInfo | None:
        """Unregister `name`; returns its current version, or None if it was not registered."""
        with self._lock:
            return self._current.pop(name, None)

    def current(self, name: str) -> AdapterInfo | None:
        with self._lock:
            return self._current.get(name)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return sorted(self._current.values(), key=lambda info: info.name)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def __len__(self) -> int:
        with self._lock:
            return len(self._current)


def adapter_path(path: str | Path) -> str:
    """The absolute path recorded for an adapter folder."""
    return str(Path(path).expanduser().resolve())
