"""What a plan may use of a card: one ``Budget``, one formula, one headroom default.

A plan fits when its estimated peak, CUDA context included, is at most ``limit_bytes`` = total - headroom;
equivalently when what it asks of torch's caching allocator fits ``usable_bytes`` = total - CUDA context -
headroom. ``fit``, ``preflight``, the capacity report and ``memplan gpus`` all take their budget from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.catalog.gpus import GENERIC_CUDA_CONTEXT_BYTES, GPUSpec
from memplan.errors import InvalidSetupError
from memplan.units import format_gib

__all__ = ["Budget", "DEFAULT_HEADROOM", "MAX_HEADROOM", "check_headroom"]

# Fraction of a card's total memory the planner keeps free on top of the estimate. The estimator already adds
# the caching allocator's expected rounding/fragmentation (memplan.plan.runtime.ALLOCATOR_OVERHEAD_FRACTION);
# this margin is for what it cannot see: transient spikes when the allocator cannot reuse a cached block for a
# larger request (then cudaMalloc's a new one while the old stays reserved), a display server / other
# processes on desktop cards (Xorg + a browser commonly hold 200-500 MiB), and the estimate's own error. 5%
# (1.2 GiB on a 24 GiB card) is a documented default until GPU runs (profiles/runs/) show how tight plans can
# be (docs/memory-model.md, "Runtime terms").
DEFAULT_HEADROOM = 0.05
# More than half the card held back is no longer a plan for that card; reject it as a likely typo (5 vs 0.05).
MAX_HEADROOM = 0.5


def check_headroom(headroom) -> float:
    """``headroom`` if it is a fraction in [0, MAX_HEADROOM], else ``InvalidSetupError``; None is the default."""
    if headroom is None:
        return DEFAULT_HEADROOM
    # `not (a <= x <= b)` also rejects NaN.
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom <= MAX_HEADROOM:
        raise InvalidSetupError(
            f"headroom {headroom!r} is out of range; allowed: 0 to {MAX_HEADROOM} (a fraction of the card's memory)"
        )
    return float(headroom)


@dataclass(frozen=True)
class Budget:
    """Memory a training run may use on one device.

    ``total_bytes``: what the device offers (a card's total; for a live device, free + what this process
    holds + its context); ``context_bytes``: the CUDA context inside it, which the estimate also counts;
    ``headroom_bytes``: kept free. ``derivation`` says where the numbers come from, for people.
    """

    total_bytes: int
    context_bytes: int
    headroom_bytes: int
    derivation: str

    @property
    def limit_bytes(self) -> int:
        """The most an estimate's total (CUDA context included) may be: total - headroom."""
        return self.total_bytes - self.headroom_bytes

    @property
    def usable_bytes(self) -> int:
        """What torch's allocator may hold: total - CUDA context - headroom (negative for a tiny budget)."""
        return self.total_bytes - self.context_bytes - self.headroom_bytes

    def fits(self, total_bytes: int) -> bool:
        return total_bytes <= self.limit_bytes

    def shortfall(self, total_bytes: int) -> int:
        """Bytes over the limit (negative: to spare)."""
        return total_bytes - self.limit_bytes

    @classmethod
    def for_gpu(cls, gpu: GPUSpec, headroom: float | None = None) -> Budget:
        """A catalog card (or a ``24GiB`` budget card): its total minus ``headroom`` of it."""
        fraction = check_headroom(headroom)
        held = int(fraction * gpu.total_bytes)
        return cls(gpu.total_bytes, gpu.cuda_context_bytes, held,
                   f"{gpu.label}: {format_gib(gpu.total_bytes, 2)} total - {format_gib(gpu.cuda_context_bytes, 2)} "
                   f"CUDA context - {fraction:.0%} headroom")

    @classmethod
    def of_limit(cls, limit_bytes: int, *, context_bytes: int = GENERIC_CUDA_CONTEXT_BYTES,
                 derivation: str | None = None) -> Budget:
        """A limit given directly (``preflight(budget_bytes=...)``): the peak, CUDA context included, may reach
        ``limit_bytes``; no headroom is taken off it."""
        return cls(limit_bytes, context_bytes, 0, derivation or f"a limit of {format_gib(limit_bytes, 2)}")
