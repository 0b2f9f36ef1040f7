"""The search: the best fine-tuning setup that fits a card, the alternatives, and what the next step up costs.

Ranking rule (stated in the README; every knob can be pinned):
1. higher precision of the base weights (16 > 8 > 4 bits),
2. larger LoRA rank (64 > 32 > 16 > 8),
3. adapters on all linear layers over the model's default targets (QLoRA, Dettmers et al. 2023, §4: adapting
   every linear layer is what matches full fine-tuning quality),
4. the largest micro-batch that fits (powers of two up to ``max_batch``),
5. no gradient checkpointing over checkpointing (checkpointing recomputes the forward, ~30% slower),
6. the optimizer in the order: adamw_torch, adamw_bnb_8bit, paged_adamw_8bit (exact first, paged last).

A plan fits when its estimated peak, CUDA context included, is at most the card's total memory minus the
headroom, i.e. when what it asks of torch's allocator fits the card's usable memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import InvalidSetupError
from .estimate import Estimate, estimate_for
from .setups import TrainSetup, resolve_setup

if TYPE_CHECKING:
    from .gpus import GPUSpec
    from .models import ModelSpec

__all__ = ["FitResult", "NextStep", "Change", "fit", "fit_for", "smallest_changes", "SEARCH_BITS", "SEARCH_RANKS", "SEARCH_OPTIMIZERS"]

SEARCH_BITS = (16, 8, 4)
SEARCH_RANKS = (64, 32, 16, 8)
SEARCH_OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit")
DEFAULT_MAX_BATCH = 64
# Upper bound for "longest sequence at batch 1" on rotary / alibi models (Llama-3.1's context is 131072).
MAX_SEQ_SEARCH = 131072


@dataclass(frozen=True)
class NextStep:
    """What the recommended plan would need at the next micro-batch size up."""

    estimate: Estimate
    shortfall_bytes: int  # how much more than the budget it needs (> 0)
    smallest_gpu: str | None  # the smallest catalog card it fits (its name), if any


@dataclass(frozen=True)
class FitResult:
    model: str
    gpu: GPUSpec
    headroom: float
    budget_bytes: int  # total - headroom: what a plan's total (context included) may reach
    usable_bytes: int  # total - context - headroom: what torch may allocate
    recommended: Estimate | None
    alternatives: tuple[Estimate, ...]
    next_batch: NextStep | None
    max_seq_len_batch1: int | None  # longest sequence that fits at batch 1 with the recommended settings
    smallest_gpu: str | None  # when nothing fits: the smallest card the leanest plan fits
    leanest: Estimate  # the leanest plan searched (reported when nothing fits)
    evaluated: int  # number of estimates computed
    max_seq_len_is_model_limit: bool = False  # the search stopped at learned position embeddings, not memory
    # When nothing fits with the pinned knobs: single changes of a pinned knob after which the leanest plan
    # fits (``smallest_changes``), so that a --config user learns what to change or --free.
    changes: tuple[Change, ...] = ()

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "gpu": {
                "name": self.gpu.name,
                "id": self.gpu.id,
                "total_bytes": self.gpu.total_bytes,
                "cuda_context_bytes": self.gpu.cuda_context_bytes,
                "headroom": self.headroom,
                "budget_bytes": self.budget_bytes,
                "usable_bytes": self.usable_bytes,
            },
            "recommended": self.recommended.to_dict() if self.recommended else None,
            "alternatives": [e.to_dict() for e in self.alternatives],
            "next_batch": None if self.next_batch is None else {
                "estimate": self.next_batch.estimate.to_dict(),
                "shortfall_bytes": self.next_batch.shortfall_bytes,
                "smallest_gpu": self.next_batch.smallest_gpu,
            },
            "max_seq_len_batch1": self.max_seq_len_batch1,
            "max_seq_len_is_model_limit": self.max_seq_len_is_model_limit,
            "smallest_gpu": self.smallest_gpu,
            "leanest": self.leanest.to_dict(),
            "changes": [c.to_dict() for c in self.changes],
            "evaluated": self.evaluated,
        }


def fit(setup: TrainSetup, gpu: GPUSpec | str, *, headroom: float | None = None, pinned: frozenset[str] = frozenset(),
        max_batch: int = DEFAULT_MAX_BATCH, profiles_dir=None) -> FitResult:
    """Search the best plan for ``setup.model`` on ``gpu``. Fields named in ``pinned`` keep ``setup``'s value."""
    from .gpus import load_gpu
    from .models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_spec = load_gpu(gpu, profiles_dir=profiles_dir) if isinstance(gpu, str) else gpu
    return fit_for(spec, setup, gpu_spec, headroom=headroom, pinned=pinned, max_batch=max_batch,
                   profiles_dir=profiles_dir)


class _Searcher:
    def __init__(self, spec: ModelSpec, gpu: GPUSpec, budget: int):
        self.spec, self.gpu, self.budget = spec, gpu, budget
        self.evaluated = 0

    def est(self, setup: TrainSetup) -> Estimate:
        self.evaluated += 1
        return estimate_for(self.spec, setup, self.gpu)

    def fits(self, e: Estimate) -> bool:
        return e.total_bytes <= self.budget

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
        lo, hi, best = 1, limit, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.fits(self.est(replace(resolved, batch_size=1, seq_len=mid))):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best


def _rank_key(e: Estimate) -> tuple:
    s = e.setup
    targets_pref = 1 if s.targets == "all-linear" else 0
    opt_pref = -SEARCH_OPTIMIZERS.index(s.optimizer) if s.optimizer in SEARCH_OPTIMIZERS else 0
    return (s.bits, s.rank if s.method != "full" else 0, targets_pref, s.batch_size, not s.grad_ckpt, opt_pref)


def fit_for(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec, *, headroom: float | None = None,
            pinned: frozenset[str] = frozenset(), max_batch: int = DEFAULT_MAX_BATCH, profiles_dir=None) -> FitResult:
    from .gpus import DEFAULT_HEADROOM

    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    budget = gpu.total_bytes - gpu.headroom_bytes(headroom)
    if max_batch < 1:
        raise InvalidSetupError(f"invalid max batch {max_batch!r}; must be >= 1")
    s = _Searcher(spec, gpu, budget)

    def pick(name: str, values):
        return (getattr(setup, name),) if name in pinned else tuple(values)

    method_pinned = "method" in pinned
    if method_pinned and setup.method == "full":
        bits_values = pick("bits", (16,))
    elif method_pinned and setup.method == "qlora":
        bits_values = (4,)
    else:
        bits_values = pick("bits", SEARCH_BITS)
    full = method_pinned and setup.method == "full"
    rank_values = (setup.rank,) if full else pick("rank", SEARCH_RANKS)
    default_targets = ",".join(spec.default_lora_targets())
    target_values = (None,) if full else pick("targets", dict.fromkeys((default_targets, "all-linear")))
    ckpt_values = pick("grad_ckpt", (False, True))
    opt_values = pick("optimizer", SEARCH_OPTIMIZERS)
    if "batch_size" in pinned:
        batches = [setup.batch_size]
    else:
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= max_batch]

    best_by_combo: list[Estimate] = []
    leanest: Estimate | None = None
    for bits in bits_values:
        method = setup.method if method_pinned else ("qlora" if bits == 4 else "lora")
        for rank in rank_values:
            for targets in target_values:
                for ckpt in ckpt_values:
                    for opt in opt_values:
                        candidate = replace(setup, method=method, bits=bits, rank=rank, targets=targets,
                                            grad_ckpt=ckpt, optimizer=opt, batch_size=batches[0])
                        try:
                            resolved = resolve_setup(candidate, spec, gpu)
                        except InvalidSetupError:
                            if len(target_values) == 1 and len(bits_values) == 1:
                                raise  # the user pinned a combination that cannot run: say why
                            continue  # e.g. all-linear on Mixtral with LoRA dropout: peft refuses it
                        at_one = s.est(resolved)
                        if leanest is None or at_one.total_bytes < leanest.total_bytes:
                            leanest = at_one
                        if s.fits(at_one):
                            best_by_combo.append(s.max_batch(resolved, batches) or at_one)
    assert leanest is not None  # at least one combination was evaluated

    if not best_by_combo:
        changes = _pinned_changes(spec, leanest.setup, gpu, budget, pinned)
        return FitResult(spec.name, gpu, headroom, budget, gpu.usable_bytes(headroom), None, (), None, None,
                         _smallest_gpu(spec, leanest.setup, headroom, profiles_dir), leanest, s.evaluated,
                         changes=changes)

    ranked = sorted(best_by_combo, key=_rank_key, reverse=True)
    recommended = ranked[0]
    alternatives = _alternatives(recommended, ranked)

    next_batch = None
    if "batch_size" not in pinned:
        bigger = s.est(replace(recommended.setup, batch_size=recommended.setup.batch_size * 2))
        next_batch = NextStep(bigger, bigger.total_bytes - budget,
                              _smallest_gpu(spec, bigger.setup, headroom, profiles_dir))
    seq_limit = spec.max_seq_len or max(MAX_SEQ_SEARCH, spec.max_position_embeddings or 0)
    max_seq = s.max_seq(recommended.setup, seq_limit)
    return FitResult(spec.name, gpu, headroom, budget, gpu.usable_bytes(headroom), recommended, alternatives,
                     next_batch, max_seq, None, leanest, s.evaluated,
                     max_seq_len_is_model_limit=max_seq == spec.max_seq_len)


def _pinned_changes(spec: ModelSpec, leanest: TrainSetup, gpu: GPUSpec, budget: int,
                    pinned: frozenset[str]) -> tuple[Change, ...]:
    """``smallest_changes`` of the leanest plan that touch a pinned knob (the search tried every free one)."""
    if not pinned:
        return ()
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


def _smallest_gpu(spec: ModelSpec, setup: TrainSetup, headroom: float, profiles_dir=None) -> str | None:
    """Name of the catalog card with the least memory on which ``setup`` fits."""
    from .gpus import list_gpus

    for card in sorted(list_gpus(profiles_dir=profiles_dir), key=lambda g: g.total_bytes):
        try:
            resolved = resolve_setup(replace(setup, dtype=None if not card.bf16 and setup.dtype == "bf16"
                                             else setup.dtype), spec, card)
        except InvalidSetupError:
            continue
        if estimate_for(spec, resolved, card).total_bytes <= card.total_bytes - card.headroom_bytes(headroom):
            return card.name
    return None


# ------------------------------------------------------------------------------------------ one-knob changes


@dataclass(frozen=True)
class Change:
    """One change to a setup that does not fit, with the estimate after it (``memplan.preflight``)."""

    fields: dict  # TrainSetup field -> new value
    estimate: Estimate
    description: str  # "batch size 8 -> 4 (gradient_accumulation_steps x2 keeps the effective batch)"

    def to_dict(self) -> dict:
        return {"fields": dict(self.fields), "description": self.description,
                "total_bytes": self.estimate.total_bytes}


def smallest_changes(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None, budget_bytes: int) -> tuple[Change, ...]:
    """The single changes to a resolved ``setup`` after which it fits ``budget_bytes`` (estimate total, CUDA
    context included), least disruptive first: a smaller micro-batch (the largest that fits; gradient
    accumulation keeps the effective batch, so the optimisation is unchanged), gradient checkpointing (~30%
    slower, same result), a paged 8-bit optimizer (bitsandbytes' 8-bit AdamW: near-identical training, state
    paged to host memory under pressure), then lower precision of the frozen weights (8-bit, then 4-bit NF4 +
    double quant: a change of the model being tuned). Empty when no single change is enough; then
    ``fit_for`` with nothing pinned but the sequence length is the answer."""
    out: list[Change] = []

    def est(s: TrainSetup) -> Estimate | None:
        try:
            return estimate_for(spec, resolve_setup(s, spec, gpu), gpu)
        except InvalidSetupError:
            return None

    def add(fields: dict, description: str) -> None:
        e = est(replace(setup, **fields))
        if e is not None and e.total_bytes <= budget_bytes:
            out.append(Change(fields, e, description))

    if setup.batch_size > 1:
        lo, hi, best = 1, setup.batch_size - 1, None
        while lo <= hi:  # memory grows with the batch: bisect the largest one that fits
            mid = (lo + hi) // 2
            e = est(replace(setup, batch_size=mid))
            if e is not None and e.total_bytes <= budget_bytes:
                best, lo = (mid, e), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            # Prefer a divisor of the batch: gradient accumulation then keeps the effective batch exactly.
            b_any = best[0]
            b = max(d for d in range(1, b_any + 1) if setup.batch_size % d == 0)
            e = best[1] if b == b_any else est(replace(setup, batch_size=b))
            largest = f"; {b_any} is the largest that fits" if b != b_any else ""
            out.append(Change({"batch_size": b}, e,
                              f"micro-batch {setup.batch_size} -> {b} with gradient_accumulation_steps "
                              f"x{setup.batch_size // b} (the same effective batch{largest})"))
    if not setup.grad_ckpt:
        add({"grad_ckpt": True}, "gradient checkpointing on (recomputes the forward: ~30% slower)")
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
