"""What ``memplan fit`` answers: the recommended plan, its alternatives, the next batch up, what the savers buy
and the initialisation's own peak. Built by ``memplan.plan.search``; rendered by ``memplan.reports.terminal``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .speed import step_time

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec

    from .budget import Budget
    from .changes import Change
    from .estimate import Estimate
    from .regimes import RegimeAlternative
    from .savers import InitFit, SaverOption

__all__ = ["FitResult", "NextStep", "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 64
DEFAULT_PREFER = "balanced"  # memplan.plan.search.PREFERENCES' first


@dataclass(frozen=True)
class NextStep:
    """What the recommended plan would need at the next micro-batch size up. It does not fit the budget,
    unless the search stopped at ``max_batch`` first (``capped``): then it may fit (``shortfall_bytes`` <= 0)."""

    estimate: Estimate
    shortfall_bytes: int  # how much more than the budget it needs (<= 0: it fits, with that much to spare)
    smallest_gpu: str | None  # the smallest catalog card it fits (its name), if any
    capped: bool = False  # the recommended batch is max_batch: the search did not try larger ones

    @property
    def fits(self) -> bool:
        return self.shortfall_bytes <= 0


@dataclass(frozen=True)
class FitResult:
    model: str
    gpu: GPUSpec
    headroom: float
    budget: Budget
    recommended: Estimate | None
    alternatives: tuple[Estimate, ...]
    next_batch: NextStep | None
    max_seq_len_batch1: int | None  # longest sequence that fits at batch 1 with the recommended settings
    smallest_gpu: str | None  # when nothing fits: the smallest card the leanest plan fits
    leanest: Estimate  # the leanest plan searched (reported when nothing fits)
    evaluated: int  # number of estimates computed
    # the search stopped at the model's limit, not memory: "learned" (a position table, hard) or "trained" (the
    # context the config states; --allow-long-context plans beyond it); None when memory stopped it
    max_seq_len_limit: str | None = None

    @property
    def max_seq_len_is_model_limit(self) -> bool:
        return self.max_seq_len_limit is not None
    # When nothing fits with the pinned knobs: single changes of a pinned knob after which the leanest plan
    # fits (``smallest_changes``), so that a --config user learns what to change or --free.
    changes: tuple[Change, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH  # the largest micro-batch the search tried
    prefer: str = DEFAULT_PREFER  # what the ranking put first (PREFERENCES)
    # other precision regimes of the same script that fit a larger micro-batch (memplan.plan.regimes)
    regimes: tuple[RegimeAlternative, ...] = ()
    notes: tuple[str, ...] = ()  # about the library stack (memplan.plan.stack_notes): fused MoE experts at 4 bits
    # what each saver the user left free (fused / chunked loss, activation offloading) buys over the plan, and
    # whether the plan needs one (memplan.plan.savers)
    savers: tuple[SaverOption, ...] = ()
    saver_needed: str | None = None  # the saver without which nothing fits
    init: InitFit | None = None  # --init loftq/pissa/olora: the initialisation's peak, its paths, the binding phase
    # --gpus auto: the card counts tried before the one answered (memplan.plan.multi_fit); None: a given count
    gpus_tried: tuple[int, ...] | None = None

    @property
    def budget_bytes(self) -> int:
        """What a plan's total (CUDA context included) may reach: total - headroom."""
        return self.budget.limit_bytes

    @property
    def usable_bytes(self) -> int:
        """What torch may allocate: total - CUDA context - headroom."""
        return self.budget.usable_bytes

    def to_dict(self) -> dict:
        def plan(e: Estimate) -> dict:
            return {**e.to_dict(), "relative_step_time": step_time(e.setup).factor}

        return {
            "model": self.model,
            "prefer": self.prefer,
            "gpu": {
                "name": self.gpu.name,
                "id": self.gpu.id,
                "total_bytes": self.gpu.total_bytes,
                "cuda_context_bytes": self.gpu.cuda_context_bytes,
                "headroom": self.headroom,
                "budget_bytes": self.budget_bytes,
                "usable_bytes": self.usable_bytes,
            },
            "recommended": plan(self.recommended) if self.recommended else None,
            "regimes": [r.to_dict() for r in self.regimes],
            "notes": list(self.notes),
            "alternatives": [plan(e) for e in self.alternatives],
            "next_batch": None if self.next_batch is None else {
                "estimate": self.next_batch.estimate.to_dict(),
                "shortfall_bytes": self.next_batch.shortfall_bytes,
                "fits": self.next_batch.fits,
                "capped_by_max_batch": self.next_batch.capped,
                "smallest_gpu": self.next_batch.smallest_gpu,
            },
            "max_seq_len_batch1": self.max_seq_len_batch1,
            "max_seq_len_is_model_limit": self.max_seq_len_is_model_limit,
            "max_seq_len_limit": self.max_seq_len_limit,
            "smallest_gpu": self.smallest_gpu,
            "leanest": self.leanest.to_dict(),
            "changes": [c.to_dict() for c in self.changes],
            "evaluated": self.evaluated,
            "savers": [o.to_dict() for o in self.savers],
            "saver_needed": self.saver_needed,
            "init": self.init.to_dict() if self.init is not None else None,
            "gpus": self._gpus(),
        }

    def _gpus(self) -> dict:
        """How many cards the answer is for, and for --gpus auto the counts that did not fit."""
        plan = self.recommended or self.leanest
        count = plan.setup.gpus * plan.setup.nodes
        return {"count": count, "per_node": plan.setup.gpus, "nodes": plan.setup.nodes,
                "strategy": plan.setup.strategy, "auto": self.gpus_tried is not None,
                "tried_without_fit": list(self.gpus_tried or ())}
