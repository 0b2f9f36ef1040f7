"""Adapter variants (``--adapter``, ``--modules-to-save``, ``--trainable-tokens``): STUB, being written."""

from __future__ import annotations

from memplan.errors import InvalidSetupError

__all__ = ["ADAPTERS", "resolve_adapter"]

ADAPTERS = ("lora", "dora", "lora-fa", "ia3", "vera")


def resolve_adapter(setup, spec, *, method: str, bits: int, targets) -> dict:
    if setup.adapter not in ADAPTERS:
        raise InvalidSetupError(f"invalid adapter {setup.adapter!r}; allowed: {', '.join(ADAPTERS)}")
    return {}
