"""Where the catalog files (``gpus.json``, ``models/``, ``runs/``) live, and reading them as JSON.

Shared by the GPU and model catalogs so that both honour the same override. Stdlib only.

Resolution order of ``profiles_dir()``:

1. an explicit ``override`` argument (the ``profiles_dir=`` keyword of ``load_gpu`` / ``load_model``);
2. the ``MEMPLAN_PROFILES`` environment variable (tests, and users with their own calibrated catalog);
3. ``memplan/_profiles`` inside the installed package: the wheel ships the checkout's ``profiles/`` folder
   there (pyproject maps the package ``memplan._profiles`` to the ``profiles`` directory);
4. ``../profiles`` next to the package: a source checkout or an editable install.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memplan.fileio import read_json as _read_json

__all__ = ["PROFILES_ENV", "profiles_dir", "read_json"]

PROFILES_ENV = "MEMPLAN_PROFILES"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the memplan package


def profiles_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The catalog folder (see the module docstring for the order). Not checked for existence here: a missing
    file is reported by ``read_json`` with its full path, which says more than "no profiles folder"."""
    if override is not None:
        return Path(override)
    env = os.environ.get(PROFILES_ENV)
    if env:
        return Path(env)
    installed = _PACKAGE_DIR / "_profiles"
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / "profiles"


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a catalog JSON file; a missing/unreadable file or bad JSON raises ``ConfigError`` naming the path."""
    return _read_json(path, missing=f"file not found (set {PROFILES_ENV} to a folder holding it)")
