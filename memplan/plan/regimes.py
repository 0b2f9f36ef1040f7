"""Precision regimes the same training script could switch to, and what they would buy (``memplan fit``).

``fit`` keeps the regime it is given (or the default: a Trainer with ``bf16=True``): weights' dtype, autocast and
the k-bit preparation are how the script is written, not knobs to search. When another regime, one flag or one
``from_pretrained`` argument away, fits a larger micro-batch, the result says so (``FitResult.regimes``):

- fp32 master weights under autocast -> the same weights loaded in the autocast dtype (``dtype=torch.bfloat16``),
  still under autocast: no fp32 weights, and no autocast-dtype copy of each one saved for backward;
- autocast on -> off (``bf16=False``): pure 16-bit training keeps no casts; with k-bit weights and the fp32
  upcast it also keeps no autocast copy of the fp32 lm_head and embeddings;
- autocast off -> on (``bf16=True``): QLoRA's fp32 attention inputs go to the flash kernel in bf16.

Each is estimated at the largest micro-batch that fits, by the same estimator (``memplan.plan.precision``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .estimate import Estimate, estimate_for
from .setup import TrainSetup, resolve_setup

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .budget import Budget

__all__ = ["RegimeAlternative", "leaner_regimes"]


@dataclass(frozen=True)
class RegimeAlternative:
    """Another precision regime of the same script: what to change, and its plan at the largest batch."""

    change: str
    estimate: Estimate

    def to_dict(self) -> dict:
        return {"change": self.change, "estimate": self.estimate.to_dict()}


def _candidates(setup: TrainSetup, gpu: GPUSpec | None) -> list[tuple[dict, str]]:
    half = "bf16" if gpu is None or gpu.bf16 else "fp16"
    out: list[tuple[dict, str]] = []
    if setup.bits == 32 and setup.autocast != "off":
        out.append(({"bits": 16, "dtype": setup.autocast},
                    f"load the weights in {setup.autocast} (from_pretrained dtype=torch.{_torch(setup.autocast)}) "
                    f"instead of fp32 master weights, keeping autocast"))
    if setup.autocast != "off" and setup.bits != 32:
        out.append(({"autocast": "off"}, f"train without autocast ({setup.autocast}=False in TrainingArguments)"))
    elif setup.autocast == "off":
        out.append(({"autocast": half}, f"train under autocast ({half}=True in TrainingArguments)"))
    return out


def _torch(dtype: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


def leaner_regimes(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, budget: Budget,
                   batches: list[int]) -> tuple[RegimeAlternative, ...]:
    """The regimes of ``_candidates`` in which a larger micro-batch than ``setup``'s fits ``budget`` (searched over
    ``batches``, ascending)."""
    out = []
    for changes, text in _candidates(setup, gpu):
        best = None
        try:
            other = resolve_setup(replace(setup, **changes), spec, gpu)
            for b in batches:  # few (powers of two); memory grows with the batch
                e = estimate_for(spec, replace(other, batch_size=b), gpu)
                if not budget.fits(e.total_bytes):
                    break
                best = e
        except InvalidSetupError:  # a regime this model cannot run (or, derived, its libraries cannot)
            continue
        if best is not None and best.setup.batch_size > setup.batch_size:
            out.append(RegimeAlternative(text, best))
    return tuple(out)
