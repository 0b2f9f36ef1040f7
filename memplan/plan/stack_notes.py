"""What the library stack costs a ``memplan fit`` answer, said once for the whole search (``FitResult.notes``).

The per-estimate notes (``memplan.plan.stack_effects.experts_note``) appear only on 4/8-bit plans. A
transformers-5 user planning Mixtral is usually shown a 16-bit plan (the fused experts make 4 bits larger), and
still needs to hear why QLoRA is not the answer and what the experts cost: ``fit_notes`` estimates the 4-bit
variant of the plan and carries its experts note (rule "moe-experts-as-linears", ``memplan.plan.versions``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError
from memplan.units import format_gib

from .estimate import estimate_for
from .setup import resolve_setup

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .estimate import Estimate

__all__ = ["fit_notes", "EXPERTS_NOTE_MARK"]

EXPERTS_NOTE_MARK = "into 3-D parameters"  # in stack_effects.experts_note's text


def fit_notes(spec: ModelSpec, shown: Estimate, gpu: GPUSpec | None) -> tuple[str, ...]:
    """Notes about the stack for a fit result whose plan (recommended, or the leanest) is ``shown``: the experts
    note of the plan's 4-bit QLoRA variant, unless ``shown`` carries it already."""
    if any(EXPERTS_NOTE_MARK in n for n in shown.notes) or not spec.is_moe:
        return ()
    s = shown.setup
    try:
        qlora = resolve_setup(replace(s, method="qlora", bits=4, dtype=None if s.dtype == "fp32" else s.dtype,
                                      upcast_non_quantized=None, grad_ckpt=None), spec, gpu)
        e = estimate_for(spec, qlora, gpu)
    except InvalidSetupError:  # (a derived model's 4-bit regime may be one its libraries cannot run)
        return ()
    return tuple(f"at 4 bits (QLoRA, {format_gib(e.total_bytes, 2)} in all for this plan): {n}"
                 for n in e.notes if EXPERTS_NOTE_MARK in n)
