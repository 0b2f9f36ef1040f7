"""What ``memplan fit`` adds on top of its search: the savers that leave the trained model unchanged, and the
initialisation phase.

Savers (``SAVERS``): a fused or chunked loss (``--loss``, memplan.plan.loss) and activation offloading
(``--activation-offload``, memplan.plan.offload) compute the same step with less device memory; neither changes
the result. ``fit`` searches them when the user has not pinned them:

- when nothing fits without one, it searches again with each saver (and with a loss saver and offloading together),
  in ``SAVER_ORDER``, and recommends the first plan that fits, naming the saver it needs (``saver_needed``); a
  saver under which even the leanest plan does not fit is not searched;
- when a plan fits, each free saver is an alternative: what it saves at the plan's batch, the largest batch it
  allows, and the host memory it needs.

An adapter variant or an initialisation changes what is trained: they are searched only when the user asks for one.

The initialisation (``--init loftq/pissa/olora``, memplan.plan.init_phase) runs once, before training, and has its
own peak: ``InitFit`` gives it beside training's, says which phase binds, and which initialisation path keeps it
inside the card (the planned one, or another).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError
from memplan.units import format_bytes

from .setup import resolve_setup

if TYPE_CHECKING:
    from collections.abc import Callable

    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .budget import Budget
    from .estimate import Estimate
    from .fit_result import FitResult
    from .setup import TrainSetup

__all__ = ["SaverOption", "InitFit", "with_savers", "SAVER_ORDER", "init_fit"]

# (field, value, what it is in a script): the loss savers first (they cost no step time on a GPU: Liger's kernel is
# faster than the eager loss), offloading last (it moves every saved activation over PCIe).
SAVER_ORDER: tuple[tuple[str, str, str], ...] = (
    ("loss", "liger", "use_liger_kernel=True (Liger's fused linear cross-entropy)"),
    ("loss", "chunked", "a chunked cross-entropy (torchtune's CEWithChunkedOutputLoss)"),
    ("activation_offload", "pinned", "activation_offloading=True (TRL; saved activations in pinned host memory)"),
)
_UNSET = {"loss": (None, "default"), "activation_offload": (None, "off")}


@dataclass(frozen=True)
class SaverOption:
    """One saver on the recommended plan: the plan with it at the same batch, and at the largest batch it allows."""

    field: str
    value: str
    what: str
    same_batch: Estimate
    saved_bytes: int  # the plan's peak minus the same plan's with the saver
    largest: Estimate | None  # the largest batch that fits with the saver (None: none)

    @property
    def host_bytes(self) -> int:
        return sum(self.same_batch.host_bytes.values())

    def describe(self, plan: Estimate) -> str:
        more = ""
        if self.largest is not None and self.largest.setup.batch_size > plan.setup.batch_size:
            more = f"; batch {self.largest.setup.batch_size} fits with it"
        host = f"; needs {format_bytes(self.host_bytes)} of host memory" if self.host_bytes else ""
        return f"--{self.field.replace('_', '-')} {self.value}: saves {format_bytes(self.saved_bytes)}{more}{host}"

    def to_dict(self) -> dict:
        return {"field": self.field, "value": self.value, "what": self.what, "saved_bytes": self.saved_bytes,
                "total_bytes": self.same_batch.total_bytes, "host_bytes": self.host_bytes,
                "largest_batch": self.largest.setup.batch_size if self.largest is not None else None,
                "largest_total_bytes": self.largest.total_bytes if self.largest is not None else None}


@dataclass(frozen=True)
class InitFit:
    """The initialisation phase of the recommended (or leanest) plan on the card."""

    paths: tuple  # memplan.plan.init_phase.InitPhase, the planned path first
    context_bytes: int  # the CUDA context, which the initialisation's process holds too
    limit_bytes: int  # the budget (total - headroom)
    training_bytes: int

    def total(self, path) -> int:
        return path.gpu_peak_bytes + self.context_bytes

    @property
    def planned(self):
        return self.paths[0]

    @property
    def within(self):
        """The path with the lowest peak among those that fit the card (None: none does)."""
        fitting = [p for p in self.paths if self.total(p) <= self.limit_bytes]
        return min(fitting, key=lambda p: p.gpu_peak_bytes, default=None)

    @property
    def binding(self) -> str:
        """Which phase sets the memory the run needs: the initialisation (on its leanest path) or training."""
        lean = min(self.paths, key=lambda p: p.gpu_peak_bytes)
        return "initialisation" if self.total(lean) > self.training_bytes else "training"

    def to_dict(self) -> dict:
        within = self.within
        return {"binding": self.binding, "training_bytes": self.training_bytes,
                "paths": [dict(p.to_dict(), total_bytes=self.total(p), fits=self.total(p) <= self.limit_bytes)
                          for p in self.paths],
                "path_within": within.path_id if within is not None else None}


def init_fit(spec: ModelSpec, plan: Estimate, gpu: GPUSpec | None, budget: Budget) -> InitFit | None:
    """The initialisation phase of ``plan`` on the card (None for the default initialisation)."""
    if plan.setup.init in (None, "default"):
        return None
    from .init_phase import init_paths  # (only for --init: the replay is not a plain plan's cost)

    paths = tuple(init_paths(spec, plan.setup))
    return InitFit(paths, plan.components.get("cuda_context", 0), budget.limit_bytes, plan.total_bytes)


def _free_savers(setup: TrainSetup, pinned: frozenset[str]) -> list[tuple[str, str, str]]:
    return [s for s in SAVER_ORDER if s[0] not in pinned and getattr(setup, s[0]) in _UNSET[s[0]]]


def _combinations(free: list[tuple[str, str, str]]) -> list[tuple[tuple[str, str, str], ...]]:
    """Each free saver alone, then a loss saver with offloading, in ``SAVER_ORDER``."""
    combos = [(s,) for s in free]
    offload = [s for s in free if s[0] == "activation_offload"]
    combos += [(s, o) for s in free if s[0] == "loss" for o in offload]
    return combos


def with_savers(result: FitResult, spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, budget: Budget,
                pinned: frozenset[str], search: Callable[[TrainSetup, frozenset[str]], FitResult],
                largest: Callable[[TrainSetup, int], Estimate | None]) -> FitResult:
    """``result`` with the savers searched (module docstring) and the initialisation phase added. ``search`` runs the
    search with other pinned knobs; ``largest(resolved, smallest)``: the estimate at the largest micro-batch of at
    least ``smallest`` that fits (the search's own)."""
    free = _free_savers(setup, pinned)
    if result.recommended is None and free:
        from .estimate import estimate_for

        for combo in _combinations(free):
            changes = {field: value for field, value, _ in combo}
            try:
                # A pruning rule: the leanest plan searched, with the saver, is the likeliest to fit; when it does
                # not, the full search with that saver is skipped (it could only find a plan the saver helps more,
                # say an un-checkpointed one under offloading): nothing-fits answers stay as fast as before
                probe = estimate_for(spec, resolve_setup(replace(result.leanest.setup, **changes), spec, gpu), gpu)
                if not budget.fits(probe.total_bytes):
                    continue
                saved = search(replace(setup, **changes), pinned | frozenset(changes))
            except InvalidSetupError:
                continue  # e.g. Liger has no kernel for this architecture
            if saved.recommended is not None:
                needed = " and ".join(what for _, _, what in combo)
                return replace(saved, saver_needed=needed, evaluated=saved.evaluated + result.evaluated,
                               init=init_fit(spec, saved.recommended, gpu, budget))
    options: list[SaverOption] = []
    plan = result.recommended
    if plan is not None:
        for field, value, what in free:
            option = _option(spec, plan, gpu, field, value, what, largest)
            if option is not None:
                options.append(option)
    return replace(result, savers=tuple(options), init=init_fit(spec, plan or result.leanest, gpu, budget))


def _option(spec: ModelSpec, plan: Estimate, gpu: GPUSpec | None, field: str, value: str, what: str,
            largest: Callable[[TrainSetup, int], Estimate | None]) -> SaverOption | None:
    from .estimate import estimate_for

    try:
        setup = resolve_setup(replace(plan.setup, **{field: value}), spec, gpu)
    except InvalidSetupError:
        return None
    same = estimate_for(spec, setup, gpu)
    if same.total_bytes >= plan.total_bytes:
        return None  # buys nothing here (the peak is elsewhere)
    return SaverOption(field, value, what, same, plan.total_bytes - same.total_bytes,
                       largest(setup, plan.setup.batch_size))
