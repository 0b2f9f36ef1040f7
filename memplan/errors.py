"""The exception tree: every user-facing failure is a ``MemplanError`` whose message names the bad value
and what is allowed. The CLI turns these into one line on stderr and exit code 2 (never a traceback)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MemplanError",
    "UnknownModelError",
    "UnknownGPUError",
    "InvalidSetupError",
    "ConfigError",
    "WontFitError",
    "UnreadableModelError",
    "NoModelError",
    "close_matches",
    "suggestion_suffix",
]


class MemplanError(Exception):
    """Base class of every error memplan raises on purpose."""


class UnknownModelError(MemplanError):
    """A model name that is neither in the catalog nor a local config.json / model folder."""


class UnknownGPUError(MemplanError):
    """A GPU name that is not in the catalog."""


class InvalidSetupError(MemplanError):
    """A training setup with a value out of range or a contradictory combination."""


class ConfigError(MemplanError):
    """A config file (config.json, catalog entry) that cannot be read or lacks a required field."""


class WontFitError(MemplanError):
    """``memplan.preflight``: the planned run does not fit the memory available. ``estimate`` is the
    ``Estimate`` of the run as configured, ``budget_bytes`` what it was compared with, and ``changes`` the
    smallest single changes that would fit (``memplan.fit.Change``), best first."""

    def __init__(self, message: str, *, estimate=None, budget_bytes: int = 0, changes=()):
        super().__init__(message)
        self.estimate = estimate
        self.budget_bytes = budget_bytes
        self.changes = tuple(changes)


class NoModelError(ConfigError):
    """No model named anywhere: not as MODEL, not with --model, not in a --config file (``files``)."""

    def __init__(self, files=()):
        where = f" and none of {', '.join(files)} names one" if files else ""
        super().__init__(f"no model given{where}; pass MODEL (memplan models), --model NAME, or a --config that "
                         f"names it (axolotl base_model, peft base_model_name_or_path, model_name_or_path)")


class UnreadableModelError(MemplanError):
    """An object passed as a model that memplan cannot read (not a transformers / peft model)."""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``word`` (case-insensitive), best first."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    import difflib  # only an error needs it

    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)
    # Substring hits catch "13b" -> "opt-13b" that difflib's ratio misses.
    if len(hits) < n:
        for low, orig in sorted(by_lower.items()):
            if word.lower() in low and low not in hits:
                hits.append(low)
            if len(hits) >= n:
                break
    return [by_lower[h] for h in hits]


def suggestion_suffix(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean: a, b?)`` or an empty string."""
    hits = close_matches(word, candidates)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""
