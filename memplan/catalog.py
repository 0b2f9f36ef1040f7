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

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["PROFILES_ENV", "profiles_dir", "read_json"]

PROFILES_ENV = "MEMPLAN_PROFILES"

_PACKAGE_DIR = Path(__file__).resolve().parent


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
    """Parse a JSON file; a missing/unreadable file or bad JSON raises ``ConfigError`` naming the path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (set {PROFILES_ENV} to a folder holding it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
