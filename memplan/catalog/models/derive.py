"""Specs of architectures without a hand-written family, derived from transformers' own module tree.

When a config's ``model_type`` has no builder in ``families.BUILDERS`` and transformers is installed,
``derive_spec`` builds the model on the meta device (``derive_build``: never remote code), walks its modules and
records every parameter, linear, what bitsandbytes quantizes and what peft adapts by default. Parameter counts
are exact by construction (``total_params()`` equals the meta model's parameter sum, checked on every
derivation). The activation terms of such a spec are traced per regime (``memplan.plan.derived``).

Both are cached as one JSON file per config in the user's cache folder
(``$MEMPLAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/memplan/derived``, else ``~/.cache/memplan/derived``), named by
the sha256 of the canonical config and the transformers version, so a second plan needs neither torch nor
transformers. This module itself imports neither.

memplan also ships derivations: ``profiles/derived/specs/<sha256 of the config>.json`` holds the spec and the
regimes ``fit`` searches for each catalog model without a hand-written family (written by
``python -m memplan.measure.derive_ship``). A config that matches one, by catalog name or as a local
``config.json`` with the same values, plans at once and without torch or transformers; regimes it lacks are traced
into the user's cache on top of it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from memplan.errors import ConfigError
from memplan.fileio import write_atomic

from .spec import LinearSpec, ModelSpec, ParamSpec

__all__ = ["derive_spec", "cache_dir", "cache_key", "cache_path", "config_key", "shipped_dir", "read_shipped",
           "read_entry", "update_entry", "transformers_version", "spec_to_dict", "spec_from_dict", "FORMAT",
           "derive_from_transformers", "derived_model_spec", "forget_shipped"]

FORMAT = 2  # bump when the cached layout changes: older entries are then derived again
_NOT_ARCHITECTURE = ("quantization_config", "auto_map", "_name_or_path", "transformers_version", "architectures")


def transformers_version() -> str | None:
    """The installed transformers' version, read from its metadata (no import); None when it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def cache_dir() -> Path:
    override = os.environ.get("MEMPLAN_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memplan" / "derived"


def cache_key(config: dict, version: str) -> str:
    arch = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    canon = json.dumps({"config": arch, "transformers": version, "format": FORMAT}, sort_keys=True,
                       separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def config_key(config: dict) -> str:
    """The name of a shipped derivation: the sha256 of the config's architecture values (no library version)."""
    arch = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    canon = json.dumps({"config": arch, "format": FORMAT}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def shipped_dir() -> Path:
    from memplan.catalog import paths

    return paths.profiles_dir() / "derived" / "specs"


def read_shipped(config: dict) -> dict | None:
    """The shipped derivation of ``config`` (``{"format", "id", "transformers", "spec", "regimes", ...}``), or None."""
    try:
        data = json.loads((shipped_dir() / f"{config_key(config)}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("spec"), dict):
        return None
    data.setdefault("regimes", {})
    return data


_SHIPPED: dict[str, dict] = {}  # cache key -> the shipped entry under it (registered by derive_spec)


def read_entry(key: str) -> dict | None:
    """The cached entry (``{"format", "spec", "regimes"}``) over the shipped one of the same key, or None when
    there is neither (or the cached file is unreadable)."""
    try:
        data = json.loads(cache_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("spec"), dict):
        data = None
    shipped = _SHIPPED.get(key)
    if shipped is not None:
        mine = (data or {}).get("regimes", {})
        data = {**shipped, **(data or {}), "regimes": {**shipped.get("regimes", {}), **mine}}
    if data is not None:
        data.setdefault("regimes", {})
    return data


def update_entry(key: str, update) -> None:
    """Read-modify-write the entry atomically (``update(entry) -> entry``); cache failures only cost a rederive."""
    entry = read_entry(key) or {"format": FORMAT, "spec": None, "regimes": {}}
    entry = update(entry)
    try:
        write_atomic(cache_path(key), lambda f: json.dump(entry, f, indent=1, sort_keys=True))
    except OSError as exc:
        print(f"memplan: cannot write the derived-spec cache {cache_path(key)}: {exc.strerror}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# ModelSpec <-> JSON

_SKIP = ("name", "hf_id", "source", "config", "derived_key")


def spec_to_dict(fields_: dict) -> dict:
    out = {}
    for k, v in fields_.items():
        if k in _SKIP:
            continue
        if k in ("layer_linears", "top_linears", "tied_linears"):
            v = [{f.name: getattr(lin, f.name) for f in fields(LinearSpec)} for lin in v]
        elif k == "params":
            v = [[p.name, p.numel, p.kind, p.per_layer] for p in v]
        elif k == "moe_fused":
            v = [[a, list(b)] for a, b in v]
        elif isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        out[k] = v
    return out


def spec_from_dict(d: dict) -> dict:
    out = dict(d)
    for k in ("layer_linears", "top_linears", "tied_linears"):
        out[k] = tuple(LinearSpec(**{**lin, "layers": None}) for lin in d.get(k, ()))
    out["params"] = tuple(ParamSpec(n, int(k), kind, bool(per)) for n, k, kind, per in d["params"])
    out["lora_defaults"] = tuple(d.get("lora_defaults", ()))
    out["moe_targets"] = tuple(tuple(x) for x in d.get("moe_targets", ()))
    out["moe_fused"] = tuple((k, tuple(v)) for k, v in d.get("moe_fused", ()))
    out["attention_implementations"] = tuple(d.get("attention_implementations", ()))
    return out


# ---------------------------------------------------------------------------------------------------------------


def derive_spec(config: dict, *, name: str, hf_id: str | None = None, source: str | None = None) -> ModelSpec:
    """The ModelSpec of a model type memplan has no family for, from the cache or derived from transformers."""
    where = source or name
    mt = config.get("model_type")
    shipped = read_shipped(config)
    if shipped is not None:  # derived once by memplan and shipped: no torch, no transformers
        key = cache_key(config, str(shipped.get("transformers")))
        _SHIPPED[key] = shipped
        return derived_model_spec(spec_from_dict(shipped["spec"]), config, key, name=name, hf_id=hf_id,
                                  source=source)
    version = transformers_version()
    if version is None:
        raise ConfigError(f"{where}: unsupported model_type {mt!r}: no hand-written family in memplan, and deriving "
                          f"one from transformers' modeling code needs transformers: pip install 'memplan[profile]'")
    key = cache_key(config, version)
    entry = read_entry(key)
    if entry is not None and entry["spec"] is not None:
        fields_ = spec_from_dict(entry["spec"])
    else:
        fields_ = _derive(config, where, mt, version)
        stored = spec_to_dict(fields_)
        update_entry(key, lambda e: {**e, "spec": stored, "model_type": mt, "transformers": version})
    return derived_model_spec(fields_, config, key, name=name, hf_id=hf_id, source=source)


def derived_model_spec(fields_: dict, config: dict, key: str, *, name: str, hf_id: str | None = None,
                       source: str | None = None) -> ModelSpec:
    """The ModelSpec of derived ``fields_`` (as ``derive_from_transformers`` or a cache entry gives them) for
    ``config``, its entries cached under ``key``."""
    kept = {k: v for k, v in fields_.items() if not k.startswith("_") and k != "model_type"}
    return ModelSpec(name=name, model_type=config.get("model_type"), hf_id=hf_id, source=source, config=dict(config),
                     derived_key=key, **kept)


def derive_from_transformers(config: dict, where: str) -> dict:
    """The ModelSpec fields of ``config`` derived afresh from the installed transformers (no cache, nothing shipped)."""
    return _derive(config, where, config.get("model_type"), transformers_version())


def forget_shipped() -> None:
    """Drop the shipped entries registered by ``derive_spec`` (so that regimes are traced, not read from them)."""
    _SHIPPED.clear()


def _derive(config: dict, where: str, mt: str, version: str) -> dict:
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{where}: deriving model_type {mt!r} from transformers needs torch: "
                          f"pip install 'memplan[profile]'")
    def announce() -> None:
        print(f"memplan: {mt!r} has no hand-written family; deriving its spec from transformers {version} "
              f"(once; cached in {cache_dir()})", file=sys.stderr, flush=True)

    # The torch side lives with the measurement code; loaded by name, only when a spec is derived (the planning
    # wings import no heavy package, tests/test_architecture.py).
    build = importlib.import_module("memplan.measure.derive_build")
    fields_ = build.derive_fields(config, where, announce)
    total = fields_.pop("_total")
    probe = ModelSpec(name=where, model_type=mt, hf_id=None, source=None, **fields_)
    if probe.total_params() != total:  # by construction; a walk that missed or double-counted a parameter
        raise ConfigError(f"{where}: derived spec counts {probe.total_params():,} parameters, the model has {total:,}")
    return fields_
