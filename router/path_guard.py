"""Adapter paths from HTTP clients are accepted only inside the configured adapter roots.

A client-supplied path could otherwise read any file the server can (`../../etc`, a symlink
planted inside a root that points out of it). We refuse `..` outright, resolve symlinks, and
check the resolved folder and every file in it against the resolved roots."""

from __future__ import annotations

import os
from pathlib import Path


# What Linux file systems accept (PATH_MAX, NAME_MAX); longer fails with ENAMETOOLONG anyway.
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 255


class AdapterPathError(ValueError):
    """A client-supplied adapter path is malformed (400)."""


class AdapterPathForbiddenError(AdapterPathError):
    """The path lies outside every adapter root, or no roots are configured (403)."""


class AdapterPathNotFoundError(AdapterPathError):
    """The path is inside a root but does not exist (404)."""


class PathGuard:
    def __init__(self, roots: list[str | Path]) -> None:
        # Roots are resolved once: a root that is itself a symlink is the operator's choice.
        self.roots = [Path(root).expanduser().resolve() for root in roots]
        # Clients may spell a root as configured (before symlinks are resolved) too.
        self._lexical_roots = self.roots + [Path(os.path.abspath(Path(root).expanduser())) for root in roots]

    def resolve(self, raw: str) -> Path:
        """The real folder `raw` names, if it is inside a root; relative paths are relative to the
        first root that holds them."""
        try:
            return self._resolve(raw)
        except OSError as err:  # a name too long, a symlink loop: the client's path, not our fault
            raise AdapterPathError(f"lora_path {str(raw)[:80]!r} cannot be opened: {err.strerror or err}") from None
        except RuntimeError as err:  # pathlib's "Symlink loop from ..." on older Pythons
            raise AdapterPathError(f"lora_path {str(raw)[:80]!r} cannot be opened: {err}") from None

    def _resolve(self, raw: str) -> Path:
        if not self.roots:
            raise AdapterPathForbiddenError(
                "loading adapters by path over HTTP is disabled; start the server with --adapter-root DIR "
                "to allow paths under DIR"
            )
        if not isinstance(raw, str) or not raw.strip():
            raise AdapterPathError("lora_path is empty; give a folder under an adapter root")
        if "\x00" in raw:
            raise AdapterPathError("lora_path contains a NUL byte")
        if len(raw) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in raw.split("/")):
            raise AdapterPathError(
                f"lora_path is {len(raw)} characters long; a path must be at most {MAX_PATH_CHARS} characters "
                f"with names of at most {MAX_NAME_CHARS}"
            )
        path = Path(raw).expanduser() if raw.startswith("~") else Path(raw)
        if ".." in path.parts:
            raise AdapterPathError(f"lora_path {raw!r} contains '..'; give a path inside an adapter root without '..'")
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        for candidate in candidates:
            if not self._inside(Path(os.path.abspath(candidate)), self._lexical_roots):
                continue
            if not candidate.exists():
                if os.path.lexists(candidate):
                    raise AdapterPathError(f"lora_path {raw!r} is a symlink that leads nowhere (broken, or a loop)")
                continue
            real = candidate.resolve(strict=True)
            if not self._inside(real, self.roots):
                raise self._forbidden(raw, "it resolves (through a symlink) outside")
            if not real.is_dir():
                raise AdapterPathError(f"lora_path {raw!r} is not a folder; give the adapter's folder")
            self._check_entries(raw, real)
            return real
        if path.is_absolute() and not self._inside(Path(os.path.abspath(path)), self._lexical_roots):
            raise self._forbidden(raw, "it is outside")
        raise AdapterPathNotFoundError(f"lora_path {raw!r} does not exist under the adapter roots")

    def _check_entries(self, raw: str, folder: Path) -> None:
        # The adapter files themselves may be symlinks; each must stay inside a root too.
        for entry in folder.iterdir():
            if entry.is_symlink() and not self._inside(entry.resolve(), self.roots):
                raise self._forbidden(raw, f"its file {entry.name!r} links")

    @staticmethod
    def _inside(path: Path, roots: list[Path]) -> bool:
        return any(path.is_relative_to(root) for root in roots)

    def _forbidden(self, raw: str, why: str) -> AdapterPathForbiddenError:
        roots = ", ".join(str(root) for root in self.roots)
        return AdapterPathForbiddenError(
            f"lora_path {raw!r} is refused: {why} the adapter roots ({roots}); place the adapter under a root"
        )
