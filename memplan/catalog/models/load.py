"""The model catalog (``profiles/models/<id>.json``) and local ``config.json`` files: names in, ``ModelSpec`` out.

``load_model(name_or_path)`` takes a catalog name (case-insensitive, with or without the org prefix:
``opt-13b``, ``facebook/opt-13b``), a path to a ``config.json``, or a local model folder holding one. Unknown
names raise ``UnknownModelError`` with close matches; unreadable or unsupported configs raise ``ConfigError``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from memplan.catalog import paths
from memplan.errors import ConfigError, UnknownModelError, suggestion_suffix

from .families import spec_from_config
from .spec import ModelSpec

__all__ = ["CatalogModel", "list_models", "load_model"]


@dataclass(frozen=True)
class CatalogModel:
    """One catalog entry's metadata (its config is read by load_model)."""

    id: str
    hf_id: str
    aliases: tuple[str, ...]
    family: str
    source: str
    published_params: dict = field(compare=False, hash=False)
    exact_params: int
    path: Path = field(compare=False, default=None)

    def names(self) -> tuple[str, ...]:
        """Every spelling load_model accepts for this entry (compared case-insensitively)."""
        full = (self.id, self.hf_id, *self.aliases)
        return tuple(dict.fromkeys(n for x in full if x for n in (x, x.rsplit("/", 1)[-1])))


def _models_dir(override) -> Path:
    # memplan.catalog.paths owns the profiles folder (override, MEMPLAN_PROFILES, packaged copy) and JSON reading.
    d = paths.profiles_dir(override) / "models"
    if not d.is_dir():
        raise ConfigError(f"{d}: model catalog folder not found (set {paths.PROFILES_ENV} to a profiles folder)")
    return d


_ENTRY_KEYS = ("id", "hf_id", "aliases", "family", "source", "published_params", "exact_params", "config")


def _entry(path: Path, data) -> CatalogModel:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a catalog model entry must be a JSON object")
    missing = [k for k in _ENTRY_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: catalog entry lacks {', '.join(repr(k) for k in missing)}")
    return CatalogModel(
        id=str(data["id"]), hf_id=str(data["hf_id"]), aliases=tuple(str(a) for a in data["aliases"] or ()),
        family=str(data["family"]), source=str(data["source"]), published_params=dict(data["published_params"]),
        exact_params=int(data["exact_params"]), path=path,
    )


def list_models(*, profiles_dir=None) -> list[CatalogModel]:
    """Every catalog model, sorted by id."""
    d = _models_dir(profiles_dir)
    return sorted((_entry(p, paths.read_json(p)) for p in sorted(d.glob("*.json"))), key=lambda m: m.id)


@functools.lru_cache(maxsize=16)
def _name_index(models_dir: str, stamp: tuple) -> dict[str, str]:
    """lower-cased spelling -> catalog file; ``stamp`` (file names + mtimes) invalidates it when files change."""
    index: dict[str, str] = {}
    for m in list_models(profiles_dir=Path(models_dir).parent):
        for n in m.names():
            index.setdefault(n.lower(), str(m.path))
    return index


def _dir_stamp(d: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in d.glob("*.json")))
    except OSError:
        return ()


@functools.lru_cache(maxsize=256)
def _spec_from_catalog_file(path: str, mtime_ns: int) -> ModelSpec:
    data = paths.read_json(Path(path))
    entry = _entry(Path(path), data)
    return spec_from_config(data["config"], name=entry.id, hf_id=entry.hf_id, source=entry.source)


@functools.lru_cache(maxsize=64)
def _spec_from_config_file(path: str, mtime_ns: int) -> ModelSpec:
    data = paths.read_json(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config.json must hold a JSON object")
    return spec_from_config(data, name=path, source=path)


def _catalog_hit(file: Path, key: str) -> bool:
    """Whether the catalog file ``file`` is the entry named ``key`` (read without building its spec)."""
    try:
        return key in {n.lower() for n in _entry(file, paths.read_json(file)).names()}
    except ConfigError:
        return False


_CATALOG_FILES: dict[tuple[str, str], str] = {}  # (models dir, lower-cased name) -> file; hits only


def _catalog_file(models_dir: str, key: str) -> str | None:
    """The catalog file of the entry spelled ``key`` (lower-cased), or None. Hits are cached: planning calls
    load_model once per evaluated setup."""
    cached = _CATALOG_FILES.get((models_dir, key))
    if cached is not None:
        return cached
    d = Path(models_dir)
    # fast path: the file is named after the id, which is usually the name without its org prefix
    direct = d / f"{key.rsplit('/', 1)[-1]}.json"
    try:
        exists = direct.is_file()
    except OSError:  # a name too long for the filesystem is no catalog file either
        exists = False
    if exists and _catalog_hit(direct, key):
        hit: str | None = str(direct)
    else:
        index = _name_index(models_dir, _dir_stamp(d))
        hit = index.get(key) or index.get(key.rsplit("/", 1)[-1])
    if hit is not None:
        _CATALOG_FILES[(models_dir, key)] = hit
    return hit


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # a name too long for the filesystem, or a folder we may not look into: not a local path
        return False


def _local_config(p: Path, raw: str) -> Path | None:
    """The config.json a local path names (the file, or the one in the folder), or None when ``raw`` is not a
    local path. A folder this user may not read raises ``ConfigError`` naming it."""
    try:
        if p.is_file():
            return p
        cfg = p / "config.json"
        if p.is_dir() and cfg.is_file():
            return cfg
    except PermissionError as exc:
        raise ConfigError(f"{raw}: cannot read: {exc.strerror}") from None
    except OSError:  # ENAMETOOLONG and friends: not a path this machine has
        return None
    return None


def load_model(name_or_path: str | Path, *, profiles_dir=None) -> ModelSpec:
    """A ModelSpec from a catalog name, a config.json path, or a local model folder holding config.json.

    A local path wins over a catalog name. A catalog lookup reads one file when the name is the entry's file
    name (``opt-13b``, ``facebook/opt-13b``, ``OPT-13B``); other spellings (aliases, hf ids that differ from the
    id) go through an index of all entries. Specs are cached per file and modification time.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UnknownModelError(f"invalid model {name_or_path!r} ({type(name_or_path).__name__}); give a catalog "
                                f"name (memplan models) or a local config.json / model folder")
    raw = str(name_or_path).strip()
    if not raw:
        raise UnknownModelError("empty model name; pass a catalog name (memplan models) or a local config.json")
    p = Path(raw).expanduser()
    local = _local_config(p, raw)
    if local is not None:
        return _spec_from_config_file(str(local.resolve()), local.stat().st_mtime_ns)

    d = _models_dir(profiles_dir)
    hit = _catalog_file(str(d), raw.lower())
    if hit and Path(hit).is_file():
        return _spec_from_catalog_file(hit, Path(hit).stat().st_mtime_ns)
    if _is_dir(p):  # a folder that is not a catalog name either
        raise ConfigError(f"{p}: the folder holds no config.json")
    if raw.endswith(".json") or raw.startswith((".", "/", "~")) or "\\" in raw:
        raise UnknownModelError(f"no such config file or model folder: {raw!r}")
    ids = sorted(Path(f).stem for f in d.glob("*.json"))
    probe = raw.rsplit("/", 1)[-1]
    if len(raw) > 200:  # longer than any model name or path people type: do not echo it whole
        raise UnknownModelError(f"unknown model {raw[:60]!r}... ({len(raw)} characters); pass a catalog name "
                                f"(memplan models) or a local config.json / model folder")
    raise UnknownModelError(
        f"unknown model {raw!r}{suggestion_suffix(probe, ids)}; pass a catalog name (memplan models) "
        f"or a local config.json / model folder"
    )
