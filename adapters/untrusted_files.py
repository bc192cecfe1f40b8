"""Reading an adapter's two files as untrusted input.

An adapter folder may come from anyone who can write under an adapter root. So: the folder is
opened once and both files are opened inside it without following symbolic links (a file swapped
for a link after registration is refused at the read, whatever it points to); only regular files
are read (no FIFO or device to block on); the config is read up to MAX_CONFIG_BYTES; the
safetensors header is read and checked (dtypes, shapes, offsets, and the budget of what the base
model can use) before a single tensor byte is, so a 12 KB sparse file claiming a 2 GiB tensor is
refused for a few KB of reads; and the bytes parsed are the bytes hashed, so a registered
adapter's content can be pinned and checked whenever it is read again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from adapters.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    CorruptAdapterFileError,
    LinkedAdapterFileError,
    OversizedAdapterError,
    RankTooLargeError,
)

MAX_CONFIG_BYTES = 1 << 20  # PEFT configs are a few KB
MAX_HEADER_BYTES = 16 << 20  # a header lists names, dtypes, shapes: KBs per thousand tensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # LoRA weights are floats


@dataclass(frozen=True)
class WeightBudget:
    """What the base model can use, so anything larger is refused from the header alone."""

    max_tensors: int  # two per targetable module
    max_dim: int  # the widest module side
    max_rank: int  # the server's rank limit, else max_dim


@dataclass(frozen=True)
class AdapterBytes:
    config: bytes
    tensors: dict[str, torch.Tensor]
    content_hash: str  # sha256 over both files' bytes as parsed


def read_adapter_files(config_file: Path, weights_file: Path, budget: WeightBudget | None) -> AdapterBytes:
    """Both files of one adapter folder (`config_file` and `weights_file` must share it)."""
    if config_file.parent != weights_file.parent:
        raise ValueError(f"{config_file} and {weights_file} are not in one folder")
    folder = _open_folder(weights_file.parent)
    try:
        config = _read_capped(folder, config_file, MAX_CONFIG_BYTES, "adapter configs are a few KB; this is not one")
        weights = _read_checked_safetensors(folder, weights_file, budget)
    finally:
        os.close(folder)
    digest = hashlib.sha256()
    digest.update(len(config).to_bytes(8, "little"))
    digest.update(config)
    digest.update(weights)
    try:
        tensors = load_safetensors(weights)
    except Exception as err:  # safetensors raises its own error types for a malformed body
        raise CorruptAdapterFileError(f"{weights_file} is truncated or corrupt ({err}); copy or save the adapter again") from None
    return AdapterBytes(config, tensors, digest.hexdigest())


def _open_folder(folder: Path) -> int:
    """A descriptor of the folder's real location, which its files are then opened in."""
    real = os.path.realpath(folder)
    try:
        descriptor = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterNotFoundError(f"adapter folder {folder} not found") from None
    except OSError as err:
        raise AdapterNotFoundError(f"adapter folder {folder} cannot be opened ({err.strerror}); check it and its permissions") from None
    opened = _descriptor_path(descriptor)
    if opened is not None and opened != real:  # a folder on the way was swapped for a link just now
        os.close(descriptor)
        raise LinkedAdapterFileError(f"adapter folder {folder} moved while it was opened; load the adapter again")
    return descriptor


def _descriptor_path(descriptor: int) -> str | None:
    """Where an open descriptor really is (Linux's /proc), or None where that cannot be asked."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return None


def _open_regular(folder: int, file: Path) -> tuple[int, int]:
    """(descriptor, size) of a regular file directly in `folder`, never through a link; FIFOs and
    devices are refused before any read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(file.name, flags, dir_fd=folder)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{file} not found: a PEFT adapter folder needs {file.name}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise LinkedAdapterFileError(
                f"{file} is a symbolic link; adapter files are read only as plain files in the adapter's folder, "
                "never through a link: copy the file itself into the folder and load the adapter again"
            ) from None
        raise AdapterNotFoundError(f"{file} cannot be opened ({err.strerror}); check its permissions") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise AdapterNotFoundError(f"{file} is not a regular file; an adapter's files must be plain files")
    return descriptor, info.st_size


def _read_capped(folder: int, file: Path, limit: int, why: str) -> bytes:
    descriptor, size = _open_regular(folder, file)
    try:
        if size > limit:
            raise AdapterConfigError(f"{file} is {size} bytes, over the limit of {limit}; {why}")
        return _read_exactly(descriptor, size, file)
    finally:
        os.close(descriptor)


def _read_exactly(descriptor: int, size: int, file: Path) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = os.read(descriptor, min(left, 1 << 24))
        if not chunk:
            raise CorruptAdapterFileError(f"{file} is truncated or corrupt (it ended early); copy or save the adapter again")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_checked_safetensors(folder: int, file: Path, budget: WeightBudget | None) -> bytes:
    descriptor, size = _open_regular(folder, file)
    try:
        if size < 8:
            raise CorruptAdapterFileError(f"{file} is truncated or corrupt ({size} bytes); copy or save the adapter again")
        prefix = _read_exactly(descriptor, 8, file)
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptAdapterFileError(
                f"{file} is truncated or corrupt (its header claims {header_size} bytes); copy or save the adapter again"
            )
        header_bytes = _read_exactly(descriptor, header_size, file)
        data_size = _check_header(file, header_bytes, size - 8 - header_size, budget)
        return prefix + header_bytes + _read_exactly(descriptor, data_size, file)
    finally:
        os.close(descriptor)


def _check_header(file: Path, header_bytes: bytes, available: int, budget: WeightBudget | None) -> int:
    """The data bytes the header's tensors occupy, after checking every entry."""
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptAdapterFileError(f"{file} is truncated or corrupt (header: {err}); copy or save the adapter again") from None
    if not isinstance(header, dict):
        raise CorruptAdapterFileError(f"{file} is truncated or corrupt (header is not an object); copy or save the adapter again")
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    if budget is not None and len(entries) > budget.max_tensors:
        raise OversizedAdapterError(
            f"{file} holds {len(entries)} tensors, more than the {budget.max_tensors} a LoRA adapter of this base "
            "model can have; it was made for another model"
        )
    end = 0
    for key, entry in entries.items():
        shape, dtype, offsets = _entry_fields(file, key, entry)
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != size or offsets[1] > available:
            raise CorruptAdapterFileError(
                f"{file}: tensor {key!r} lies outside the file's data: the file is truncated or corrupt; "
                "copy or save the adapter again"
            )
        if budget is not None:
            _check_budget(file, key, shape, budget)
        end = max(end, offsets[1])
    return end


def _entry_fields(file: Path, key: str, entry: object) -> tuple[list[int], str, list[int]]:
    if not isinstance(entry, dict):
        raise CorruptAdapterFileError(f"{file}: header entry {key!r} is malformed; copy or save the adapter again")
    shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CorruptAdapterFileError(f"{file}: tensor {key!r} has dtype {dtype!r}; LoRA weights are floats")
    integers = [*(shape or []), *(offsets or [])] if isinstance(shape, list) and isinstance(offsets, list) else None
    if integers is None or len(offsets) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in integers):
        raise CorruptAdapterFileError(f"{file}: header entry {key!r} is malformed; copy or save the adapter again")
    return shape, dtype, offsets


def _check_budget(file: Path, key: str, shape: list[int], budget: WeightBudget) -> None:
    if len(shape) != 2:
        return  # a vector is refused with its reason (DoRA, ...) once the names are read; it is small
    rank = shape[0] if ".lora_A" in key else shape[1]
    if rank > budget.max_rank:
        raise RankTooLargeError(
            f"{file}: tensor {key!r} has rank {rank}, above the maximum rank {budget.max_rank}; raise the maximum "
            "rank (--max-rank / --max-lora-rank) or use a lower-rank adapter"
        )
    if max(shape) > budget.max_dim:
        raise OversizedAdapterError(
            f"{file}: tensor {key!r} declares shape {tuple(shape)}, larger than any LoRA weight for this base model "
            f"(sides up to {budget.max_dim}, rank up to {budget.max_rank}); it was made for another model"
        )
