"""The search: the best fine-tuning setup that fits a budget, the alternatives, and what the next step up costs.

The search tries every combination of the free knobs (bits x rank x targets x checkpointing x optimizer, each at
the largest micro-batch that fits) and ranks the plans that fit by what the user prefers (``PREFERENCES``; the
README and docs/step-time.md state each rule; every knob can be pinned):

- ``balanced`` (default, what practitioners pick): 16-bit, then 4-bit NF4 (QLoRA), then LLM.int8; adapters on
  all linear layers; then the shortest expected step time (``memplan.plan.speed``); then rank, batch, optimizer;
- ``quality``: 16 > 8 > 4 bits; all linear layers; rank; step time; batch; optimizer;
- ``speed``: the shortest step time; batch; then as quality;
- ``memory``: the lowest peak, each combination at the smallest micro-batch (1, or the pinned one) rather than
  the largest that fits; then as quality.

The optimizer order is adamw_torch, adamw_bnb_8bit, paged_adamw_8bit (exact first, paged last). QLoRA (Dettmers
et al. 2023, §4): adapting every linear layer is what matches full fine-tuning quality; the rank does not.

A plan fits when its estimated peak, CUDA context included, is within the ``Budget``
(``memplan.plan.budget``): for a card, its total memory minus the headroom.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError, UnknownGPUError

from .budget import Budget, check_headroom
from .estimate import Estimate, estimate_for
from .fit_result import DEFAULT_MAX_BATCH, DEFAULT_PREFER, FitResult, NextStep
from .distributed import OFFLOADS
from .multi_fit import engine_rank, fit_fewest_gpus, search_engines, searchable_engine
from .savers import with_savers
from .setup import TrainSetup, resolve_setup, sequence_limit
from .regimes import leaner_regimes
from .speed import step_time
from .stack_notes import fit_notes

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .changes import Change

__all__ = ["FitResult", "NextStep", "fit", "fit_for", "smallest_gpu", "SEARCH_BITS", "SEARCH_RANKS",
           "SEARCH_OPTIMIZERS", "DEFAULT_MAX_BATCH", "PREFERENCES", "DEFAULT_PREFER", "PREFERENCE_RULES"]

SEARCH_BITS = (16, 8, 4)
SEARCH_RANKS = (64, 32, 16, 8)
SEARCH_OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit")
PREFERENCES = ("balanced", "quality", "speed", "memory")
# What each preference puts first, in order (``_rank_key``); the reports quote these.
PREFERENCE_RULES = {
    "balanced": "16-bit base weights, then 4-bit NF4 + double quant (QLoRA), then LLM.int8; adapters on all "
                "linear layers over the default targets; the shortest expected step time; then the larger rank, "
                "the larger micro-batch, and the optimizer in the order adamw_torch, adamw_bnb_8bit, "
                "paged_adamw_8bit",
    "quality": "higher precision of the base weights (16 > 8 > 4 bits); adapters on all linear layers over the "
               "default targets; the larger rank; the shortest expected step time; the larger micro-batch; the "
               "optimizer in the order adamw_torch, adamw_bnb_8bit, paged_adamw_8bit",
    "speed": "the shortest expected step time; the larger micro-batch; then as quality",
    "memory": "the lowest peak, every combination at the smallest micro-batch (not the largest that fits); then "
              "as quality",
}
# Upper bound for "longest sequence at batch 1" where the model states no context (ALiBi) or the user allows a
# longer one than it was trained on (--allow-long-context; Llama-3.1's trained context is 131072).
MAX_SEQ_SEARCH = 131072


def fit(setup: TrainSetup, gpu: GPUSpec | str, *, headroom: float | None = None, pinned: frozenset[str] = frozenset(),
        max_batch: int = DEFAULT_MAX_BATCH, prefer: str = DEFAULT_PREFER, profiles_dir=None,
        gpus_auto: bool = False) -> FitResult:
    """Search the best plan for ``setup.model`` on ``gpu``. Fields named in ``pinned`` keep ``setup``'s value;
    ``gpus_auto``: on the fewest cards of ``gpu`` that fit one."""
    from memplan.catalog.gpus import as_gpu
    from memplan.catalog.models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_spec = as_gpu(gpu, profiles_dir=profiles_dir)
    if gpu_spec is None:
        raise UnknownGPUError("fit needs a card or a budget (gpu='3090', '24GiB'), got None")
    return fit_for(spec, setup, gpu_spec, headroom=headroom, pinned=pinned, max_batch=max_batch, prefer=prefer,
                   profiles_dir=profiles_dir, gpus_auto=gpus_auto)


def _batch_sizes(max_batch: int) -> list[int]:
    """The micro-batches the search tries: powers of two up to ``max_batch``."""
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= max_batch]


class _Searcher:
    def __init__(self, spec: ModelSpec, gpu: GPUSpec | None, budget: Budget):
        self.spec, self.gpu, self.budget = spec, gpu, budget
        self.evaluated = 0

    def est(self, setup: TrainSetup) -> Estimate:
        self.evaluated += 1
        return estimate_for(self.spec, setup, self.gpu)

    def fits(self, e: Estimate) -> bool:
        return self.budget.fits(e.total_bytes)

    def max_batch(self, resolved: TrainSetup, batches: list[int]) -> Estimate | None:
        """The estimate at the largest batch in ``batches`` (ascending) that fits; memory grows with batch."""
        lo, hi, best = 0, len(batches) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            e = self.est(replace(resolved, batch_size=batches[mid]))
            if self.fits(e):
                best, lo = e, mid + 1
            else:
                hi = mid - 1
        return best

    def max_seq(self, resolved: TrainSetup, limit: int) -> int | None:
        """The longest sequence up to ``limit`` that fits at batch 1. Memory grows with the sequence except at a
        sliding window, where SDPA switches kernels (``activations.sdpa_mask_materialised``) and can need less:
        each side of the window is searched on its own, the longer side first."""
        window = self.spec.sliding_window if resolved.attn == "sdpa" else None
        if window and 1 < window <= limit:
            try:  # (a derived model's masked regime may be refused: the shorter side stands)
                longer = self._longest(resolved, window, limit)
            except InvalidSetupError:
                longer = None
            return longer or self._longest(resolved, 1, window - 1)
        return self._longest(resolved, 1, limit)

    def _longest(self, resolved: TrainSetup, lo: int, hi: int) -> int | None:
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.fits(self.est(replace(resolved, batch_size=1, seq_len=mid))):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best


# Base-weight precision as each preference orders it (higher first). Balanced: QLoRA's NF4 before LLM.int8, as
# practitioners pick (docs/step-time.md, "How fit uses it").
_QUALITY_BITS = {32: 4, 16: 3, 8: 2, 4: 1}
_BALANCED_BITS = {32: 4, 16: 3, 4: 2, 8: 1}


def _rank_key(prefer: str):
    """The sort key (larger is better) of a preference."""
    def parts(e: Estimate) -> dict:
        s = e.setup
        return {"targets": 1 if s.targets == "all-linear" else 0,
                "rank": s.rank if s.method != "full" else 0,
                "time": -step_time(s).factor,
                "batch": s.batch_size,
                "optimizer": -SEARCH_OPTIMIZERS.index(s.optimizer) if s.optimizer in SEARCH_OPTIMIZERS else 0,
                "quality_bits": _QUALITY_BITS.get(s.bits, 0),
                "balanced_bits": _BALANCED_BITS.get(s.bits, 0),
                "memory": -e.total_bytes,
                "host": -OFFLOADS.index(s.offload),
                "engine": engine_rank(s)}

    # several GPUs: "host" puts a plan that keeps nothing in host memory first (offloading is the slowest way to
    # fit), "engine" the engine that communicates least (memplan.plan.multi_fit.engine_rank)
    orders = {
        "balanced": ("host", "balanced_bits", "targets", "engine", "time", "rank", "batch", "optimizer"),
        "quality": ("quality_bits", "host", "targets", "rank", "engine", "time", "batch", "optimizer"),
        "speed": ("host", "engine", "time", "batch", "quality_bits", "targets", "rank", "optimizer"),
        "memory": ("memory", "quality_bits", "targets", "rank", "time", "optimizer", "host", "engine"),
    }
    order = orders[prefer]

    def key(e: Estimate) -> tuple:
        p = parts(e)
        return tuple(p[name] for name in order)

    return key


def fit_for(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, *, budget: Budget | None = None,
            headroom: float | None = None, pinned: frozenset[str] = frozenset(),
            max_batch: int = DEFAULT_MAX_BATCH, prefer: str = DEFAULT_PREFER, profiles_dir=None,
            gpus_auto: bool = False) -> FitResult:
    """The search for a resolved model ``spec``. ``gpus_auto``: the search at the fewest cards on which a plan fits
    (``memplan.plan.multi_fit.fit_fewest_gpus``). ``budget`` defaults to ``gpu``'s total minus ``headroom``;
    ``gpu`` (a card, or None) decides the CUDA context and the dtypes and kernels the card supports;
    ``prefer`` (one of ``PREFERENCES``) what the ranking puts first. The savers the user left free and the
    initialisation phase are added by ``memplan.plan.savers``."""
    headroom = check_headroom(headroom)
    if budget is None:
        budget = Budget.for_gpu(gpu, headroom)

    def search(s: TrainSetup, p: frozenset[str]) -> FitResult:
        return _search(spec, s, gpu, budget=budget, headroom=headroom, pinned=p, max_batch=max_batch, prefer=prefer,
                       profiles_dir=profiles_dir)

    batches = _batch_sizes(max_batch)
    searcher = _Searcher(spec, gpu, budget)

    def with_free_savers(s: TrainSetup, p: frozenset[str]) -> FitResult:
        return with_savers(search(s, p), spec, s, gpu, budget, p, search,
                           lambda resolved, smallest: searcher.max_batch(resolved, [b for b in batches
                                                                                    if b >= smallest]))

    if not gpus_auto:
        return with_free_savers(setup, pinned)
    result, tried = fit_fewest_gpus(spec, setup, gpu, pinned=pinned, search=with_free_savers, budget=budget)
    return replace(result, gpus_tried=tuple(tried))


def _search(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, *, budget: Budget, headroom: float,
            pinned: frozenset[str], max_batch: int, prefer: str, profiles_dir) -> FitResult:
    if prefer not in PREFERENCES:
        raise InvalidSetupError(f"invalid preference {prefer!r}; allowed: {', '.join(PREFERENCES)}")
    if max_batch < 1:
        raise InvalidSetupError(f"invalid max batch {max_batch!r}; must be >= 1")
    s = _Searcher(spec, gpu, budget)

    def pick(name: str, values):
        return (getattr(setup, name),) if name in pinned else tuple(values)

    method_pinned = "method" in pinned
    if method_pinned and setup.method == "full":
        bits_values = pick("bits", (16,))
    elif method_pinned and setup.method == "qlora":
        bits_values = pick("bits", (4,))  # qlora with other pinned bits: resolve_setup says why not
    else:
        bits_values = pick("bits", SEARCH_BITS)
    full = method_pinned and setup.method == "full"
    rank_values = (setup.rank,) if full else pick("rank", SEARCH_RANKS)
    default_targets = ",".join(spec.default_lora_targets())
    target_values = (None,) if full else pick("targets", dict.fromkeys((default_targets, "all-linear")))
    ckpt_values = pick("grad_ckpt", (False, True))
    opt_values = pick("optimizer", SEARCH_OPTIMIZERS)
    engines = search_engines(setup, pinned)  # several GPUs: (strategy, offload) pairs (memplan.plan.multi_fit)
    if "batch_size" in pinned:
        batches = [setup.batch_size]
    else:
        batches = _batch_sizes(max_batch)

    best_by_combo: list[Estimate] = []
    at_smallest_batch: list[Estimate] = []  # what ``memory`` ranks: each combination at the smallest batch
    leanest: Estimate | None = None
    first_error: InvalidSetupError | None = None
    for bits in bits_values:
        method = setup.method if method_pinned else ("qlora" if bits == 4 else "lora")
        for rank in rank_values:
            for targets in target_values:
                for ckpt in ckpt_values:
                    for opt, (strategy, offload) in ((o, e) for o in opt_values for e in engines):
                        if not searchable_engine(strategy, bits, pinned):
                            continue
                        candidate = replace(setup, method=method, bits=bits, rank=rank, targets=targets,
                                            grad_ckpt=ckpt, optimizer=opt, batch_size=batches[0],
                                            strategy=strategy, offload=offload)
                        try:
                            resolved = resolve_setup(candidate, spec, gpu)
                            at_one = s.est(resolved)
                        except InvalidSetupError as exc:
                            # e.g. all-linear on Mixtral with LoRA dropout (peft refuses it), or a derived model's
                            # regime its libraries cannot run: other combinations may still run; when none can,
                            # the first reason is the answer
                            first_error = first_error or exc
                            continue
                        if leanest is None or at_one.total_bytes < leanest.total_bytes:
                            leanest = at_one
                        if s.fits(at_one):
                            at_smallest_batch.append(at_one)
                            if prefer != "memory":
                                best_by_combo.append(s.max_batch(resolved, batches) or at_one)
    if leanest is None:  # no combination of the searched knobs can run: a bad value the user gave
        raise first_error

    if prefer == "memory":
        best_by_combo = at_smallest_batch
    if not best_by_combo:
        changes = _pinned_changes(spec, leanest.setup, gpu, budget, pinned)
        return FitResult(spec.name, gpu, headroom, budget, None, (), None, None,
                         smallest_gpu(spec, leanest.setup, headroom, profiles_dir), leanest, s.evaluated,
                         changes=changes, max_batch=batches[-1], prefer=prefer, notes=fit_notes(spec, leanest, gpu))

    ranked = sorted(best_by_combo, key=_rank_key(prefer), reverse=True)
    recommended = ranked[0]
    alternatives = _alternatives(recommended, ranked)

    next_batch = None
    if "batch_size" not in pinned:
        bigger = s.est(replace(recommended.setup, batch_size=recommended.setup.batch_size * 2))
        capped = recommended.setup.batch_size * 2 > batches[-1]
        next_batch = NextStep(bigger, budget.shortfall(bigger.total_bytes),
                              smallest_gpu(spec, bigger.setup, headroom, profiles_dir), capped=capped)
    regimes = () if "batch_size" in pinned else leaner_regimes(spec, recommended.setup, gpu, budget, batches)
    limit = sequence_limit(spec, allow_long_context=recommended.setup.allow_long_context)
    max_seq = s.max_seq(recommended.setup, limit or max(MAX_SEQ_SEARCH, spec.max_position_embeddings or 0))
    return FitResult(spec.name, gpu, headroom, budget, recommended, alternatives, next_batch, max_seq, None,
                     leanest, s.evaluated,
                     max_seq_len_limit=(("learned" if spec.max_seq_len else "trained") if max_seq == limit else None),
                     max_batch=batches[-1],
                     prefer=prefer, regimes=regimes, notes=fit_notes(spec, recommended, gpu))


def _pinned_changes(spec: ModelSpec, leanest: TrainSetup, gpu: GPUSpec | None, budget: Budget,
                    pinned: frozenset[str]) -> tuple[Change, ...]:
    """``smallest_changes`` of the leanest plan that touch a pinned knob (the search tried every free one)."""
    if not pinned:
        return ()
    from .changes import smallest_changes  # only when nothing fits
    touched = {"batch_size": {"batch_size"}, "grad_ckpt": {"grad_ckpt"}, "optimizer": {"optimizer"},
               "bits": {"bits", "method"}}
    return tuple(c for c in smallest_changes(spec, leanest, gpu, budget)
                 if any(pinned & touched.get(k, {k}) for k in c.fields))


def _alternatives(recommended: Estimate, ranked: list[Estimate]) -> tuple[Estimate, ...]:
    """The best plan at each other bit width, then at the recommended bits: the largest batch, and the
    other choice of checkpointing and of targets. No duplicates, ranked order kept within each kind."""
    rs = recommended.setup
    picks: list[Estimate] = []

    def first(pred) -> None:
        for e in ranked:
            if e is not recommended and pred(e.setup) and all(e.setup != p.setup for p in picks):
                picks.append(e)
                return

    for bits in (16, 8, 4, 32):
        if bits != rs.bits:
            first(lambda s, b=bits: s.bits == b)
    same_bits = [e for e in ranked if e.setup.bits == rs.bits and e is not recommended]
    if same_bits:
        widest = max(same_bits, key=lambda e: (e.setup.batch_size, -e.total_bytes))
        if widest.setup.batch_size > rs.batch_size and all(widest.setup != p.setup for p in picks):
            picks.append(widest)
    first(lambda s: s.bits == rs.bits and s.grad_ckpt != rs.grad_ckpt)
    first(lambda s: s.bits == rs.bits and s.targets != rs.targets)
    return tuple(picks)


def smallest_gpu(spec: ModelSpec, setup: TrainSetup, headroom: float | None, profiles_dir=None) -> str | None:
    """Name of the catalog card with the least memory on which ``setup`` fits (with ``headroom`` kept free)."""
    from memplan.catalog.gpus import list_gpus

    for card in sorted(list_gpus(profiles_dir=profiles_dir), key=lambda g: g.total_bytes):
        try:
            resolved = resolve_setup(replace(setup, dtype=None if not card.bf16 and setup.dtype == "bf16"
                                             else setup.dtype), spec, card)
        except InvalidSetupError:
            continue
        if Budget.for_gpu(card, headroom).fits(estimate_for(spec, resolved, card).total_bytes):
            return card.name
    return None
