"""Publish a folder written in private (a staging folder beside the target) under its final name.

Readers see the old folder or the new one, never a half-written one; a crash before the rename
leaves only a hidden staging folder. Used for converted models, adapters and training outputs;
`write_atomically` does the same for one file (reports, charts).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def staging_folder(target: Path) -> Path:
    """A fresh hidden folder beside `target`, on the same file system so the rename is atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def replace_folder(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`. An existing target is moved aside first, put back if the
    rename fails, and removed once the new folder is in place."""
    retired = None
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        if retired is not None:
            os.rename(retired, target)
        raise
    fsync_dir(target.parent)  # the rename itself survives a power cut
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(staging)` on a temporary file beside `path`, then rename it over `path`."""
    staging = path.with_name(f".{path.name}.tmp")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
