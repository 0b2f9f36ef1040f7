"""Several GPUs: the knobs of a data-parallel run and the rules that check them.

A multi-GPU setup is one rank's: ``gpus`` per node times ``nodes`` processes, each with its own micro-batch, and
an engine that decides what each rank holds (docs/multi-gpu.md):

- ``ddp``: torch DistributedDataParallel, every rank a full replica plus gradient buckets;
- ``fsdp`` / ``fsdp2``: torch FSDP1 (``FullyShardedDataParallel``) / FSDP2 (``fully_shard``), one unit per
  decoder layer; ``fsdp_sharding`` ``full`` (FULL_SHARD), ``grad-op`` (SHARD_GRAD_OP: gathered parameters kept
  from forward to backward) or ``hybrid`` (HYBRID_SHARD: sharded within a node, replicated across nodes);
- ``zero1`` / ``zero2`` / ``zero3``: DeepSpeed ZeRO, which partitions optimizer state, + gradients, + parameters;
- ``single``: one process on one GPU (the default for one GPU).

``offload`` is what the engine keeps in host memory: ``optimizer`` (DeepSpeed ``offload_optimizer``: the fp32
master weights, optimizer state and the step run on the CPU), ``params`` (FSDP ``CPUOffload(offload_params=True)``
or DeepSpeed ZeRO-3 ``offload_param`` with ``offload_optimizer``: parameters, gradients and optimizer state).

This module is pure: the per-rank arithmetic lives in ``memplan.plan.rank_memory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["STRATEGIES", "FSDP_SHARDINGS", "OFFLOADS", "MAX_GPUS", "resolve_distributed", "world_size",
           "shard_count", "describe_distributed", "FSDP", "ZERO"]

STRATEGIES = ("single", "ddp", "fsdp", "fsdp2", "zero1", "zero2", "zero3")
FSDP = ("fsdp", "fsdp2")
ZERO = ("zero1", "zero2", "zero3")
FSDP_SHARDINGS = ("full", "grad-op", "hybrid")
OFFLOADS = ("none", "optimizer", "params")
MAX_GPUS = 4096  # per node times nodes: a bound on typos, beyond the largest published runs

# What each engine can keep in host memory (module docstring).
_OFFLOADS_OF = {"single": ("none",), "ddp": ("none",), "fsdp": ("none", "params"), "fsdp2": ("none", "params"),
                "zero1": ("none", "optimizer"), "zero2": ("none", "optimizer"),
                "zero3": ("none", "optimizer", "params")}
_NAMES = {"single": "one GPU", "ddp": "DDP", "fsdp": "FSDP", "fsdp2": "FSDP2", "zero1": "ZeRO-1",
          "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


def world_size(setup: TrainSetup) -> int:
    """How many ranks (processes, one GPU each) the run has."""
    return setup.gpus * setup.nodes


def shard_count(setup: TrainSetup) -> int:
    """Over how many ranks each sharded tensor is split: all of them, or one node's under hybrid sharding."""
    if setup.strategy in FSDP and setup.fsdp_sharding == "hybrid":
        return setup.gpus
    return world_size(setup)


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidSetupError(f"invalid {name} {value!r}; must be an integer >= 1")


def resolve_distributed(setup: TrainSetup, spec: ModelSpec, *, bits: int) -> dict:
    """The resolved ``strategy``, ``fsdp_sharding`` and ``offload`` of ``setup`` (module docstring)."""
    _check_count("gpus", setup.gpus)
    _check_count("nodes", setup.nodes)
    world = world_size(setup)
    if world > MAX_GPUS:
        raise InvalidSetupError(f"invalid GPU count {world:,} ({setup.gpus} per node x {setup.nodes} nodes); "
                                f"memplan plans up to {MAX_GPUS:,}")
    strategy = setup.strategy or ("single" if world == 1 else "ddp")
    if strategy not in STRATEGIES:
        from difflib import get_close_matches

        close = get_close_matches(str(strategy), STRATEGIES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InvalidSetupError(f"invalid strategy {strategy!r}{hint}; allowed: {', '.join(STRATEGIES)}")
    if strategy == "single" and world > 1:
        raise InvalidSetupError(f"strategy single runs one process on one GPU, not {world}; use ddp, fsdp, fsdp2, "
                                f"zero1, zero2 or zero3")
    sharding = setup.fsdp_sharding
    if strategy in FSDP:
        sharding = sharding or "full"
        if sharding not in FSDP_SHARDINGS:
            raise InvalidSetupError(f"invalid fsdp sharding {sharding!r}; allowed: {', '.join(FSDP_SHARDINGS)}")
        if sharding == "hybrid" and setup.nodes < 2:
            raise InvalidSetupError("hybrid sharding shards within a node and replicates across nodes: it needs "
                                    "--nodes 2 or more (on one node use full)")
    elif sharding is not None:
        raise InvalidSetupError(f"--fsdp-sharding {sharding} applies to --strategy fsdp or fsdp2, not {strategy}")
    offload = setup.offload
    if offload not in OFFLOADS:
        raise InvalidSetupError(f"invalid offload {offload!r}; allowed: {', '.join(OFFLOADS)}")
    if offload not in _OFFLOADS_OF[strategy]:
        allowed = ", ".join(_OFFLOADS_OF[strategy])
        why = {"fsdp": "FSDP's CPUOffload moves parameters, gradients and the optimizer step together",
               "fsdp2": "FSDP's CPUOffloadPolicy moves parameters, gradients and the optimizer step together",
               "zero1": "DeepSpeed offloads parameters at ZeRO-3 only", "zero2": "DeepSpeed offloads parameters at "
               "ZeRO-3 only"}.get(strategy, f"{_NAMES[strategy]} keeps everything on the GPU")
        raise InvalidSetupError(f"--offload {offload} is not an option of {_NAMES[strategy]} ({why}); allowed: "
                                f"{allowed}")
    if bits == 8 and (strategy in FSDP or strategy == "zero3"):
        raise InvalidSetupError(f"{_NAMES[strategy]} cannot shard LLM.int8 weights (bitsandbytes' quant_storage, "
                                f"which makes 4-bit weights shardable, has no 8-bit form); use 4 or 16 bits, or "
                                f"ddp / zero1 / zero2")
    return {"strategy": strategy, "fsdp_sharding": sharding, "offload": offload}


def describe_distributed(setup: TrainSetup) -> str:
    """``2 GPUs, FSDP2 full shard, parameters offloaded``; '' on one GPU without an engine."""
    if setup.strategy in (None, "single"):
        return ""
    world = world_size(setup)
    where = f"{world} GPUs" + (f" ({setup.gpus} x {setup.nodes} nodes)" if setup.nodes > 1 else "")
    if world == 1:
        where = "1 GPU"
    engine = _NAMES[setup.strategy]
    if setup.strategy in FSDP:
        engine += f" {setup.fsdp_sharding} shard" if setup.fsdp_sharding != "grad-op" else " grad-op shard"
    if setup.offload != "none":
        engine += f", {setup.offload} offloaded"
    return f"{where}, {engine}"
