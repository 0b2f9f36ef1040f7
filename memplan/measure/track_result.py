"""``TrackResult``: what ``memplan.measure.tracker.MemoryTracker.result`` returns (a plain dataclass, so that
reading a result needs no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrackResult"]


@dataclass(frozen=True)
class TrackResult:
    """What a tracked run used, in bytes (rounded per storage to the tracker's ``round_to``)."""

    peak_bytes: int
    peak_phase: str  # tracker phase at the peak: load / forward / backward / optimizer_step / zero_grad
    peak_components: dict[str, int]  # CATEGORIES -> bytes alive at the peak; sums to peak_bytes
    phase_peaks: dict[str, int]  # tracker phase -> highest level while it ran (over all steps)
    final_bytes: int  # alive when tracking stopped (or now, if it has not)
    step_peaks: list[int]  # one per step: from entering ``forward`` to entering the next one
    # the analytic model's phase names (memplan.plan.breakdown.PHASES), see the module docstring
    peak_estimate_phase: str = ""  # PHASES name at the peak ("" when the peak is in load / zero_grad)
    estimate_phase_peaks: dict[str, int] = field(default_factory=dict)  # PHASES name -> highest level
    peak_step: int = 0  # 1-based step of the peak (0: before the first step)
    # PHASES name -> CATEGORIES -> bytes alive when that phase first reached its highest level
    estimate_phase_components: dict[str, dict[str, int]] = field(default_factory=dict)
