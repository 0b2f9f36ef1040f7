"""LoRA initialisation (``--init``): STUB, being written."""

from __future__ import annotations

from memplan.errors import InvalidSetupError

__all__ = ["INITS", "resolve_init"]

INITS = ("default", "loftq", "pissa", "olora")


def resolve_init(setup, spec, *, method: str, bits: int) -> dict:
    if setup.init not in INITS:
        raise InvalidSetupError(f"invalid init {setup.init!r}; allowed: {', '.join(INITS)}")
    return {}
