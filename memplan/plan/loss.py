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
