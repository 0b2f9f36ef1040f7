"""One place that checks and fills the feature knobs of a setup: adapter variants, initialisation, loss, sequence
shapes and activation offloading. Each feature's values and rules live in its own module; this one calls them in
order and returns the fields ``resolve_setup`` replaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from . import adapters, distributed, init_choice, loss, offload, seq_shapes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["resolve_features"]


def resolve_features(setup: TrainSetup, spec: ModelSpec, *, method: str, bits: int, attn: str,
                     targets: str | None) -> dict:
    """The resolved feature fields of ``setup`` (its other fields as ``resolve_setup`` resolved them so far)."""
    if spec.derived:
        _check_derived(setup, spec)
    changes: dict = {}
    changes |= adapters.resolve_adapter(setup, spec, method=method, bits=bits, targets=targets)
    changes |= init_choice.resolve_init(setup, spec, method=method, bits=bits)
    changes |= loss.resolve_loss(setup, spec, method=method)
    changes |= seq_shapes.resolve_shape(setup, spec, attn=attn)
    changes |= offload.resolve_offload(setup, spec)
    changes |= distributed.resolve_distributed(setup, spec, bits=bits)
    return changes


def _check_derived(setup: TrainSetup, spec: ModelSpec) -> None:
    """A derived architecture's activation terms are traced for plain LoRA steps (memplan.plan.derived): a feature
    that changes what a step saves is refused for it, naming it, rather than estimated as plain LoRA."""
    used = [flag for flag, on in (
        (f"--adapter {setup.adapter}", setup.adapter != "lora"),
        ("--modules-to-save", bool(setup.modules_to_save)), ("--trainable-tokens", bool(setup.trainable_tokens)),
        (f"--loss {setup.loss}", setup.loss not in (None, "default")),
        (f"--activation-offload {setup.activation_offload}", setup.activation_offload not in (None, "off")),
        (f"--packing {setup.packing}", setup.packing not in (None, "off"))) if on]
    if used:
        raise InvalidSetupError(f"{spec.name} is a derived architecture, traced for plain LoRA steps only: "
                                f"{', '.join(used)} is planned for the hand-written families (memplan models)")
