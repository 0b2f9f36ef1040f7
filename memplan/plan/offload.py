"""Activation offloading (``--activation-offload``): the tensors saved for backward kept in host memory.

- ``pinned``: TRL ``SFTConfig(activation_offloading=True)``: ``get_act_offloading_ctx_manager(model)`` with its
  defaults (trl 1.16.0 models/activation_offloading.py: ``OffloadActivations(use_pin_memory=True,
  use_streams=True, min_offload_size=1024, max_fwd_stash_size=5)``), entered by ``SFTTrainer.training_step`` around
  forward, loss and backward. Host copies in pinned memory.
- ``pageable``: torch's ``torch.autograd.graph.save_on_cpu(pin_memory=False)`` (torch 2.13 autograd/graph.py) around
  the step: every saved tensor, parameters included, is copied to (pageable) host memory, and copied back at each
  unpack.

What stays on the card (``memplan.measure.offload_sim`` runs the same rules, and ``memplan simulate`` measures them):

- TRL never offloads parameters (nor views of their storage), tensors under 1,024 bytes, or what the lm_head saves
  (a ``NoOpManager`` around it), and it keeps on the card a storage saved a second time while its first copy is
  tracked: RMSNorm saves its fp32 input twice (``pow(2)`` and ``x * rsqrt``), so 4 B x hidden per token per norm
  stays; so does the input shared by several adapted projections (q/k/v, gate/up) when no cast or dropout makes a
  copy per adapter, and any input of several trainable linears in full fine-tuning. In backward the tensors of the
  node being run and of the previous one are on the card: a few tensors, left to the backward transients' margin.
- ``save_on_cpu`` keeps nothing of the layers on the card; backward brings back each node's tensors, a frozen
  weight among them (the largest float linear weight is counted as a backward transient).
- The loss' log-softmax is offloaded too, but TRL's forward stash keeps its device copy until backward starts,
  and ``save_on_cpu`` brings it back first thing: ``logits_loss`` does not change; the host holds its copy.
- Non-reentrant gradient checkpointing (transformers 5's default, ``use_reentrant=False``) packs a checkpointed
  layer's saved tensors with its own, innermost hooks, so only what is saved outside the layers is offloaded:
  the card saves next to nothing, the host holds the loss' copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .activations import residual_bytes
from .dtypes import DTYPE_BYTES
from .precision import autocast_bytes, autocast_weight_copies
from .trainable import adapted_linears
from .weights import all_linears, float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["ACTIVATION_OFFLOADS", "resolve_offload", "offload_phases", "kept_per_token",
           "reentrant_checkpointing"]

ACTIVATION_OFFLOADS = ("off", "pinned", "pageable")

# linears that read the same tensor (the norm output before attention / before the MLP)
_SHARED_INPUT_ROLES = (frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv"}),
                       frozenset({"mlp_up", "mlp_gate", "mlp_gate_up"}))


def resolve_offload(setup: TrainSetup, spec: ModelSpec) -> dict:
    value = setup.activation_offload or "off"
    if value not in ACTIVATION_OFFLOADS:
        raise InvalidSetupError(f"invalid activation offload {value!r}; allowed: {', '.join(ACTIVATION_OFFLOADS)}")
    return {"activation_offload": value}


def _norms_per_layer(spec: ModelSpec) -> int:
    n = sum(1 for p in spec.params if p.per_layer and p.kind == "norm" and p.name.endswith("weight"))
    return n or 2


def kept_per_token(spec: ModelSpec, step: TrainSetup) -> int:
    """Bytes per token per layer that TRL's offloading leaves on the card (module docstring)."""
    h = spec.hidden_size
    kept = _norms_per_layer(spec) * 4 * h if spec.norm_kind == "rmsnorm" else 0
    rb = residual_bytes(spec, step)
    if step.method == "full":
        roles = [lin.role for lin in spec.layer_linears]
        shared = sum(1 for group in _SHARED_INPUT_ROLES if sum(r in group for r in roles) >= 2)
    elif step.trains_lora and step.targets and step.lora_dropout == 0:
        # the adapters' compute dtype (autocast's, else theirs): a cast gives every adapter its own copy
        compute = autocast_bytes(step) or DTYPE_BYTES[step.adapter_dtype]
        roles = [lin.role for lin in adapted_linears(spec, step.targets) if lin.num_experts == 1]
        shared = (sum(1 for group in _SHARED_INPUT_ROLES if sum(r in group for r in roles) >= 2)
                  if compute == rb else 0)
    else:
        shared = 0
    return kept + shared * h * rb


def _saved_weight_bytes(spec: ModelSpec, step: TrainSetup) -> tuple[int, int]:
    """(all, largest) float linear weights ``linear`` saves for the input gradient (bitsandbytes' 4/8-bit matmuls
    keep theirs in ``ctx.tensors``, outside the saved-tensor hooks)."""
    wb = float_weight_bytes(step)
    sizes = [(lin.weight_numel * wb, n) for lin, n in all_linears(spec)
             if not (step.bits in (4, 8) and lin.quantized_by_bnb)]
    return sum(s * n for s, n in sizes), max((s for s, _ in sizes), default=0)


def reentrant_checkpointing(step: TrainSetup) -> bool:
    """peft's prepare_model_for_kbit_training passes no use_reentrant (torch 2.13 utils/checkpoint.py then takes
    True); transformers < 5 defaults to it (version rule checkpointing-reentrant)."""
    from .version_rules import applies
    from .versions import stack_of

    return (step.bits in (4, 8) and bool(step.upcast_non_quantized)) or applies("checkpointing-reentrant",
                                                                               stack_of(step.versions))


def offload_phases(spec: ModelSpec, step: TrainSetup, phase_dynamic: dict, *, layer_bytes: int, extras: int,
                   ckpt_input_bytes: int) -> tuple[dict, dict, tuple[str, ...]]:
    """``estimate_for``'s phase -> (activations, logits_loss, gradients, transients) with offloaded activations
    taken off the card; the host bytes by cause; notes."""
    mode = step.activation_offload or "off"
    if mode == "off":
        return phase_dynamic, {}, ()
    tokens = step.batch_size * step.seq_len
    lb = autocast_bytes(step) or float_weight_bytes(step)
    loss = step.loss or "default"
    # the loss' saved tensors, copied to the host: the fp32 log-softmax (default, chunked) or Liger's grad_input
    loss_host = tokens * spec.hidden_size * lb if loss == "liger" else tokens * spec.vocab_size * 4
    final_norm_host = tokens * spec.hidden_size * 4  # the final norm's fp32 input (its other saves are small)
    how = ("TRL activation_offloading (pinned host memory)" if mode == "pinned"
           else "torch save_on_cpu(pin_memory=False) (pageable host memory)")
    layers = spec.num_layers
    norm_dups = _norms_per_layer(spec) * 4 * spec.hidden_size * tokens if spec.norm_kind == "rmsnorm" else 0
    # what leaves the card of one layer's saved tensors when they pass through the hooks
    moved = max(0, layer_bytes - kept_per_token(spec, step) * tokens) if mode == "pinned" else layer_bytes
    layer_host = layer_bytes + (norm_dups if mode == "pageable" else 0)  # save_on_cpu copies each save
    weights_host, weights_back = _saved_weight_bytes(spec, step) if mode == "pageable" else (0, 0)
    loss_copies = 2 if mode == "pageable" and loss != "liger" else 1  # log_softmax and nll_loss both save it
    host = loss_copies * loss_host + final_norm_host
    if step.grad_ckpt:
        # torch.utils.checkpoint saves each layer's inputs through the outer hooks (non-reentrant: with
        # _NoopSaveInputs.apply, before it enters its own hooks; reentrant: ctx.save_for_backward): they are
        # offloaded. Non-reentrant keeps what the layer saves inside; reentrant recomputes the layer in backward
        # under the outer hooks, so the recomputed layer's saved tensors go out and come back too (after the host
        # peak: by then the later layers' inputs have left the host).
        reentrant = reentrant_checkpointing(step)
        # the host peak: at forward end, or (reentrant) while the last layer is recomputed and offloaded again
        host = max(host + layers * ckpt_input_bytes, (layers - 1) * ckpt_input_bytes + layer_host if reentrant else 0)
        head = 0
        if mode == "pageable":
            # the lm_head's weight, or under autocast the cast copy linear saves (TRL leaves the lm_head alone)
            head = autocast_weight_copies(spec, step)[1]
            host += head or spec.vocab_size * spec.hidden_size * float_weight_bytes(step)
        cut = {"forward_end": layers * ckpt_input_bytes + head, "backward_start": layers * ckpt_input_bytes + head,
               "backward": (layers - 1) * ckpt_input_bytes, "backward_end": moved if reentrant else 0}
    else:
        host += layers * layer_host + weights_host
        # in backward TRL has the tensors of the node being run and of the previous one back, save_on_cpu those of
        # the node being run: a few tensors, within the backward transients' margin (memplan simulate)
        cut = {"forward_end": layers * moved, "backward_start": layers * moved, "backward": layers * moved,
               "backward_end": moved}
    if step.method == "full":
        cut["backward_end"] = 0  # no layer's tensors are left then (memplan.plan.activations.full_backward_end)
    out = {}
    for name, (act, logits, grads, trans) in phase_dynamic.items():
        act = max(0, act - cut.get(name, 0))
        if name == "backward":
            trans += weights_back  # save_on_cpu brings a frozen weight back for its input gradient
        out[name] = (act, logits, grads, trans)
    what = "checkpointed inputs" if step.grad_ckpt else "saved tensors"
    note = (f"activation offload ({how}): {layers} layers' {what} live in host memory between forward and "
            f"backward, with the loss' saved tensors; each comes back to the card for its layer's backward (PCIe "
            f"traffic both ways every step)")
    return out, {"activation_offload": host}, (note,)
