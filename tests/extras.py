"""``require``: the first lines of a test module that needs optional packages (see tests/conftest.py)."""

from __future__ import annotations

import pytest

_EXTRA_OF = {"torch": "profile", "transformers": "profile", "peft": "profile", "bitsandbytes": "profile",
             "accelerate": "profile", "pandas": "report", "matplotlib": "report", "yaml": "yaml"}


def require(*modules: str):
    """Skip the whole module, saying what to install, unless every one of ``modules`` imports; returns a
    ``pytest.mark.extras`` marker for the module's ``pytestmark`` (its tier)."""
    for m in modules:
        pytest.importorskip(m, reason=f"needs {m}: pip install -e '.[{_EXTRA_OF.get(m, m)}]'")
    return pytest.mark.extras(*modules)


def install_hint(modules) -> str:
    extras = sorted({_EXTRA_OF.get(m, m) for m in modules})
    return f"needs {', '.join(modules)}: pip install -e '.[{','.join(extras)}]'"


def run_with_tty_stderr(cmd: list[str], timeout: float = 120) -> tuple[int, str, bytes]:
    """Run ``cmd`` with stdout to a pipe and stderr to a pseudo-terminal, as a user's shell does when stdout is
    redirected: (exit status, stdout, what the terminal showed)."""
    import os
    import pty
    import subprocess

    master, slave = pty.openpty()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=timeout)
    finally:
        os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return p.returncode, p.stdout, seen
