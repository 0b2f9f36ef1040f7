"""Reading JSON and writing files atomically, for every file memplan reads or writes (stdlib only).

Atomic: the content goes to a hidden temporary file in the target's folder (same filesystem, so the rename is
atomic), is flushed and fsynced, then ``os.replace``-d onto the final name, and the folder is fsynced. Any
failure, Ctrl-C included, removes the temporary file: a reader sees the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, MemplanError

__all__ = ["write_atomic", "read_text", "read_json", "fsync_dir", "prepare_output_dir", "fresh_dir_name",
           "MAX_READ_BYTES"]


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


# The largest file memplan reads: configs, catalog entries and run records are kilobytes; a larger file is not
# one of them (and /dev/zero would otherwise be read forever).
MAX_READ_BYTES = 64 * 2**20


def read_text(path: str | os.PathLike, *, error: type[MemplanError] = ConfigError, missing: str = "file not found",
              what: str = "", max_bytes: int = MAX_READ_BYTES) -> str:
    """A UTF-8 text file's content; a missing, unreadable, non-regular (a device, a FIFO) or larger than
    ``max_bytes`` file raises ``error`` naming the path."""
    p = Path(path)
    shown = str(p) if len(str(p)) <= 120 else str(p)[:117] + "..."
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{shown}: not a regular file{what and ' (expected a' + what + ')'}")
        if st.st_size > max_bytes:
            raise error(f"{shown}: {st.st_size:,} bytes is too large for a{what or ' config file'} "
                        f"(at most {max_bytes // 2**20} MiB)")
        with open(p, encoding="utf-8") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except FileNotFoundError:
        raise error(f"{shown}: {missing}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error(f"{shown}: cannot read{what}: {reason}") from None


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
    except RecursionError:
        raise error(f"{p}: JSON nested too deeply to be a{what or ' config file'}") from None


def prepare_output_dir(path: str | os.PathLike, *, produces: tuple[str, ...] = (), force: bool = False,
                       error: type[MemplanError] = ConfigError) -> Path:
    """Check, before any work, that ``path`` can receive the files ``produces``: a folder (created if missing)
    this process can write into, holding none of them unless ``force``. A command that writes must not find out
    after a long run that it cannot, nor replace a report it did not produce in full."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise error(f"{p}: is a file, not a folder; give --out a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = _probe(p)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"{p}: cannot write there: {exc.strerror or exc}") from None
    existing = [name for name in produces if (p / name).exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise error(f"{p} already holds {shown}; memplan does not replace files it did not write: pass --force to "
                    f"replace them, or --out a new folder")
    return p


def _probe(folder: Path) -> str:
    """Create (and return the name of) an empty hidden file in ``folder``: proof that it takes new files."""
    fd = os.open(folder / f".memplan-probe-{os.getpid()}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    os.close(fd)
    return str(folder / f".memplan-probe-{os.getpid()}")


def fresh_dir_name(prefix: str, parent: str | os.PathLike = ".") -> Path:
    """``memplan-validation-20261130-201502`` under ``parent``: a folder no earlier run wrote (the default
    output of commands that write reports, so that none replaces another)."""
    import time

    base = Path(parent) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate
