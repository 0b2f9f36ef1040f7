"""The library stack a plan assumes (``--versions``): parsing, defaults, and where each version came from.

A ``Stack`` is the four versions that change what a fine-tuning step allocates: transformers, peft,
bitsandbytes and torch. ``TrainSetup.versions`` names one (``transformers=4.48.3,peft=0.14.0``, any subset);
``resolve_versions`` fills the rest from ``default_stack``: the versions installed where they are (read from
the installed distributions' metadata, no import), else ``NEWEST_KNOWN``, the stack the estimator was written
against (docs/memory-model.md, "Versions and symbols").

``RULES`` (``memplan.plan.version_rules``, re-exported here with ``Stack`` from ``memplan.plan.stack``) is the
table of behaviours that differ between versions, each with its range, what it changes, a citation and what
memplan does with it.

Pure Python (no torch, no ``packaging``): versions are compared by their release numbers (``parse_version``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import fields
from functools import lru_cache

from memplan.errors import InvalidSetupError, suggestion_suffix

from .stack import NEWEST_KNOWN, OLDEST_MODELLED, PACKAGES, Stack, parse_version
from .stack import public_version as _public
from .version_rules import NO_EFFECT, RULES, WIRED, Rule, applies, rule

__all__ = ["Stack", "Rule", "RULES", "PACKAGES", "NEWEST_KNOWN", "OLDEST_MODELLED", "parse_version",
           "parse_versions", "resolve_versions", "stack_of", "default_stack", "installed_stack", "describe_versions",
           "rule", "applies", "check_installed", "older_than_modelled", "WIRED", "NO_EFFECT"]


# ------------------------------------------------------------------------------------------- parsing, defaults


def parse_versions(text: str) -> dict[str, str]:
    """``transformers=4.48.3,peft=0.14.0`` -> {package: version}, any subset of ``PACKAGES``. Raises
    ``InvalidSetupError`` naming the bad item and what is allowed."""
    if not isinstance(text, str):
        raise InvalidSetupError(f"invalid versions {text!r}; expected text like transformers=4.48.3,peft=0.14.0")
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, version = item.replace("==", "=").partition("=")
        name, version = name.strip().lower(), version.strip()
        if not sep or not name or not version:
            raise InvalidSetupError(f"invalid versions item {item!r}; expected package=version, e.g. "
                                    f"transformers=4.48.3,peft=0.14.0 (packages: {', '.join(PACKAGES)})")
        if name not in PACKAGES:
            raise InvalidSetupError(f"unknown package {name!r} in versions{suggestion_suffix(name, PACKAGES)}; "
                                    f"allowed: {', '.join(PACKAGES)}")
        if name in out:
            raise InvalidSetupError(f"{name} given twice in versions ({out[name]} and {version}); give it once")
        try:
            parse_version(version)
        except ValueError:
            raise InvalidSetupError(f"invalid {name} version {version!r}; expected a release such as "
                                    f"{getattr(NEWEST_KNOWN, name)}") from None
        out[name] = _public(version)  # (older than OLDEST_MODELLED: planned with the oldest rules, and said)
    if not out:
        raise InvalidSetupError(f"empty versions {text!r}; expected package=version items, e.g. transformers=4.48.3")
    return out


def _dist_versions(entries: tuple[str, ...]) -> dict[str, str]:
    """{normalised distribution name: version} from the ``*.dist-info`` / ``*.egg-info`` folder names on
    ``entries`` (sys.path), first entry first, as importlib.metadata finds them: its import alone takes about
    30 ms, more than ``memplan fit`` spends on its whole search, so the folder names are read directly."""
    found: dict[str, str] = {}
    for entry in entries:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            stem, dot, kind = n.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            name, _, version = stem.partition("-")
            key = re.sub(r"[-_.]+", "_", name).lower()
            if version and key not in found:
                found[key] = version
    return found


@lru_cache(maxsize=1)
def installed_stack() -> dict[str, str | None]:
    """The installed version of each package (None where it is not installed), without importing it."""
    found = _dist_versions(tuple(sys.path))
    return {p: found.get(p) for p in PACKAGES}


def _modelled(package: str, version: str | None) -> bool:
    """Whether an installed version can be planned for (it parses)."""
    try:
        return version is not None and parse_version(version) >= (0, 0, 0)
    except ValueError:
        return False


def older_than_modelled(stack: Stack) -> list[str]:
    """The packages of ``stack`` older than the oldest release the rules were read against."""
    return [p for p in PACKAGES if stack.release(p) < parse_version(getattr(OLDEST_MODELLED, p))]


def default_stack() -> Stack:
    """The installed versions where they are installed, else ``NEWEST_KNOWN``'s."""
    inst = installed_stack()
    return Stack(**{p: _public(inst[p]) if _modelled(p, inst[p]) else getattr(NEWEST_KNOWN, p) for p in PACKAGES})


@lru_cache(maxsize=256)
def resolve_versions(text: str | None) -> str:
    """``setup.versions`` as a full stack text: the given packages, the rest from ``default_stack``."""
    base = default_stack()
    if text is None:
        return base.text
    given = parse_versions(text)
    return Stack(**{p: given.get(p, getattr(base, p)) for p in PACKAGES}).text


@lru_cache(maxsize=256)
def stack_of(text: str | None) -> Stack:
    """The ``Stack`` of a (resolved or partial) versions text; None: the default stack."""
    full = parse_versions(resolve_versions(text))
    return Stack(**{f.name: full[f.name] for f in fields(Stack)})


def describe_versions(text: str | None) -> str:
    """``transformers 4.48.3, peft 0.21.2, bitsandbytes 0.50.2, torch 2.13.0 (transformers given)``: the stack,
    and where each version that is not the newest memplan models came from (installed or given). The newest
    stack is stated without a source, so that the same plan reads the same with and without the packages
    installed."""
    stack = stack_of(text)
    inst = installed_stack()
    source: dict[str, list[str]] = {}
    for p in PACKAGES:
        v = getattr(stack, p)
        if v == getattr(NEWEST_KNOWN, p):
            continue
        where = "installed" if inst[p] is not None and _public(inst[p]) == v else "given"
        source.setdefault(where, []).append(p)
    why = "; ".join(f"{', '.join(ps)} {where}" for where, ps in source.items())
    return f"{stack.describe()} ({why})" if why else stack.describe()


def check_installed(text: str | None, what: str) -> None:
    """Raise ``InvalidSetupError`` when the stack ``text`` names a version other than the installed one of a
    package that is installed: ``what`` (``memplan simulate``) runs the installed libraries, not a planned stack."""
    stack, inst = stack_of(text), installed_stack()
    wrong = [f"{p} {getattr(stack, p)} (installed: {_public(inst[p])})" for p in PACKAGES
             if inst[p] is not None and _public(inst[p]) != getattr(stack, p)]
    if wrong:
        raise InvalidSetupError(f"{what} runs the libraries installed here, not {', '.join(wrong)}; leave out "
                                f"--versions, or plan that stack with memplan estimate --versions")
