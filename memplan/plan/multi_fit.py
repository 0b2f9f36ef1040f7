"""``memplan fit`` over several cards: which engines the search tries, how it orders them, and ``--gpus auto``, the
fewest cards of a kind on which the model trains.

On one GPU the search is unchanged (no engine, nothing offloaded) unless ``--strategy`` is given (ZeRO-3 with
offload on one card is a real recipe). On several, it tries every engine with every offload the engine has
(``SEARCH_STRATEGIES`` x ``OFFLOADS``; ``resolve_setup`` refuses the pairs an engine does not offer). A plan that
keeps nothing in host memory ranks first (offloading moves every parameter or optimizer step over PCIe each
step), then the engine that communicates least: DDP (one all-reduce of the gradients), ZeRO-1, ZeRO-2, FSDP2,
ZeRO-3 (which gather every layer's parameters twice per step).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .distributed import OFFLOADS

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

    from .fit_result import FitResult
    from .setup import TrainSetup

__all__ = ["SEARCH_STRATEGIES", "GPUS_PER_NODE", "MAX_AUTO_GPUS", "search_engines", "searchable_engine",
           "engine_rank", "gpu_counts",
           "split_gpus", "fit_fewest_gpus"]

SEARCH_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp2", "zero3")  # least communication first (module docstring)
GPUS_PER_NODE = 8  # a node of the common servers (DGX / HGX: 8 cards); beyond it, whole nodes of 8
MAX_AUTO_GPUS = 512


def search_engines(setup: TrainSetup, pinned: frozenset[str]) -> list[tuple[str | None, str]]:
    """The (strategy, offload) pairs the search tries for ``setup``."""
    world = setup.gpus * setup.nodes if isinstance(setup.gpus, int) and isinstance(setup.nodes, int) else 1
    if world == 1 and "strategy" not in pinned:
        return [(setup.strategy, setup.offload)]
    strategies = (setup.strategy,) if "strategy" in pinned else SEARCH_STRATEGIES
    offloads = (setup.offload,) if "offload" in pinned else OFFLOADS
    return [(s, o) for s in strategies for o in offloads]


def searchable_engine(strategy: str | None, bits: int, pinned: frozenset[str]) -> bool:
    """Whether the search may pick ``strategy`` at ``bits`` unasked. Not ZeRO-3 over 4-bit weights: every layer's
    gathered 4-bit weights stay on the rank until backward (bitsandbytes keeps them; memplan.plan.zero_memory), so
    it never needs fewer cards than FSDP2 over the same weights, and it needs ``bnb_4bit_quant_storage`` set;
    ``--strategy zero3`` plans it."""
    return not (strategy == "zero3" and bits == 4 and "strategy" not in pinned)


def engine_rank(setup: TrainSetup) -> int:
    """Larger is better: the engine that communicates least (``SEARCH_STRATEGIES`` order), 0 for one GPU."""
    if setup.strategy in SEARCH_STRATEGIES:
        return -SEARCH_STRATEGIES.index(setup.strategy)
    return 0 if setup.strategy in (None, "single") else -len(SEARCH_STRATEGIES)  # (FSDP1: only when pinned)


def gpu_counts(limit: int = MAX_AUTO_GPUS) -> list[int]:
    """The card counts ``--gpus auto`` tries: 1 to 8 on one node, then whole nodes of 8."""
    counts = list(range(1, GPUS_PER_NODE + 1))
    n = 2 * GPUS_PER_NODE
    while n <= limit:
        counts.append(n)
        n += GPUS_PER_NODE
    return counts


def split_gpus(count: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for ``count`` cards."""
    return (count, 1) if count <= GPUS_PER_NODE else (GPUS_PER_NODE, count // GPUS_PER_NODE)


def _could_fit(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec, budget, pinned: frozenset[str]) -> bool:
    """Whether the leanest plan the search could pick fits ``budget`` (a quick test before a whole search): 4-bit
    (unless bits or the method are pinned), rank 8, checkpointing, a paged 8-bit optimizer, batch 1, each engine
    with its deepest offload."""
    from .estimate import estimate_for
    from .setup import resolve_setup

    lean = {"bits": 4, "method": "qlora", "rank": 8, "grad_ckpt": True, "optimizer": "paged_adamw_8bit",
            "batch_size": 1}
    if {"bits", "method"} & pinned:
        lean.pop("bits"), lean.pop("method")
    lean = {k: v for k, v in lean.items() if k not in pinned}
    for strategy, offload in search_engines(setup, pinned):
        if not searchable_engine(strategy, lean.get("bits", setup.bits or 16), pinned):
            continue
        for off in (offload,) if "offload" in pinned else ("params", "optimizer", "none"):
            try:
                resolved = resolve_setup(replace(setup, strategy=strategy, offload=off, **lean), spec, gpu)
            except InvalidSetupError:
                continue
            if budget.fits(estimate_for(spec, resolved, gpu).total_bytes):
                return True
    return False


def fit_fewest_gpus(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec, *, pinned: frozenset[str], search,
                    budget, limit: int = MAX_AUTO_GPUS) -> tuple[FitResult, list[int]]:
    """The search at the fewest cards of ``gpu`` on which a plan fits (``gpu_counts`` in order), and the counts
    tried before it. ``search(setup, pinned)`` is the one-count search (``memplan.plan.search``). When none up to
    ``limit`` fits, the search at ``limit``."""
    tried: list[int] = []
    pinned = pinned - {"gpus", "nodes"}
    counts = gpu_counts(limit)
    for count in counts:
        gpus, nodes = split_gpus(count)
        at = replace(setup, gpus=gpus, nodes=nodes)
        if count == counts[-1] or _could_fit(spec, at, gpu, budget, pinned | {"gpus", "nodes"}):
            result = search(at, pinned | {"gpus", "nodes"})
            if result.recommended is not None or count == counts[-1]:
                return result, tried
        tried.append(count)
    raise AssertionError("unreachable: the last count returns")
