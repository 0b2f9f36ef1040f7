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
