"""What the library stack changes in an estimate: the rules of ``memplan.plan.versions`` that move a number.

The estimator calls these with a resolved setup, whose ``versions`` names the stack (``setup.versions``):

- ``layout_for``: the model's modules as that transformers builds them (rules "moe-experts-as-linears",
  "bnb-quantizes-linear-subclasses"; ``memplan.catalog.models.layouts``);
- ``default_adapter_dtype``: the dtype peft gives LoRA weights (rule "adapters-in-base-dtype");
- ``logits_bytes``: the logits and loss tensors per token (rules "logits-fp32-in-forward",
  "mistral-logits-fp32-in-forward", "loss-in-logits-dtype", "causal-lm-loss-shift-copy");
- ``int8_input_copies_per_token``: what older MatMul8bitLt saves beside each input (rule
  "int8-saves-transposed-input");
- ``experts_note``: what fused experts cost a transformers-5 user at 4/8 bits, and what transformers 4 would store;
- ``optimizer_loops_per_tensor``: whether the optimizer steps one parameter at a time (rule
  "optimizer-foreach-default", and transformers' own AdamW).

Rule "zero-grad-keeps-buffers" is applied by ``memplan.plan.trainable.gradients_held``.

The attention rules ("sdpa-repeats-kv", "sdpa-native-gqa") are applied by ``memplan.plan.attention.repeats_kv``.
"""

from __future__ import annotations

from dataclasses import replace

from typing import TYPE_CHECKING

from memplan.catalog.models.layouts import moe_as_linears, quantize_linear_subclasses
from memplan.units import format_bytes

from . import activations as act
from .precision import autocast_bytes
from .dtypes import DTYPE_BYTES
from .versions import OLDEST_MODELLED, applies, older_than_modelled, stack_of
from .weights import float_weight_bytes, static_terms

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup
    from .weights import StaticTerms

__all__ = ["layout_for", "default_adapter_dtype", "logits_regime", "logits_bytes", "int8_input_copies_per_token",
           "experts_note", "stack_caveats", "matmul4bit_inputs_per_token", "LOGITS_REGIMES",
           "optimizer_loops_per_tensor"]

_LAYOUTS: dict[tuple, ModelSpec] = {}


def layout_for(spec: ModelSpec, versions: str | None) -> ModelSpec:
    """``spec`` (transformers 5.23's layout, as the catalog builds it) as the stack's transformers builds it."""
    key = (spec, versions)
    hit = _LAYOUTS.get(key)
    if hit is None:
        stack = stack_of(versions)
        hit = spec
        if applies("moe-experts-as-linears", stack, spec.model_type):
            hit = moe_as_linears(hit)
        if applies("bnb-quantizes-linear-subclasses", stack, spec.model_type):
            hit = quantize_linear_subclasses(hit)
        if len(_LAYOUTS) > 1024:
            _LAYOUTS.clear()
        _LAYOUTS[key] = hit
    # equal specs can differ in raw config values memplan does not read (a traced sub-stack's layer_types), which
    # the model build does read: hand back this spec's own config, never the first equal spec's
    return hit if hit.config is spec.config else replace(hit, config=spec.config)


def default_adapter_dtype(bits: int, dtype: str, versions: str | None) -> str:
    """peft's LoRA weight dtype: fp32 from peft 0.12 (``autocast_adapter_dtype=True``); before it, the base
    layer's float dtype -- the compute dtype for 16-bit weights -- and fp32 on 4/8-bit layers (their packed
    weight is not a float) and on fp32 weights."""
    if bits == 16 and applies("adapters-in-base-dtype", stack_of(versions)):
        return dtype
    return "fp32"


# How the logits and the loss are held, by stack and architecture (per token x vocab, lb = the logits' bytes):
LOGITS_REGIMES = {
    "padded_labels": "ForCausalLMLoss, labels padded: lb logits + fp32 copy + fp32 log-softmax (transformers >= 4.49)",
    "shift_copy": "ForCausalLMLoss with logits[..., :-1, :].contiguous(): + one fp32 shifted copy (4.46 - 4.48)",
    "fp32_in_forward": "logits.float() in forward, then a shifted fp32 copy: 12 B (llama family < 4.46)",
    "logits_dtype": "CrossEntropyLoss on the shifted logits in their own dtype (OPT, GPT-2, ... < 4.48)",
    "masked_lm": "BERT's masked-LM loss in the logits' dtype (every version)",
}


def logits_regime(spec: ModelSpec, setup: TrainSetup) -> str:
    """Which of ``LOGITS_REGIMES`` the stack's transformers runs for ``spec``."""
    if not spec.is_causal_lm:
        return "masked_lm"
    stack, mt = stack_of(setup.versions), spec.model_type
    if applies("logits-fp32-in-forward", stack, mt) or applies("mistral-logits-fp32-in-forward", stack, mt):
        return "fp32_in_forward"
    if applies("loss-in-logits-dtype", stack, mt):
        return "logits_dtype"
    if applies("causal-lm-loss-shift-copy", stack, mt):
        return "shift_copy"
    return "padded_labels"


def logits_bytes(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int, int]:
    """(forward_end, shifted copy, backward_start) bytes per token of the logits and loss tensors on the setup's
    stack. The shifted copy, ``logits[..., :-1, :].contiguous()``, is a copy only for batches of more than one
    sequence: a batch of one is already contiguous after the slice, and ``contiguous()`` returns it (``memplan
    simulate`` on transformers 4.48.3, opt-125m: 10 B per token x vocab at batch 1). The estimate adds it to
    forward_end for batch > 1.

    - padded_labels / masked_lm: ``memplan.plan.activations.logits_bytes`` (transformers 5, measured);
    - shift_copy: the same plus the fp32 shifted copy alive while log_softmax runs (freed when the loss returns);
    - fp32_in_forward: the 16-bit lm_head output dies at ``logits = logits.float()``; the fp32 logits, the
      shifted fp32 copy and the log-softmax are alive at once: 8 B + the copy, whatever lb;
    - logits_dtype: the logits, their shifted copy and the log-softmax in lb, and at backward start the saved
      log-softmax and both loss gradients in lb; under autocast log_softmax runs with dtype=float32
      (``fp32_set_opt_dtype``, torch 2.13 ``autocast_mode.h``): an fp32 conversion of the shifted logits and an
      fp32 log-softmax, and fp32 gradients.

    In every regime backward starts with the saved log-softmax and the gradients of nll_loss and log_softmax
    (12 B in fp32); the slice backward of a shifted copy (a zero-filled fp32 tensor, then the grad of the
    upcast) comes after the log-softmax's saved output is freed, so it adds no peak. Gemma-2's soft-capping
    output (lb) is added in each regime as in transformers 5."""
    regime = logits_regime(spec, setup)
    if regime in ("padded_labels", "masked_lm"):
        fwd, bwd = act.logits_bytes(spec, setup, 1)
        return fwd, 0, bwd
    v = spec.vocab_size
    ac = autocast_bytes(setup)
    lb = ac or float_weight_bytes(setup)  # the lm_head's output dtype
    softcap = v * lb if spec.final_logit_softcapping else 0
    if regime == "fp32_in_forward":
        return v * 8 + softcap, v * 4, v * 12 + softcap
    if regime == "shift_copy":
        return v * (lb + (4 if lb < 4 else 0) + 4) + softcap, v * 4, v * 12 + softcap
    if ac:
        return v * (lb + 4 + 4) + softcap, v * lb, v * 12 + softcap
    return v * 2 * lb + softcap, v * lb, v * 3 * lb + softcap


def int8_input_copies_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per token per layer that bitsandbytes < 0.45's MatMul8bitLt saves beside each int8 layer's input:
    the int8 transposed copy ``CAt`` of the input (1 B per input feature, made by every layer for itself; routed
    experts see their tokens only). Its fp32 column scales ``SCAt`` (in_features x 4 B per layer, not per token)
    are left out: under 0.1 MiB per layer."""
    if setup.bits != 8 or not applies("int8-saves-transposed-input", stack_of(setup.versions)):
        return 0
    total = 0
    for lin in spec.layer_linears:
        if lin.quantized_by_bnb:
            routed = spec.num_experts_per_tok if lin.num_experts > 1 else 1
            total += routed * lin.in_features * spec.instances(lin) // spec.num_layers
    return total


def stack_caveats(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """What the estimate does not model on the setup's stack (measured: profiles/stacks/old_stack_checks.csv)."""
    stack = stack_of(setup.versions)
    out = []
    old = older_than_modelled(stack)
    if old:
        out.append(f"{', '.join(f'{p} {getattr(stack, p)}' for p in old)}: older than the releases memplan's version "
                   f"rules were read against ({', '.join(f'{p} {getattr(OLDEST_MODELLED, p)}' for p in old)}), "
                   f"planned with the oldest rules")
    if spec.model_type == "opt" and setup.attn == "eager" and stack.release("transformers") < (4, 46, 0):
        out.append(f"transformers {stack.transformers} runs OPT with its own eager OPTAttention (no SDPA before "
                   f"4.46), which this estimate does not model: it was 1.07-1.33x memplan simulate on 4.44.2 for "
                   f"opt-125m")
    return tuple(out)


def matmul4bit_inputs_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per token per layer that bitsandbytes < 0.43's MatMul4Bit saves: each 4-bit layer's input in the
    compute dtype (rule "matmul4bit-saves-input"). Linear4bit casts its input to the compute dtype first: where
    the residual stream is in another dtype (QLoRA's fp32 upcast) every layer saves its own cast; else it saves the
    input itself, which layers reading the same tensor share, counted once per distinct input no other op saves
    (as LLM.int8's MatMul8bitLt, ``memplan.plan.activations``: the normed attention and MLP inputs, the eager
    attention output, the MLP hidden activation when the activation saved its input)."""
    if setup.bits != 4 or not applies("matmul4bit-saves-input", stack_of(setup.versions)):
        return 0
    cb = DTYPE_BYTES[setup.dtype]
    if act.residual_bytes(spec, setup) != cb:
        return sum((spec.num_experts_per_tok if lin.num_experts > 1 else 1) * lin.in_features * cb
                   * spec.instances(lin) // spec.num_layers for lin in spec.layer_linears if lin.quantized_by_bnb)
    distinct = spec.hidden_size if spec.parallel_attn_mlp else 2 * spec.hidden_size
    if setup.attn == "eager":
        distinct += spec.num_attention_heads * spec.head_dim
    if spec.hidden_act != "relu":
        distinct += spec.intermediate_size
    return cb * distinct


def experts_note(spec: ModelSpec, setup: TrainSetup, static: StaticTerms) -> str | None:
    """At 4/8 bits on a stack that fuses MoE experts into 3-D parameters (transformers >= 5): what those experts
    cost, left in float (and upcast to fp32), and what the base weights would be on transformers 4, which
    quantizes them (rule "moe-experts-as-linears")."""
    if setup.bits not in (4, 8):
        return None
    fused = [lin for lin in spec.layer_linears if lin.role in ("experts_gate_up", "experts_down")]
    if not fused or any(lin.quantized_by_bnb for lin in fused):
        return None
    values = spec.num_layers * sum(lin.weight_numel for lin in fused)
    fb = float_weight_bytes(setup)
    held = "fp32 (prepare_model_for_kbit_training's upcast)" if setup.upcast_non_quantized else setup.dtype
    v4 = static_terms(moe_as_linears(spec), setup)
    here = static.weights + static.quantized + static.quant_constants
    there = v4.weights + v4.quantized + v4.quant_constants
    stack = stack_of(setup.versions)
    return (f"transformers {stack.transformers} fuses {spec.name}'s experts into 3-D parameters "
            f"(mlp.experts.gate_up_proj, down_proj) that bitsandbytes does not quantize: their {values:,} values "
            f"take {format_bytes(values * fb)} in {held}. Under transformers < 5 (one nn.Linear w1/w2/w3 per expert, "
            f"quantized) the base weights would be {format_bytes(there)} instead of {format_bytes(here)}, "
            f"{format_bytes(here - there)} less (--versions transformers=4.57.6 plans that stack)")


def optimizer_loops_per_tensor(opt, setup: TrainSetup) -> bool:
    """Whether ``opt`` steps one parameter tensor at a time (its temporaries: one tensor's): transformers' own
    AdamW always; a torch optimizer before torch 2.0, whose ``foreach`` defaulted to off (rule
    "optimizer-foreach-default")."""
    if opt.per_tensor_loop:
        return True
    return opt.backend == "torch" and opt.foreach_temp_states > 0 and applies(
        "optimizer-foreach-default", stack_of(setup.versions))
