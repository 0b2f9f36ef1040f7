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
    ``headroom_bytes``: kept free. ``derivation`` says how the number comes about, for people ("24.00 GiB total
    - 5% headroom"), ``source`` what offers it ("RTX 3090"); ``describe()`` is how every output names the budget.
    """

    total_bytes: int
    context_bytes: int
    headroom_bytes: int
    derivation: str  # "24.00 GiB total - 5% headroom"
    source: str = ""  # what offers the memory: "RTX 3090", "cuda:0 (RTX 3090)", "budget_bytes"

    @property
    def limit_bytes(self) -> int:
        """The most an estimate's total (CUDA context included) may be: total - headroom."""
        return self.total_bytes - self.headroom_bytes

    @property
    def usable_bytes(self) -> int:
        """What torch's allocator may hold: total - CUDA context - headroom (negative for a tiny budget)."""
        return self.total_bytes - self.context_bytes - self.headroom_bytes

    def describe(self, *, source: bool = True) -> str:
        """``22.80 GiB budget (RTX 3090: 24.00 GiB total - 5% headroom)``: the one way memplan names a budget
        (``source=False`` where the card is named already)."""
        where = f"{self.source}: " if source and self.source else ""
        return f"{format_gib(self.limit_bytes, 2)} budget ({where}{self.derivation})"

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
        budget = cls(gpu.total_bytes, gpu.cuda_context_bytes, held,
                     f"{format_gib(gpu.total_bytes, 2)} total - {fraction:.0%} headroom", gpu.label)
        if budget.usable_bytes <= 0:
            raise InvalidSetupError(
                f"{gpu.label} ({format_gib(gpu.total_bytes, 2)}) leaves nothing for training once the "
                f"{format_gib(gpu.cuda_context_bytes, 2)} CUDA context and {fraction:.0%} headroom are held back; "
                f"give a larger card or budget")
        return budget

    @classmethod
    def of_limit(cls, limit_bytes: int, *, context_bytes: int = GENERIC_CUDA_CONTEXT_BYTES,
                 source: str = "budget_bytes") -> Budget:
        """A limit given directly (``preflight(budget_bytes=...)``): the peak, CUDA context included, may reach
        ``limit_bytes``; no headroom is taken off it."""
        return cls(limit_bytes, context_bytes, 0, f"{limit_bytes:,} bytes, no headroom", source)
