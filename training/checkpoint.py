"""Training checkpoints: everything a resumed run needs to continue exactly, in one file per step
(`checkpoints/step-000100.pt`), written atomically (temp + rename).

A save killed before its rename leaves its hidden staging file behind; the run's next save or
resume removes such leftovers (one run owns its checkpoint folder, so any staging entry found
then belongs to a save that will never finish)."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d+)\.pt$")
# The staging names `save_checkpoint` makes (`.step-000100.pt.tmp-<hex>`); pid-named ones from
# before the random token match too. Nothing else in the folder is ever removed.
_STAGING_NAME = re.compile(r"^\.step-\d+\.pt\.tmp-[0-9a-f]+$")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing or does not belong to this run's config."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)  # before this save's own staging exists, so never that one
    path = folder / f"step-{step:06d}.pt"
    # An unguessable name, created fresh and never through a symlink: another user who can write
    # to the folder cannot plant a link that makes us overwrite a file of theirs choosing.
    staging = folder / f".{path.name}.tmp-{secrets.token_hex(16)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        with os.fdopen(os.open(staging, flags, 0o600), "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Remove the staging files (or folders) that killed saves left in `output_dir/checkpoints`;
    returns what was removed. Call it only from the run that owns the folder, between saves."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not _STAGING_NAME.match(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()  # a symlink goes, never what it points at
        except FileNotFoundError:
            continue
        except OSError as error:  # a leftover we cannot remove must not stop training
            log.warning("could not remove the stale checkpoint staging %s: %s", entry, error)
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d stale checkpoint staging entries (left by interrupted saves) from %s: %s",
                 len(removed), folder, ", ".join(entry.name for entry in removed))
    return removed


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(output_dir: str | Path, path: str | Path | None = None) -> dict[str, Any]:
    """The given checkpoint file, or the latest in `output_dir/checkpoints`."""
    if path is None:
        existing = list_checkpoints(output_dir)
        if not existing:
            raise CheckpointError(
                f"--resume found no checkpoint in {checkpoint_dir(output_dir)}; set checkpoint.every > 0 and train first"
            )
        path = existing[-1]
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a step-NNNNNN.pt file or no path for the latest")
    return torch.load(path, map_location="cpu", weights_only=True)
