"""Registered adapters by name, each with numbered versions.

A name points at its current version; registering the name again publishes a new version (a hot
swap) while requests already holding the old `AdapterInfo` keep it. Version numbers only grow,
across unregistering too, so "name@version" names one set of weights for the life of the process.

A version can be pinned (an experiment arm that must keep answering with exactly those weights):
a pinned version that a hot swap or an unregister replaces is kept, reachable as "name@version"
only, until its last pin is released. Plain "name" always means the current version.
Thread-safe: HTTP handlers register while the engine looks names up.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
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


VERSION_REFERENCE = re.compile(r"^(?P<name>[^@]+)@(?P<version>[1-9][0-9]{0,8})$")


class UnknownVersionError(LookupError):
    """A "name@version" reference to a version that is neither current nor kept."""

    def __init__(self, reference: str, current: AdapterInfo | None) -> None:
        now = f"its current version is {current.key}" if current else "no version of that name is registered"
        super().__init__(
            f"adapter version {reference!r} is not registered ({now}); an old version stays registered only "
            "while an experiment pins it: pin a registered version, or name the adapter without @VERSION for the latest"
        )
        self.reference = reference


def split_reference(reference: str) -> tuple[str, int | None]:
    """"name" -> (name, None), the current version; "name@7" -> (name, 7), that exact version."""
    if "@" not in reference:
        return reference, None
    match = VERSION_REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"adapter reference {reference!r} is invalid; write NAME for the latest or NAME@VERSION (a positive integer)")
    return match["name"], int(match["version"])


class AdapterRegistry:
    def __init__(self) -> None:
        self._current: dict[str, AdapterInfo] = {}
        self._last_version: dict[str, int] = {}
        self._kept: dict[str, AdapterInfo] = {}  # key -> a replaced version kept for its pins
        self._pins: Counter[str] = Counter()  # key -> pins held on that version
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
            self._keep_if_pinned(previous)
            return previous

    def remove(self, name: str) -> AdapterInfo | None:
        """Unregister `name`; returns its current version, or None if it was not registered."""
        with self._lock:
            previous = self._current.pop(name, None)
            self._keep_if_pinned(previous)
            return previous

    def _keep_if_pinned(self, info: AdapterInfo | None) -> None:
        if info is not None and self._pins[info.key] > 0:
            self._kept[info.key] = info

    def is_kept(self, key: str) -> bool:
        """Whether a replaced version stays registered for its pins (the caller must not retire it)."""
        with self._lock:
            return key in self._kept

    def lookup(self, reference: str) -> AdapterInfo | None:
        """The version a request names: "name" -> the current one, "name@7" -> exactly version 7
        if it is current or kept. A malformed reference finds nothing."""
        try:
            name, version = split_reference(reference)
        except ValueError:
            return None
        with self._lock:
            return self._find(name, version)

    def _find(self, name: str, version: int | None) -> AdapterInfo | None:
        current = self._current.get(name)
        if version is None or (current is not None and current.version == version):
            return current
        return self._kept.get(f"{name}@{version}")

    def pin(self, reference: str, max_pinned: int | None = None) -> AdapterInfo:
        """Hold "name@version" registered until `unpin`, whatever replaces it; at most `max_pinned`
        distinct versions pinned at once (raises OverflowError past it)."""
        name, version = split_reference(reference)
        if version is None:
            raise ValueError(f"adapter reference {reference!r} names no version; pin NAME@VERSION")
        with self._lock:
            info = self._find(name, version)
            if info is None:
                raise UnknownVersionError(reference, self._current.get(name))
            if self._pins[info.key] == 0 and max_pinned is not None and len(self._pins) >= max_pinned:
                raise OverflowError(
                    f"pinning {info.key} would keep more than {max_pinned} pinned adapter versions registered; "
                    "delete an experiment that pins an old version, or raise max_cpu_loras"
                )
            self._pins[info.key] += 1
            return info

    def unpin(self, key: str) -> AdapterInfo | None:
        """Release one pin of `key`; returns the version when that was its last pin and it is no
        longer current (the caller retires it), else None."""
        with self._lock:
            if self._pins.get(key, 0) <= 0:
                return None
            self._pins[key] -= 1
            if self._pins[key] > 0:
                return None
            del self._pins[key]
            return self._kept.pop(key, None)

    def pinned(self) -> dict[str, int]:
        """Pinned version keys and how many pins each has."""
        with self._lock:
            return dict(self._pins)

    def kept_infos(self) -> list[AdapterInfo]:
        """Replaced versions still registered for their pins."""
        with self._lock:
            return sorted(self._kept.values(), key=lambda info: info.key)

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
