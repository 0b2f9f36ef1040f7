"""One rank's memory under a data-parallel engine: the single-GPU step, re-divided the way the engine allocates.

``rank_phases`` takes what ``memplan.plan.estimate`` computes for one GPU (the static components and, per phase,
activations, logits, gradients and transients) and returns the rank's: what is sharded is divided, and the
engine's own buffers are added as ``comm_buffers``. Activations, logits and the loss stay per rank (each rank runs
its own micro-batch). docs/multi-gpu.md gives each rule with its source; ``memplan simulate`` runs the real
DDP and FSDP2 on fake tensors and checks them (benchmarks/validate_features.py).

- **DDP** (torch/nn/parallel/distributed.py, reducer.cpp ``initialize_buckets``): a full replica, plus gradient
  buckets the size of every trainable parameter (``gradient_as_bucket_view=False``, the default), allocated once
  as DDP wraps the model.
- **FSDP2** (``fully_shard`` per decoder layer, then the root; torch/distributed/fsdp/_fully_shard): every
  parameter is split on dim 0 into ``n`` padded shards, each its own allocation. A layer in flight holds its
  gathered parameters and the all-gather buffer they are copied out of (in forward the buffer is freed only at
  the next layer's copy-out; in backward at once, but the next layer's gather is prefetched): two layers. The
  root's parameters (embeddings, final norm, lm_head) stay gathered from forward through backward. Each layer's
  gradients are reduce-scattered from a copy that is freed at the next layer's reduce-scatter. ``grad-op`` keeps
  every layer gathered from its forward to its backward; ``hybrid`` shards within a node.
- **FSDP1** (``FullyShardedDataParallel``): one flat parameter per unit, gathered in place (one layer in
  forward, two in backward with BACKWARD_PRE prefetch). Not simulable here (memplan.measure.dist_sim).
- **DeepSpeed ZeRO**: ``memplan.plan.zero_memory``.

Quantization constants are not parameters: FSDP and ZeRO-3 leave them whole on every rank (QLoRA's 4-bit weights
are sharded through bitsandbytes' ``quant_storage``, their state stays with the module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.units import ceil_div, round_up

from .distributed import FSDP, ZERO, shard_count
from .runtime import CUDA_BLOCK_BYTES
from .shard_units import STATIC_SHARDED, fsdp_units
from .zero_memory import zero_phases

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["rank_phases"]

def rank_phases(spec: ModelSpec, setup: TrainSetup, base: dict, phases: dict, *, grad_bytes: int, head_grad: int,
                held: bool, state_bytes: int, layer_act: int, trainable_values: int) -> tuple[dict, dict, dict]:
    """The rank's static components, its per-phase (activations, logits, gradients, transients, comm) and its host
    bytes by cause, from the single-GPU ``base`` and ``phases`` (module docstring).

    ``grad_bytes``: every trainable parameter's gradient; ``head_grad``: the lm_head's, made at the start of
    backward (full fine-tuning); ``held``: gradients of earlier micro-batches are held (accumulation);
    ``layer_act``: what one layer saves for backward."""
    strategy = setup.strategy
    if strategy in ZERO:
        return zero_phases(spec, setup, base, phases, grad_bytes=grad_bytes, state_bytes=state_bytes,
                           trainable_values=trainable_values)
    if strategy == "ddp":
        bucket = round_up(grad_bytes, CUDA_BLOCK_BYTES)  # (LoRA: one or two buckets; the rounding is noise)
        return base, {p: v + (bucket,) for p, v in phases.items()}, {}
    if strategy not in FSDP:
        return base, {p: v + (0,) for p, v in phases.items()}, {}
    return _fsdp_phases(spec, setup, base, phases, grad_bytes=grad_bytes, head_grad=head_grad, held=held,
                        state_bytes=state_bytes, layer_act=layer_act)


def _fsdp_phases(spec, setup, base, phases, *, grad_bytes, head_grad, held, state_bytes, layer_act):
    n = shard_count(setup)
    u = fsdp_units(spec, setup)
    shards = u.sharded(n)
    rank_base = dict(base, **{c: 0 for c in STATIC_SHARDED})
    rank_base.update(shards)

    def share(b: int) -> int:
        return ceil_div(b, n)

    # gradients and optimizer state follow their parameters' shards (each its own allocation, rounded)
    trainable_r = shards.get("lora_params", 0) if setup.method != "full" else sum(shards.values())
    scale = trainable_r / grad_bytes if grad_bytes else 1 / n
    rank_base["optimizer_state"] = int(state_bytes * scale)
    layer, root = u.gathered("layer"), u.gathered("root")
    layer_flat, root_flat = u.flat("layer"), u.flat("root")
    if setup.strategy == "fsdp":  # FSDP1 gathers into the unit's own flat parameter: no second buffer
        layer_flat = root_flat = 0
    grads_r = int(grad_bytes * scale)
    held_r = grads_r if held else 0  # FSDP reduce-scatters every micro-batch into the sharded gradients
    # what stays gathered behind the layer in flight: every earlier layer under grad-op, none under full
    behind = (u.num_layers - 1) * layer if setup.fsdp_sharding == "grad-op" else 0
    act_f, logits_f, _, trans_f = phases["forward_end"]
    act_s, logits_s, _, trans_s = phases["backward_start"]
    act_b, logits_b, _, trans_b = phases["backward"]
    first_act = max(0, act_f - u.num_layers * layer_act)  # (before the first layer: the embeddings' output)
    moments = {
        "forward_end": [
            # the first layer's copy-out, the root's all-gather buffer still referenced
            (first_act, 0, held_r, 0, root + root_flat + layer_flat + layer),
            # the last layer's copy-out: the previous layer's buffer is freed only once it returns
            (act_f - layer_act, 0, held_r, 0, root + behind + 2 * layer_flat + layer),
            # the logits and loss, the last layer's buffer kept for the next copy-out
            (act_f, logits_f, held_r, trans_f, root + (behind + layer if behind else 0) + layer_flat)],
        "backward_start": [
            # the loss gradient through the logits, the last layer's gather prefetched
            # (the lm_head's gradient comes after the logits' ones are freed: memplan simulate, full fine-tuning)
            (act_s, logits_s, held_r, trans_s, root + behind + layer_flat
             if setup.fsdp_sharding != "grad-op" else root + u.num_layers * layer)],
        "backward": [
            # the layer in flight and the next one's gather
            (act_b, logits_b, held_r + head_grad, trans_b, root + (u.num_layers * layer if setup.fsdp_sharding ==
                                                                   "grad-op" else layer + max(layer, layer_flat)))],
        "backward_end": [phases["backward_end"][:2] + (grads_r, phases["backward_end"][3],
                                                       # the last reduce-scatter's copy: the root's gradients
                                                       # (full fine-tuning) or the first layer's
                                                       round_up(u.root_trainable or u.layer_trainable,
                                                                CUDA_BLOCK_BYTES))],
        "optimizer_step": [(0, 0, grads_r, share(phases["optimizer_step"][3]), 0)],
    }
    if setup.fsdp_sharding != "grad-op":
        # the root gathered again as backward starts (it resharded after forward): its buffer and its parameters,
        # beside what the loss saved (the log-softmax: a third of the loss tensors at backward start,
        # memplan.plan.stack_effects.logits_bytes)
        moments["backward_start"].append((act_s, logits_s // 3, held_r, 0, root + root_flat))
        if setup.method == "full" and u.num_layers > 1:
            # one layer further into backward: its activations gone, its gradients sharded, and its reduce-scatter
            # copy (a layer of gradients) alive until the next layer's reduce-scatter
            act, logits, grads, trans, comm = moments["backward"][0]
            moments["backward"].append((act - layer_act, logits, grads + share(u.layer_trainable), trans,
                                        comm + round_up(u.layer_trainable, CUDA_BLOCK_BYTES)))
    out = {p: max(cands, key=sum) for p, cands in moments.items()}
    host: dict[str, int] = {}
    if setup.offload == "params":
        # CPUOffload / CPUOffloadPolicy: the shards, their gradients and the optimizer step live in host memory
        host = {"parameters": sum(rank_base[c] for c in STATIC_SHARDED), "gradients": grads_r,
                "optimizer_state": rank_base["optimizer_state"]}
        for c in STATIC_SHARDED + ("optimizer_state",):
            rank_base[c] = 0
        out = {p: (a, lg, max(0, g - grads_r - held_r) if p in ("backward_end", "optimizer_step") else g - held_r,
                   0 if p == "optimizer_step" else t, c) for p, (a, lg, g, t, c) in out.items()}
    return rank_base, out, host
