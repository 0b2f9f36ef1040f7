"""The loss over the logits (``--loss``): STUB, being written."""

from __future__ import annotations

from memplan.errors import InvalidSetupError

__all__ = ["LOSSES", "resolve_loss"]

LOSSES = ("default", "liger", "chunked")


def resolve_loss(setup, spec, *, method: str) -> dict:
    value = setup.loss or "default"
    if value not in LOSSES:
        raise InvalidSetupError(f"invalid loss {value!r}; allowed: {', '.join(LOSSES)}")
    return {"loss": value}


def loss_bytes(spec, step, default_fwd: int, default_bwd: int) -> tuple[int, int]:
    """The logits + loss bytes at forward end and at the start of backward for ``step`` (a resolved setup at the
    step's batch rows and row length); ``default_*``: transformers' own cross-entropy's."""
    return default_fwd, default_bwd
