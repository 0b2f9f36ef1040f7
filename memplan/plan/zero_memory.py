"""One rank's memory under DeepSpeed ZeRO (``zero1`` / ``zero2`` / ``zero3``), as the HF Trainer runs it.

The rules, each from DeepSpeed's source (docs/multi-gpu.md, "DeepSpeed ZeRO", cites file and function):

- With ``bf16`` (or ``fp16``) enabled the engine casts the whole module to that dtype (``engine.py``
  ``_configure_distributed_model``): LoRA's fp32 adapters train in bf16, and the optimizer keeps an fp32 master
  copy of this rank's partition of the trainable parameters (``stage_1_and_2.py``
  ``single_partition_of_fp32_groups``; ``stage3.py`` ``fp32_partitioned_groups_flat``). An fp32 run has no
  master copy. Optimizer state is kept for the partition only (1/n of it).
- ZeRO-1: every rank holds the full 16-bit gradients; at the step its partition is converted to fp32.
- ZeRO-2: gradients are reduced in buckets of ``reduce_bucket_size`` values (the Trainer's ``auto``:
  hidden_size^2) and each rank keeps its partition (``contiguous_gradients``).
- ZeRO-3: parameters too, frozen ones included, each rank holding 1/n of every tensor except those under
  ``stage3_param_persistence_threshold`` values (``auto``: 10 x hidden_size), kept whole; a layer's parameters
  are gathered for its forward and backward, with the next ones prefetched up to
  ``stage3_prefetch_bucket_size`` values (``auto``: 0.9 x hidden_size^2).
- ``offload``: ``optimizer`` keeps the fp32 master, the optimizer state, the fp32 gradient partition and the
  step on the host (pinned); ``params`` (ZeRO-3) the 16-bit parameter partitions too.

Quantization constants stay whole on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.units import ceil_div, round_up

from .distributed import world_size
from .dtypes import DTYPE_BYTES
from .runtime import CUDA_BLOCK_BYTES
from .shard_units import STATIC_SHARDED, fsdp_units

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["zero_phases", "reduce_bucket_values", "prefetch_bucket_values", "persistence_threshold"]


def reduce_bucket_values(spec: ModelSpec) -> int:
    """``reduce_bucket_size`` as the HF Trainer's ``auto`` fills it (transformers/integrations/deepspeed.py)."""
    return spec.hidden_size * spec.hidden_size


def prefetch_bucket_values(spec: ModelSpec) -> int:
    return int(0.9 * spec.hidden_size * spec.hidden_size)


def persistence_threshold(spec: ModelSpec) -> int:
    return 10 * spec.hidden_size


def zero_phases(spec: ModelSpec, setup: TrainSetup, base: dict, phases: dict, *, grad_bytes: int,
                state_bytes: int, trainable_values: int) -> tuple[dict, dict, dict]:
    """The rank's static components, per-phase (activations, logits, gradients, transients, comm) and host bytes
    (module docstring)."""
    n = world_size(setup)
    stage = int(setup.strategy[-1])
    half = setup.dtype in ("bf16", "fp16")
    hb = DTYPE_BYTES[setup.dtype] if half else 4  # the engine's parameter and gradient dtype
    part = ceil_div(trainable_values, n)  # this rank's partition of the trainable values
    rank_base = dict(base)
    # the engine casts the trainable parameters to its dtype (LoRA's fp32 adapters included)
    trainable_bytes = trainable_values * hb
    if setup.method != "full":
        rank_base["lora_params"] = trainable_bytes
    master = part * 4 if half else 0  # fp32 master partition
    # optimizer state of the partition, in fp32 (the state memplan sizes for the adapter dtype, rescaled)
    state_per_value = state_bytes / max(1, trainable_values * DTYPE_BYTES[setup.adapter_dtype]
                                        if setup.method != "full" else trainable_values * hb)
    state = int(state_per_value * (4 if setup.method != "full" else hb) * part) if state_bytes else 0
    rank_base["optimizer_state"] = master + state
    grads_full = trainable_values * hb
    grads_part = part * hb
    bucket = round_up(min(reduce_bucket_values(spec), trainable_values) * hb, CUDA_BLOCK_BYTES)
    step_grad = part * 4  # the partition's gradient in fp32 for the step
    comm = 0
    if stage == 3:
        u = fsdp_units(spec, setup)
        threshold = persistence_threshold(spec) * max(1, u.layer[0][0] // max(1, u.layer[0][0]))
        sharded = {}
        for tensors, mult in ((u.layer, u.num_layers), (u.root, 1)):
            for b, comp in tensors:
                values = b // (hb if comp != "quantized_weights" else 1)
                keep = b if values < persistence_threshold(spec) else round_up(ceil_div(b, n), CUDA_BLOCK_BYTES)
                sharded[comp] = sharded.get(comp, 0) + mult * keep
        del threshold
        for comp in STATIC_SHARDED:
            if comp != "lora_params" or setup.method == "full":
                rank_base[comp] = sharded.get(comp, 0)
        rank_base["lora_params"] = round_up(ceil_div(trainable_bytes, n), CUDA_BLOCK_BYTES) \
            if setup.method != "full" else rank_base["lora_params"]
        layer = u.gathered("layer")
        comm = max(2 * layer, layer + min(prefetch_bucket_values(spec) * hb, layer))
    grads_bwd = grads_full if stage == 1 else grads_part
    comm_bwd = comm + (bucket if stage >= 2 else 0)
    host: dict[str, int] = {}
    if setup.offload in ("optimizer", "params"):
        host = {"optimizer_state": rank_base["optimizer_state"], "gradients": step_grad}
        rank_base["optimizer_state"] = 0
        step_grad = 0
    if setup.offload == "params":
        host["parameters"] = sum(rank_base[c] for c in ("weights", "quantized_weights", "lora_params"))
        for c in ("weights", "quantized_weights", "lora_params"):
            rank_base[c] = 0
    out = {}
    for p, (act, logits, grads, trans) in phases.items():
        if p in ("forward_end",):
            out[p] = (act, logits, 0 if grads == 0 else grads_bwd, trans, comm)
        elif p in ("backward_start", "backward"):
            out[p] = (act, logits, grads_bwd if grads and grads >= grad_bytes else 0, trans, comm_bwd)
        elif p == "backward_end":
            out[p] = (act, logits, grads_bwd, trans, comm_bwd)
        else:  # the step: the fp32 partition gradient, the step's temporaries over the partition
            out[p] = (0, 0, grads_bwd + step_grad, ceil_div(trans, n) if setup.offload == "none" else 0, 0)
    return rank_base, out, host
