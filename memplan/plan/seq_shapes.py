"""Sequence shapes (``--packing``, ``--seq-len-file``): STUB, being written."""

from __future__ import annotations

from memplan.errors import InvalidSetupError

__all__ = ["PACKINGS", "resolve_shape"]

PACKINGS = ("off", "packed", "padding-free")


def resolve_shape(setup, spec, *, attn: str) -> dict:
    if setup.packing not in PACKINGS:
        raise InvalidSetupError(f"invalid packing {setup.packing!r}; allowed: {', '.join(PACKINGS)}")
    return {}


def step_setup(spec, setup):
    """``setup`` at the rows and row length of the largest batch a step sees (what the arithmetic uses)."""
    return setup
