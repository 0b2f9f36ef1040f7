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
  ``stage3_param_persistence_threshold`` values (``auto``: 10 x hidden_size), kept whole; after the first
  step has recorded the module trace, the prefetcher keeps ``max_live_parameters`` values gathered (1e9, or the
  whole model when smaller), fetching ``stage3_prefetch_bucket_size`` values (``auto``: 0.9 x hidden_size^2) ahead
  of every submodule; every frozen linear over 16-bit weights saves its input (memplan.plan.activations
  ``frozen_linears_save_inputs``, for ``nn.Linear`` projections).
- ``offload``: ``optimizer`` keeps the fp32 master, the optimizer state, the fp32 gradient partition and the
  step on the host (pinned); ``params`` (ZeRO-3) the 16-bit parameter partitions too.

Quantization constants stay whole on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.units import ceil_div, round_up

from .distributed import world_size
from .dtypes import DTYPE_BYTES
from .offload import reentrant_checkpointing
from .runtime import CUDA_BLOCK_BYTES
from .shard_units import fsdp_units
from .weights import float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["zero_phases", "zero3_keeps_4bit_weights", "four_bit_storage", "reduce_bucket_values",
           "prefetch_bucket_values", "persistence_threshold"]


def reduce_bucket_values(spec: ModelSpec) -> int:
    """``reduce_bucket_size`` as the HF Trainer's ``auto`` fills it (transformers/integrations/deepspeed.py)."""
    return spec.hidden_size * spec.hidden_size


def prefetch_bucket_values(spec: ModelSpec) -> int:
    """``stage3_prefetch_bucket_size``, ``auto``: 0.9 x hidden_size^2."""
    return int(0.9 * spec.hidden_size * spec.hidden_size)


def persistence_threshold(spec: ModelSpec) -> int:
    """``stage3_param_persistence_threshold``, ``auto``: 10 x hidden_size values."""
    return 10 * spec.hidden_size


# DeepSpeed's defaults the Trainer does not fill (deepspeed 0.19.8 runtime/zero/config.py:245, 251): the
# prefetcher gathers up to this many values (max_live_parameters); max_reuse_distance (also 1e9) keeps reused ones
# within the same budget.
MAX_LIVE_VALUES = 1_000_000_000
# ... and ZeRO-3's optimizer steps the partition in sub-groups of at most this many values (sub_group_size,
# runtime/zero/config.py:182; stage3.py:2683 _prepare_fp32_grad_for_sub_group).
SUB_GROUP_VALUES = 1_000_000_000


def zero3_keeps_4bit_weights(setup: TrainSetup) -> bool:
    """Whether ZeRO-3 leaves every layer's gathered 4-bit weights on the rank from its forward to its backward:
    bitsandbytes' MatMul4Bit keeps the weight in ctx.tensors (not save_for_backward) whenever its input needs a
    gradient (bitsandbytes 0.50.2 autograd/_functions.py:358), and DeepSpeed releases a parameter by dropping its
    own reference (deepspeed 0.19.8 runtime/zero/partition_parameters.py:314 ``free_param``), so the storage
    lives on (FSDP2 resizes the storage to 0 instead). Not under reentrant
    checkpointing, whose forward runs without a graph (memplan.plan.offload ``reentrant_checkpointing``)."""
    return setup.strategy == "zero3" and setup.bits == 4 and not (setup.grad_ckpt and reentrant_checkpointing(setup))


def four_bit_storage(setup: TrainSetup) -> str:
    """The dtype 4-bit weights are packed in (bitsandbytes' ``quant_storage``): ``uint8``, its default, or the
    model's 16-bit dtype under ZeRO-3, as peft's DeepSpeed guide sets ``bnb_4bit_quant_storage`` so that DeepSpeed
    partitions them like every other parameter (same bytes, half the elements; memplan.measure.quantize builds
    them so)."""
    return setup.dtype if setup.strategy == "zero3" and setup.dtype in ("bf16", "fp16") else "uint8"


def _tensors(spec: ModelSpec, setup: TrainSetup, hb: int) -> tuple[list, list]:
    """Every parameter tensor of the layer and of the root as (values, bytes in the engine's dtype, component,
    trainable): the engine casts every float parameter to its dtype; packed 4-bit weights keep their bytes, in
    elements of their storage dtype (``four_bit_storage``), which is what DeepSpeed counts."""
    u = fsdp_units(spec, setup)
    fb, ab = float_weight_bytes(setup), DTYPE_BYTES[setup.adapter_dtype]
    storage = four_bit_storage(setup)
    packed = DTYPE_BYTES[storage] if storage != "uint8" else 1  # (bytes per storage element)

    def conv(items):
        out = []
        for b, comp in items:
            if comp == "quantized_weights":
                out.append((b // packed, b, comp, False))
            else:
                values = b // (ab if comp == "lora_params" else fb)
                out.append((values, values * hb, comp, comp == "lora_params" or setup.method == "full"))
        return out

    return conv(u.layer), conv(u.root)


def zero_phases(spec: ModelSpec, setup: TrainSetup, base: dict, phases: dict, *, grad_bytes: int,
                state_bytes: int, trainable_values: int) -> tuple[dict, dict, dict]:
    """The rank's static components, per-phase (activations, logits, gradients, transients, comm) and host bytes
    (module docstring; docs/multi-gpu.md has each buffer with its DeepSpeed source line)."""
    n = world_size(setup)
    stage = int(setup.strategy[-1])
    hb = DTYPE_BYTES[setup.dtype] if setup.dtype in ("bf16", "fp16") else 4  # the engine's dtype
    layer, root = _tensors(spec, setup, hb)
    L = spec.num_layers
    p_values = trainable_values
    # optimizer state per trainable value, in fp32 (memplan's optimizer model: 8 B for Adam)
    own_bytes = grad_bytes / max(1, p_values)  # (bytes per value of memplan's trainable dtype)
    state_per_value = state_bytes / max(1, p_values) * (4 / own_bytes if own_bytes else 1)
    R = reduce_bucket_values(spec)
    biggest = max((v for v, _, _, t in layer + root if t), default=0)
    rank = dict(base)
    host: dict[str, int] = {}

    def blk(b: float) -> int:
        return round_up(int(b), CUDA_BLOCK_BYTES)

    if stage in (1, 2):
        p_pad = ceil_div(p_values, 2 * n) * 2 * n  # flatten_dense_tensors_aligned (alignment 2 x n)
        part = p_pad // n
        frozen = sum(blk(b) * (L if i < len(layer) else 1) for i, (_, b, c, t) in enumerate(layer + root)
                     if not t and c == "weights")
        flat = blk(p_pad * hb)  # bit16_groups_flat: every trainable parameter, on every rank
        rank["weights"] = frozen + (flat if setup.method == "full" else 0)
        rank["lora_params"] = flat if setup.method != "full" else 0
        master_state = blk(part * 4) + blk(part * 4) * round(state_per_value / 4)
        grads_bwd = p_values * hb if stage == 1 else part * hb  # ZeRO-1 keeps the autograd gradients
        comm_bwd = blk(R * hb) + blk(min(p_values, R + biggest) * hb)  # the bucket and its flattened copy
        comm_in_bwd = dict.fromkeys(("backward_start", "backward", "backward_end"), comm_bwd)
        step_grads = part * hb + (part * 4 if hb != 4 else 0)
        comm_fwd = 0  # (outside backward, only the offload's staging buffer)
        if setup.offload == "optimizer":
            host = {"optimizer_state": master_state, "gradients": part * 4, "parameters": part * hb + biggest * hb}
            rank["optimizer_state"] = 0
            comm_fwd = blk(biggest * hb)  # temp_grad_buffer_for_gpu_offload, kept
            comm_bwd += comm_fwd
            step_grads = 0
        else:
            rank["optimizer_state"] = master_state
    else:
        threshold = persistence_threshold(spec)
        parts: dict[str, int] = {}
        p_part = 0
        for items, mult in ((layer, L), (root, 1)):
            for values, b, comp, trains in items:
                shard = blk(ceil_div(b, n)) + (blk(b) if values <= threshold else 0)  # (+ persistent: whole)
                key = "quantized_weights" if comp == "quantized_weights" else \
                    ("lora_params" if comp == "lora_params" else "weights")
                parts[key] = parts.get(key, 0) + mult * shard
                p_part += mult * ceil_div(values, n) if trains else 0
        for comp in ("weights", "quantized_weights", "lora_params"):
            rank[comp] = parts.get(comp, 0)
        master_state = blk(p_part * 4) * (1 + round(state_per_value / 4))
        grads_bwd = blk(p_part * hb)  # grad_partitions_flat_buffer, kept
        bucket = blk(R * hb)  # allocated at init, kept
        # gathered in flight: once the first step has recorded the module trace, the prefetcher fetches ahead of
        # every submodule (stage3_prefetch_bucket_size values at a time, at least one parameter) until
        # max_live_parameters values are gathered, and the parameters reused within max_reuse_distance stay
        # (partitioned_param_coordinator.py fetch_sub_module, __params_to_release). A decoder layer has several
        # submodules per large weight (norms, dropouts, peft's wrappers), so the prefetch outruns the layers and
        # max_live_parameters values are gathered from the first layers through backward (Llama-2-7B, ZeRO-3:
        # 1.03e9 at the end of forward, memplan simulate), or the whole model when it is smaller.
        big_root = sum(blk(b) for v, b, c, _ in root if v > threshold)
        gathered = L * sum(blk(b) for v, b, _, _ in layer if v > threshold) + big_root
        gathered_values = sum(v * L for v, _, _, _ in layer if v > threshold) + \
            sum(v for v, _, _, _ in root if v > threshold)
        in_flight = gathered if gathered_values <= MAX_LIVE_VALUES else blk(MAX_LIVE_VALUES * hb)
        # 4-bit weights gathered for a layer's forward outlive their release (zero3_keeps_4bit_weights): at the end
        # of forward every layer's are there once, with the lm_head; in backward, beyond max_live_parameters, the
        # prefetcher (whose count was given back) gathers its window again on top of them. A smaller model is
        # never gathered twice.
        retained = 0 if gathered_values <= MAX_LIVE_VALUES or not zero3_keeps_4bit_weights(setup) else \
            L * sum(blk(b) for v, b, c, _ in layer if c == "quantized_weights" and v > threshold)
        head = big_root if spec.tie_word_embeddings else big_root // 2  # the lm_head (the embedding's twin)
        at_turn = max(in_flight, retained + head) if retained else in_flight  # (forward end, start of backward)
        rs_copy = blk(min(p_part * n, R) * hb)  # reduce-scatter's interleaved copy of the bucket
        comm_fwd = bucket + at_turn
        comm_in_bwd = {"backward_start": bucket + at_turn + rs_copy,
                       "backward": bucket + in_flight + rs_copy + retained,
                       "backward_end": bucket + in_flight + rs_copy}
        # The step runs sub-group by sub-group (sub_group_size values; stage3.py _prepare_fp32_grad_for_sub_group):
        # the sub-group's gradients flattened (a 16-bit copy, gone once cast) and cast to fp32, kept as the master's
        # .grad while the optimizer steps it (its temporaries in fp32 over that sub-group), then released.
        sub = min(p_part, SUB_GROUP_VALUES)
        fp32_sub, cast_copy = blk(sub * 4), (blk(sub * hb) if hb != 4 else 0)
        sub_temps = int(fp32_sub * (phases["optimizer_step"][3] / max(1, grad_bytes)))  # (param-sized temporaries)
        step_grads, step_temps = (fp32_sub + cast_copy, 0) if cast_copy > sub_temps else (fp32_sub, sub_temps)
        rank["optimizer_state"] = master_state
        if setup.offload in ("optimizer", "params"):
            host = {"optimizer_state": master_state, "gradients": p_part * 4 + grads_bwd}
            rank["optimizer_state"], grads_bwd, step_grads = 0, 0, 0
        if setup.offload == "params":
            moved = blk(p_part * hb) + sum(mult * blk(ceil_div(b, n)) for items, mult in ((layer, L), (root, 1))
                                           for v, b, c, t in items if not t and v > threshold)
            host["parameters"] = moved
            rank["weights"] = max(0, rank["weights"] + rank["quantized_weights"] + rank["lora_params"] - moved)
            rank["quantized_weights"] = rank["lora_params"] = 0
    out = {}
    for p, (act, logits, grads, trans) in phases.items():
        if p == "optimizer_step":
            temps = 0 if setup.offload != "none" else step_temps if stage == 3 else ceil_div(trans, n)
            # (kept: ZeRO-3's bucket; ZeRO-1/2 with offload, the device staging buffer of the largest gradient)
            out[p] = (0, 0, (grads_bwd if stage == 3 else 0) + step_grads, temps, bucket if stage == 3 else comm_fwd)
        elif p == "forward_end":
            out[p] = (act, logits, grads_bwd if stage == 3 else 0, trans, comm_fwd)
        else:
            out[p] = (act, logits, grads_bwd if (stage == 3 or p == "backward_end" or stage == 1) else
                      (part * hb if p != "backward_start" else 0), trans, comm_in_bwd[p])
    return rank, out, host
