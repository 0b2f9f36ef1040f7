"""Reading JSON and writing files atomically, for every file memplan reads or writes (stdlib only).

Atomic: the content goes to a hidden temporary file in the target's folder (same filesystem, so the rename is
atomic), is flushed and fsynced, then ``os.replace``-d onto the final name, and the folder is fsynced. Any
failure, Ctrl-C included, removes the temporary file: a reader sees the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, MemplanError

__all__ = ["write_atomic", "read_text", "read_json", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile  # here: shutil, bz2 and lzma come with it, and reading files (planning) needs none of them

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a report or run record is an ordinary file: 0666 minus the umask,
        # as open() would make it.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def read_text(path: str | os.PathLike, *, error: type[MemplanError] = ConfigError, missing: str = "file not found",
              what: str = "") -> str:
    """A UTF-8 text file's content; a missing or unreadable file raises ``error`` naming the path."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{p}: {missing}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{p}: cannot read{what}: {exc}") from None


def read_json(path: str | os.PathLike, *, error: type[MemplanError] = ConfigError, missing: str = "file not found",
              what: str = "") -> Any:
    """Parse a JSON file; a missing or unreadable file or bad JSON raises ``error`` naming the path.

    ``missing`` is the message for a file that does not exist; ``what`` names the kind of file (" run record")."""
    p = Path(path)
    text = read_text(p, error=error, missing=missing, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
