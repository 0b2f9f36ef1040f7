"""Activation offloading (``--activation-offload``): STUB, being written."""

from __future__ import annotations

from memplan.errors import InvalidSetupError

__all__ = ["ACTIVATION_OFFLOADS", "resolve_offload"]

ACTIVATION_OFFLOADS = ("off", "pinned", "pageable")


def resolve_offload(setup, spec) -> dict:
    value = setup.activation_offload or "off"
    if value not in ACTIVATION_OFFLOADS:
        raise InvalidSetupError(f"invalid activation offload {value!r}; allowed: {', '.join(ACTIVATION_OFFLOADS)}")
    return {"activation_offload": value}


def offload_phases(spec, step, phase_dynamic: dict, *, layer_bytes: int, extras: int,
                   ckpt_input_bytes: int) -> tuple[dict, dict, tuple[str, ...]]:
    """``estimate_for``'s phase -> (activations, logits_loss, gradients, transients) with offloaded activations
    taken off the card; the host bytes by cause; notes."""
    return phase_dynamic, {}, ()
