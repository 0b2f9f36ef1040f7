"""One-knob changes: the smallest single changes after which a setup that does not fit, fits.

``memplan.preflight`` lists them when a run will not fit, and ``fit`` when the knobs a user pinned leave no
plan. Least disruptive first: a smaller micro-batch (gradient accumulation keeps the effective batch),
gradient checkpointing, a paged 8-bit optimizer, then lower precision of the frozen weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .estimate import Estimate, estimate_for
from .setup import TrainSetup, resolve_setup
from .speed import step_time

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .budget import Budget

__all__ = ["Change", "smallest_changes"]


@dataclass(frozen=True)
class Change:
    """One change to a setup that does not fit, with the estimate after it (``memplan.preflight``)."""

    fields: dict  # TrainSetup field -> new value
    estimate: Estimate
    description: str  # "batch size 8 -> 4 (gradient_accumulation_steps x2 keeps the effective batch)"

    def to_dict(self) -> dict:
        return {"fields": dict(self.fields), "description": self.description,
                "total_bytes": self.estimate.total_bytes}


def smallest_changes(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, budget: Budget) -> tuple[Change, ...]:
    """The single changes to a resolved ``setup`` after which it fits ``budget``, least disruptive first: a
    smaller micro-batch (the largest that fits; gradient accumulation keeps the effective batch, so the
    optimisation is unchanged), gradient checkpointing (one more forward per step: ``memplan.plan.speed``; same
    result), a paged 8-bit optimizer (bitsandbytes' 8-bit AdamW: near-identical training, state
    paged to host memory under pressure), then lower precision of the frozen weights (8-bit, then 4-bit NF4 +
    double quant: a change of the model being tuned). Empty when no single change is enough; then
    ``memplan.plan.search.fit_for`` with nothing pinned but the sequence length is the answer."""
    out: list[Change] = []

    def est(s: TrainSetup) -> Estimate | None:
        try:
            return estimate_for(spec, resolve_setup(s, spec, gpu), gpu)
        except InvalidSetupError:
            return None

    def add(fields: dict, description: str) -> None:
        e = est(replace(setup, **fields))
        if e is not None and budget.fits(e.total_bytes):
            out.append(Change(fields, e, description))

    if setup.batch_size > 1:
        lo, hi, best = 1, setup.batch_size - 1, None
        def accum(b: int) -> int:  # micro-batches of b that keep the effective batch (held gradients: estimate)
            return setup.grad_accum * -(-setup.batch_size // b)

        while lo <= hi:  # memory grows with the batch: bisect the largest one that fits
            mid = (lo + hi) // 2
            e = est(replace(setup, batch_size=mid, grad_accum=accum(mid)))
            if e is not None and budget.fits(e.total_bytes):
                best, lo = (mid, e), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            # Prefer a divisor of the batch: gradient accumulation then keeps the effective batch exactly.
            b_any = best[0]
            b = max(d for d in range(1, b_any + 1) if setup.batch_size % d == 0)
            e = best[1] if b == b_any else est(replace(setup, batch_size=b, grad_accum=accum(b)))
            largest = f"; {b_any} is the largest that fits" if b != b_any else ""
            out.append(Change({"batch_size": b, "grad_accum": accum(b)}, e,
                              f"micro-batch {setup.batch_size} -> {b} with gradient_accumulation_steps "
                              f"x{setup.batch_size // b} (the same effective batch{largest})"))
    if not setup.grad_ckpt:
        slower = step_time(replace(setup, grad_ckpt=True)).factor / step_time(setup).factor
        add({"grad_ckpt": True}, f"gradient checkpointing on (one more forward per step: ~{slower:.2f}x the step time)")
    if setup.optimizer not in ("paged_adamw_8bit", "paged_adam_8bit", "paged_lion_8bit", "sgd"):
        add({"optimizer": "paged_adamw_8bit"}, f"optimizer {setup.optimizer} -> paged_adamw_8bit (bitsandbytes)")
    if setup.method != "full":
        if setup.bits in (16, 32):
            add({"bits": 8, "method": "lora", "dtype": None if setup.bits == 32 else setup.dtype},
                f"{setup.bits}-bit -> 8-bit (LLM.int8) base weights")
        if setup.bits != 4:
            add({"bits": 4, "method": "qlora", "quant_type": "nf4", "double_quant": True,
                 "dtype": None if setup.bits == 32 else setup.dtype},
                f"{setup.bits}-bit -> 4-bit NF4 + double quant base weights (QLoRA)")
    return tuple(out)
