"""The adapter store on disk: `<root>/<name>/<version>/` PEFT folders (DESIGN decision 6, disk tier).

Versions are immutable. A write goes to a temporary folder in the root (same filesystem) and
appears by one `os.rename`, so a crash at any point leaves either no version or a whole one;
temporary folders are hidden (leading dot), skipped by listing and removed by `clean()` once
their writer process is gone. `<root>/<name>/LATEST` names the newest version and is replaced
atomically.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from adapters.errors import AdapterNotFoundError, StoreError, VersionExistsError
from adapters.peft_io import CONFIG_FILE, WEIGHTS_FILE, read_adapter, write_adapter_files
from adapters.weights import AdapterWeights
from backbone.atomic_folder import fsync_dir

LATEST_FILE = "LATEST"
TEMP_PREFIX = ".tmp-"
LATEST_TEMP_PREFIX = f".{LATEST_FILE}."  # `.LATEST.<pid>-<random>`, renamed over LATEST once written
# Names become folder names (and model names in requests): no separators, no leading dot.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_AUTO_VERSION = re.compile(r"^v(\d+)$")


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- reading -------------------------------------------------------------------------

    def list_adapters(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """The adapter's versions, oldest first (auto versions by number, then others by name)."""
        folder = self.root / _checked(name, "adapter name")
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=_version_order)

    def latest(self, name: str) -> str | None:
        pointer = self.root / _checked(name, "adapter name") / LATEST_FILE
        if pointer.is_file():
            version = pointer.read_text().strip()
            # Only a plain version name counts: a hand-edited "../x" must not lead out of the store.
            if version in self.versions(name):
                return version
        versions = self.versions(name)
        return versions[-1] if versions else None

    def path(self, name: str, version: str | None = None) -> Path:
        """The folder of `name` at `version` (default: latest)."""
        resolved = self.latest(name) if version is None else _checked(version, "version")
        folder = self.root / _checked(name, "adapter name") / str(resolved)
        if resolved is None or not folder.is_dir():
            known = ", ".join(self.versions(name)) or "none"
            raise AdapterNotFoundError(
                f"the store at {self.root} has no adapter {name!r} version {version or 'latest'} "
                f"(versions: {known}); put it first"
            )
        return folder

    # ---- writing -------------------------------------------------------------------------

    def put(self, name: str, adapter: AdapterWeights | str | Path, version: str | None = None) -> str:
        """Store an adapter (parsed weights, or a PEFT folder copied as-is after a check) as a new
        immutable version and point LATEST at it. Returns the version."""
        _checked(name, "adapter name")
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        if version is None:
            version = self._next_version(name)
        _checked(version, "version")
        if (folder / version).exists():
            raise VersionExistsError(
                f"adapter {name!r} version {version!r} already exists in {self.root}; versions are immutable, "
                "put under a new version"
            )
        staging = self.root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            if isinstance(adapter, AdapterWeights):
                write_adapter_files(staging, adapter)
            else:
                _copy_adapter_folder(Path(adapter), staging)
            fsync_dir(staging)
            try:
                os.rename(staging, folder / version)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise VersionExistsError(
                        f"adapter {name!r} version {version!r} was written concurrently; put under a new version"
                    ) from None
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(folder)
        self._set_latest(name, version)
        return version

    def clean(self) -> list[Path]:
        """Remove temporary folders and LATEST pointer files whose writing process has ended;
        returns what was removed."""
        removed = []
        for entry in self.root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and not _writer_alive(entry.name[len(TEMP_PREFIX) :]):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            elif entry.is_dir() and not entry.name.startswith("."):
                for pointer in entry.glob(f"{LATEST_TEMP_PREFIX}*"):
                    if not _writer_alive(pointer.name[len(LATEST_TEMP_PREFIX) :]):
                        pointer.unlink(missing_ok=True)
                        removed.append(pointer)
        return removed

    def _next_version(self, name: str) -> str:
        numbers = [int(m.group(1)) for v in self.versions(name) if (m := _AUTO_VERSION.match(v))]
        return f"v{max(numbers, default=0) + 1}"

    def _set_latest(self, name: str, version: str) -> None:
        pointer = self.root / name / LATEST_FILE
        temporary = pointer.with_name(f"{LATEST_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(temporary, "w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, pointer)


def _copy_adapter_folder(source: Path, destination: Path) -> None:
    read_adapter(source)  # refuse a broken adapter before it becomes a version
    source = source if source.is_dir() else source.parent
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(source / file_name, destination / file_name)
        with open(destination / file_name, "rb") as handle:
            os.fsync(handle.fileno())


def _checked(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise StoreError(
            f"{what} {value!r} is not allowed: use letters, digits, '_', '-', '.', at most 128 characters, "
            "not starting with '.' or '-'"
        )
    return value


def _version_order(version: str) -> tuple[int, int, str]:
    match = _AUTO_VERSION.match(version)
    return (0, int(match.group(1)), "") if match else (1, 0, version)


def _writer_alive(suffix: str) -> bool:
    """For a temporary name's `<pid>-<random>` suffix: is that writer still running?"""
    pid = suffix.split("-", 1)[0]
    return pid.isdigit() and _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
