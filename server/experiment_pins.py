"""Adapter versions that experiments pin ("name@version"): each is held registered, across hot
swaps and unloads of its name, while an experiment that names it exists.

Version numbers restart with the process, so the store keeps each pin's content hash and a
restart checks the weights, not the number."""

from __future__ import annotations

import threading
from typing import Protocol

from router.adapter_registry import AdapterInfo, UnknownVersionError
from router.experiments import Experiment


class ExperimentAdapterError(ValueError):
    """An arm or the shadow names an adapter that is not loaded, or a version not registered."""


class PinnedVersionLimitError(ValueError):
    """Pinning one more adapter version would pass the bound on versions kept registered."""


class AdapterVersions(Protocol):
    """Keeps pinned adapter versions registered across hot swaps; the engine implements it."""

    def pin_adapter_version(self, reference: str) -> AdapterInfo: ...

    def release_adapter_version(self, key: str) -> None: ...


class VersionPins:
    def __init__(self, versions: AdapterVersions | None) -> None:
        self._versions = versions  # None: a server part with no engine (tests): nothing can be pinned
        self._held: dict[str, list[AdapterInfo]] = {}  # experiment -> the versions it holds
        self._lock = threading.Lock()

    def pin(self, experiment: Experiment) -> list[AdapterInfo]:
        """Pin every "name@version" the experiment names, all or none; the caller `hold`s them
        once the definition is stored, or `release`s them."""
        pinned: list[AdapterInfo] = []
        try:
            for reference in experiment.pinned_versions:
                if self._versions is None:
                    raise ExperimentAdapterError(f"adapter version {reference!r} cannot be pinned: this server keeps no old versions")
                pinned.append(self._versions.pin_adapter_version(reference))
        except UnknownVersionError as err:
            self.release(pinned)
            raise ExperimentAdapterError(f"experiment {experiment.name!r}: {err}") from None
        except OverflowError as err:
            self.release(pinned)
            raise PinnedVersionLimitError(f"experiment {experiment.name!r}: {err}") from None
        except BaseException:
            self.release(pinned)
            raise
        return pinned

    def hold(self, name: str, pinned: list[AdapterInfo]) -> list[AdapterInfo]:
        """`pinned` is now what experiment `name` holds; returns what it held before, to release."""
        with self._lock:
            previous, self._held[name] = self._held.get(name, []), pinned
        return previous

    def drop(self, name: str) -> None:
        """The experiment is gone: its versions are released."""
        with self._lock:
            held = self._held.pop(name, [])
        self.release(held)

    def release(self, pinned: list[AdapterInfo]) -> None:
        if self._versions is not None:
            for info in pinned:
                self._versions.release_adapter_version(info.key)

    def restore(self, experiment: Experiment, stored_hashes: dict[str, str]) -> str:
        """At startup: hold a stored experiment's pins if each names the same weights as when it
        was defined; otherwise hold nothing and say what is wrong."""
        try:
            pinned = self.pin(experiment)
        except (ExperimentAdapterError, PinnedVersionLimitError) as err:
            return str(err)
        changed = [info.key for info in pinned if stored_hashes.get(info.key) != info.content_hash]
        if changed:
            self.release(pinned)
            return f"pinned version(s) {changed} are other weights than when it was defined"
        self.hold(experiment.name, pinned)
        return ""
