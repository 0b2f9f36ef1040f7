"""The analytic memory model: a ``TrainSetup`` in, a named breakdown of peak device memory out.

Pure arithmetic on the architecture spec (no torch). Peak memory is the sum of what is alive at the worst
moment of one steady-state training step (step >= 2, so optimizer state exists). The step is modelled as
phases, and the breakdown of the phase with the largest total is reported, so components always sum to it:

- ``forward_end``:     weights + optimizer state + saved activations + logits and log-softmax
- ``backward_start``:  the loss gradient: fp32 grads of log-softmax and of the logits appear while the
                       saved log-softmax and all layer activations are still alive (the usual LoRA peak)
- ``backward``:        backpropagating through the last layer: all saved activations + gradient
                       temporaries of one layer + the dequantized weight of a 4/8-bit matmul
- ``backward_end``:    all gradients; LoRA: one layer's activations; full fine-tuning: the last gradient's
                       addends (a tied lm_head's and the embedding's: the full fine-tuning peak candidate)
- ``optimizer_step``:  all gradients + the optimizer's step temporaries

The terms come from ``weights`` (base weights), ``trainable`` (adapter, gradients, optimizer state),
``activations`` (activations, logits, transients) and ``runtime`` (CUDA context, allocator, cuBLAS);
docs/memory-model.md lists each with its formula and source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memplan.units import format_bytes

from . import activations as act
from .adapters import (LORAFA_STEP_TEMPS, dora_forward_transient_bytes, dora_saved_bytes, frozen_adapter_bytes,
                       saved_head_grad_bytes, tied_token_rows_saved)
from .breakdown import COMPONENTS, PHASES, Estimate, ParamCounts
from .derived import derived_dynamic
from .dtypes import DTYPE_BYTES
from .loss import loss_bytes, loss_notes
from .offload import offload_phases
from .optimizers import resolve_optimizer
from .rank_memory import rank_phases
from .precision import autocast_bytes, autocast_weight_copies
from .runtime import ALLOCATOR_OVERHEAD_FRACTION, CUBLAS_WORKSPACE_BYTES, cuda_context_bytes
from .seq_shapes import sequence_shape, step_setup
from .setup import TrainSetup, resolve_setup
from .stack_effects import (experts_note, int8_input_copies_per_token, layout_for, matmul4bit_inputs_per_token,
                            optimizer_loops_per_tensor,
                            stack_caveats)
from .stack_effects import logits_bytes as stack_logits_bytes
from .trainable import BNB_MIN_8BIT_SIZE, BNB_MIN_PAGED_SIZE, gradients_held, trainable
from .weights import kbit_weights_note, load_dtype, static_terms
from .zero_memory import zero3_keeps_4bit_weights

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

__all__ = ["Estimate", "ParamCounts", "estimate", "estimate_for", "with_phases", "COMPONENTS", "PHASES"]


def estimate(setup: TrainSetup, *, gpu: GPUSpec | str | None = None, profiles_dir=None) -> Estimate:
    """Resolve the setup's model (catalog name or local config) and card, then estimate."""
    from memplan.catalog.gpus import as_gpu
    from memplan.catalog.models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_name = gpu if gpu is not None else setup.gpu
    gpu_spec = as_gpu(gpu_name, profiles_dir=profiles_dir)
    resolved = resolve_setup(setup, spec, gpu_spec)
    return with_phases(spec, estimate_for(spec, resolved, gpu_spec))


def with_phases(spec: ModelSpec, e: Estimate) -> Estimate:
    """``e`` with what one training step's estimate leaves out: the initialisation's own peak on each of its paths
    (memplan.plan.init_phase) and the batch shape of a packed step or a lengths file (memplan.plan.seq_shapes)."""
    s = e.setup
    shape = sequence_shape(s) if (s.packing != "off" or s.seq_len_file) else None
    if s.init in (None, "default"):
        return replace(e, shape=shape)
    from .init_phase import init_paths

    return replace(e, init_phase=tuple(init_paths(spec, s)), shape=shape)


def estimate_for(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None = None, *,
                 include_runtime: bool = True) -> Estimate:
    """Estimate an already resolved setup (see ``resolve_setup``). The search calls this in its loop.

    ``include_runtime=False`` leaves out what no tensor tracker sees (CUDA context, allocator overhead,
    cuBLAS workspace): the tensor-level peak that ``memplan simulate`` and the profiler's tracker measure.
    """
    spec = layout_for(spec, setup.versions)  # the modules the setup's transformers builds (memplan.plan.versions)
    f = _fixed(spec, setup)
    base = dict(f.base, cuda_context=cuda_context_bytes(gpu) if include_runtime else 0)
    # the rows and row length of the step's largest batch (packing, padding-free, a dataset's lengths)
    step = setup if setup.packing == "off" and not setup.seq_len_file else step_setup(spec, setup)
    tokens = step.batch_size * step.seq_len
    layer_bytes = f.layer_per_token * tokens + f.layer_per_token_seq * tokens * step.seq_len + f.layer_weight_copies
    extras = f.extras_per_token * tokens + act.model_mask_bytes(spec, step) + f.top_weight_copies - f.first_layer_exempt
    ckpt_input_bytes = f.ckpt_per_token * tokens
    bwd_transient = f.bwd_per_token * tokens + f.bwd_per_token_seq * tokens * step.seq_len + f.dequant
    # In backward the top-level modules' saved weight casts (an autocast lm_head's) are gone: the lm_head's backward
    # runs before any layer's.
    if setup.grad_ckpt:
        saved_all = spec.num_layers * ckpt_input_bytes + extras
        # + the layer being recomputed, less its input where the recomputed layer saves that very tensor
        saved_in_backward = saved_all + layer_bytes - f.ckpt_shared_per_token * tokens - f.top_weight_copies
    else:
        saved_all = spec.num_layers * layer_bytes + extras
        saved_in_backward = saved_all - f.top_weight_copies
    # backward_end does not depend on checkpointing (docs/memory-model.md, "Phases"). LoRA: at most the first
    # layer's tensors remain (its recompute is done; an upper bound, never the LoRA peak). Full fine-tuning: no
    # layer's, but the last gradient's addends (act.full_backward_end).
    if setup.method == "full":
        end_activations = f.end_act_per_token * tokens
        end_transient = f.end_transient + f.end_transient_per_token * tokens
    else:
        end_activations, end_transient = layer_bytes + extras, bwd_transient

    ws = CUBLAS_WORKSPACE_BYTES if include_runtime else 0
    shift = f.logits_shift_per_token if step.batch_size > 1 else 0  # a copy only past one sequence (stack_effects)
    held = gradients_held(setup)
    if held:
        # The gradients of the earlier micro-batches are held through this one's forward and backward; each new
        # gradient is added in place (AccumulateGrad: ``variable.grad += new_grad``), so during backward the new
        # one is a transient, at most the lm_head's (docs/memory-model.md, "Gradient accumulation").
        grads_fwd, grads_bwd, new_grad = f.grad_bytes, f.grad_bytes, f.head_grad
    else:
        grads_fwd, grads_bwd, new_grad = 0, f.head_grad, 0
    # the loss over the logits (--loss: memplan.plan.loss), at forward end and at the start of backward
    logits_fwd, logits_bwd = (f.logits_fwd_per_token + shift) * tokens, f.logits_bwd_per_token * tokens
    if setup.loss != "default":
        logits_fwd, logits_bwd = loss_bytes(spec, step, logits_fwd, logits_bwd)
    # DoRA's weight-norm transient (memplan.plan.adapters) peaks inside the last layer's forward, before the
    # logits exist; under checkpointing it recurs as each layer is recomputed in backward
    # logits exist; under checkpointing it recurs as each layer is recomputed in backward. Either way the top-level
    # modules' saved weight casts (the lm_head's) are not alive at that moment.
    fwd_end = (saved_all, logits_fwd, grads_fwd, ws)
    if f.adapter_fwd_transient - f.top_weight_copies > logits_fwd:
        fwd_end = (saved_all - f.top_weight_copies + f.adapter_fwd_transient, 0, grads_fwd, ws)  # (activations)
    if setup.grad_ckpt:  # (q/k/v's norms come before the recomputed layer saves anything)
        bwd_transient = max(bwd_transient, f.adapter_later_transient,
                            f.adapter_first_transient - (layer_bytes - f.ckpt_shared_per_token * tokens))
    phase_dynamic = {
        "forward_end": fwd_end,
        "backward_start": (saved_all, logits_bwd, grads_bwd, ws),
        "backward": (saved_in_backward, 0, grads_bwd + (0 if held else f.saved_head_grad),
                     bwd_transient + new_grad + ws),
        "backward_end": (end_activations, 0, f.grad_bytes, end_transient + ws),
        "optimizer_step": (0, 0, f.grad_bytes, f.opt_temp_bytes + ws),
    }
    notes = f.notes
    if spec.derived:  # no hand-written formula: the terms traced for this regime (memplan.plan.derived)
        phase_dynamic, derived_note = derived_dynamic(spec, step, phase_dynamic, ws=ws, grad_bytes=f.grad_bytes,
                                                      new_grad=f.head_grad, held=held)
        notes += (derived_note,)
    # activations kept in host memory (--activation-offload: memplan.plan.offload)
    host_bytes: dict[str, int] = {}
    if setup.activation_offload != "off":
        phase_dynamic, host_bytes, offload_notes = offload_phases(
            spec, step, phase_dynamic, layer_bytes=layer_bytes, extras=extras, ckpt_input_bytes=ckpt_input_bytes)
        notes += offload_notes
    if setup.loss != "default":
        notes += loss_notes(spec, step)
    if setup.strategy in (None, "single"):
        rank_dynamic = {p: v + (0,) for p, v in phase_dynamic.items()}
    else:  # one rank of several (memplan.plan.rank_memory): what the engine shards, and its buffers
        base, rank_dynamic, rank_host = rank_phases(
            spec, setup, base, phase_dynamic, grad_bytes=f.grad_bytes, head_grad=f.head_grad, held=held,
            state_bytes=base["optimizer_state"], layer_act=ckpt_input_bytes if setup.grad_ckpt else layer_bytes,
            trainable_values=f.params.trainable)
        host_bytes.update(rank_host)
        if zero3_keeps_4bit_weights(setup):
            notes += ("ZeRO-3 over 4-bit weights: each layer's gathered 4-bit weights stay on the rank from its "
                      "forward to its backward (bitsandbytes keeps them; DeepSpeed frees a parameter by dropping its "
                      "own reference), the whole model's by the start of backward; FSDP2 frees them",)
    phases: dict[str, dict[str, int]] = {}
    for name, (activations, logits, gradients, transients, comm) in rank_dynamic.items():
        dynamic = activations + logits + gradients + transients + comm
        overhead = int(ALLOCATOR_OVERHEAD_FRACTION * dynamic) if include_runtime else 0
        comps = dict(base, gradients=gradients, activations=activations, logits_loss=logits, transients=transients,
                     comm_buffers=comm, allocator_overhead=overhead)
        phases[name] = {c: comps[c] for c in COMPONENTS}
    totals = {p: sum(c.values()) for p, c in phases.items()}
    peak_phase = max(PHASES, key=totals.__getitem__)

    if setup.attn == "eager" and step.seq_len >= 1024:
        notes += ("eager attention keeps batch x heads x seq^2 score matrices per layer; sdpa does not",)
    return Estimate(setup=setup, total_bytes=totals[peak_phase], components=phases[peak_phase],
                    peak_phase=peak_phase, phases=phases, params=f.params, paged_bytes=f.paged_bytes, notes=notes,
                    host_bytes=host_bytes)


@dataclass(frozen=True)
class _Fixed:
    """What an estimate does not owe to the batch and the sequence: static memory, and the per-token
    coefficients of everything that grows with them."""

    base: dict  # weights, quantized_weights, quant_constants, lora_params, optimizer_state
    grad_bytes: int
    opt_temp_bytes: int
    paged_bytes: int
    head_grad: int
    saved_head_grad: int  # a modules_to_save lm_head copy's gradient, made once backward has passed the lm_head
    dequant: int
    layer_per_token: int
    layer_per_token_seq: int
    extras_per_token: int
    layer_weight_copies: int  # autocast casts of float weights saved for backward (memplan.plan.precision)
    top_weight_copies: int
    first_layer_exempt: int  # what the first layer does not save when its input needs no grad (DoRA's weight copies)
    ckpt_per_token: int
    ckpt_shared_per_token: int
    logits_fwd_per_token: int
    logits_bwd_per_token: int
    logits_shift_per_token: int  # older transformers' shifted logits copy (batch > 1), memplan.plan.stack_effects
    bwd_per_token: int
    bwd_per_token_seq: int
    end_act_per_token: int  # full fine-tuning at backward_end (act.full_backward_end)
    end_transient: int
    end_transient_per_token: int
    adapter_fwd_transient: int  # DoRA's weight norm, one module at a time (memplan.plan.adapters)
    adapter_first_transient: int  # the same, of the modules reading the layer input (recomputed before the rest)
    adapter_later_transient: int  # ... and of the other modules
    params: ParamCounts
    notes: tuple[str, ...]


_FIXED: dict[tuple, _Fixed] = {}
_FIXED_MAX = 4096  # distinct setups kept (the search uses ~50 per model and card)


def _fixed(spec: ModelSpec, setup: TrainSetup) -> _Fixed:
    """``_compute_fixed``, memoized on everything but the batch and sequence (the search varies those most:
    bisecting the batch and the longest sequence re-estimates the same setup dozens of times)."""
    key = (spec, setup.method, setup.bits, setup.quant_type, setup.double_quant, setup.dtype, setup.rank,
           setup.targets, setup.lora_dropout, setup.adapter_dtype, setup.optimizer, setup.attn,
           setup.upcast_non_quantized, setup.autocast, act.sdpa_mask_materialised(spec, setup), setup.versions,
           setup.adapter, setup.modules_to_save, setup.trainable_tokens, setup.loss, setup.packing,
           setup.activation_offload, act.frozen_linears_save_inputs(spec, setup),
           act.zero3_linear(setup),
           setup.grad_ckpt if setup.adapter == "dora" else None)  # (DoRA's first layer saves all under checkpointing)
    hit = _FIXED.get(key)
    if hit is None:
        if len(_FIXED) >= _FIXED_MAX:
            _FIXED.clear()
        hit = _FIXED[key] = _compute_fixed(spec, setup)
    return hit


def _compute_fixed(spec: ModelSpec, setup: TrainSetup) -> _Fixed:
    opt = resolve_optimizer(setup.optimizer)
    # ---- static memory: weights, adapter, optimizer state
    static = static_terms(spec, setup)
    train = trainable(spec, setup)
    grad_bytes = train.grad_bytes
    paged_bytes = train.paged_state_bytes(opt)
    base = {
        # + what an adapter adds frozen: LoRA-FA's A, the trainable tokens' original rows (memplan.plan.adapters)
        "weights": static.weights + frozen_adapter_bytes(spec, setup),
        "quantized_weights": static.quantized,
        "quant_constants": static.quant_constants,
        "lora_params": train.grad_bytes if setup.trains_lora else 0,  # (a gradient is its parameter's size)
        "optimizer_state": train.state_bytes(opt),
    }
    # ---- what grows with the tokens (memplan.plan.activations)
    layer = act.layer_activations(spec, setup)
    logits_fwd, logits_shift, logits_bwd = stack_logits_bytes(spec, setup)  # per token, as the stack's loss does
    # Full fine-tuning: the lm_head / tied-embedding gradient is produced with the logits gradient.
    head_grad = spec.vocab_size * spec.hidden_size * DTYPE_BYTES[load_dtype(setup)] if setup.method == "full" else 0
    end_act, end_transient, end_transient_per_token = act.full_backward_end(spec, setup)
    copies = autocast_weight_copies(spec, setup)
    dora_layer, dora_exempt = dora_saved_bytes(spec, setup, autocast_bytes(setup))
    tied_per_token, tied_fixed = tied_token_rows_saved(spec, setup, autocast_bytes(setup))

    notes: list[str] = []
    weights_note = kbit_weights_note(spec, setup, static)
    if weights_note:
        notes.append(weights_note)
    moe_note = experts_note(spec, setup, static)  # transformers 5's fused experts, left float (memplan.plan.versions)
    if moe_note:
        notes.append(moe_note)
    notes += stack_caveats(spec, setup)
    small, tensors, small_state = train.fp32_state_tensors(opt)
    if small and setup.trains_lora:
        # Real (bitsandbytes optim/optimizer.py: ``p.numel() < min_8bit_size`` -> 32-bit state): why the total
        # can fall as the rank grows (tests/plan/test_properties.py).
        notes.append(f"{opt.name} keeps 32-bit state for {small:,} of the {tensors:,} adapter tensors, those under "
                     f"bitsandbytes' min_8bit_size of {BNB_MIN_8BIT_SIZE:,} values: {format_bytes(small_state)} of "
                     f"the {format_bytes(base['optimizer_state'])} optimizer state, about 4x their 8-bit size, so "
                     f"a larger rank can need less memory")
    if act.sdpa_mask_materialised(spec, setup) and spec.sliding_window and setup.seq_len >= spec.sliding_window:
        # Real (simulate: mistral-7b QLoRA, checkpointing, 4095 -> 4096 tokens: 13,736 -> 9,345 MiB); the
        # property tests allow the drop only with this note.
        drop = (", which saves no seq x seq probabilities: this sequence can need less memory than one just below "
                "the window" if act.attention_kernel(spec, replace(setup, seq_len=1)) == "math" else "")
        notes.append(f"at {spec.sliding_window:,} tokens and more (the sliding window) transformers gives SDPA an "
                     f"explicit mask: k/v are repeated to every head and the memory-efficient kernel runs{drop}")
    if setup.bits == 8:
        notes.append("int8 (LLM.int8) memory follows bitsandbytes' CUDA MatMul8bitLt path, not yet calibrated on a GPU")
    if opt.paged:
        if paged_bytes:
            notes.append(f"{opt.name} keeps {format_bytes(paged_bytes)} of its state in CUDA managed memory, "
                         f"counted here as resident on the card")
        else:
            notes.append(f"{opt.name} pages nothing here: bitsandbytes pages the state of tensors of at least "
                         f"{BNB_MIN_PAGED_SIZE:,} values, and every trainable tensor is smaller")
    return _Fixed(
        base=base, grad_bytes=grad_bytes,
        # same size and dtype as one state (= the grads): every tensor's at once with foreach, one tensor's in a
        # per-parameter loop (memplan.plan.stack_effects.optimizer_loops_per_tensor)
        opt_temp_bytes=(LORAFA_STEP_TEMPS * train.largest_grad_bytes if setup.adapter == "lora-fa" else
                        opt.foreach_temp_states * (train.largest_grad_bytes if optimizer_loops_per_tensor(opt, setup)
                                                   else grad_bytes)),
        paged_bytes=paged_bytes, head_grad=head_grad, saved_head_grad=saved_head_grad_bytes(spec, setup),
        dequant=act.dequant_transient_bytes(spec, setup),
        layer_per_token=layer.per_token + int8_input_copies_per_token(spec, setup)
        + matmul4bit_inputs_per_token(spec, setup),
        layer_per_token_seq=layer.per_token_seq,
        extras_per_token=act.model_extras_per_token(spec, setup) + tied_per_token,
        layer_weight_copies=copies[0] + dora_layer, top_weight_copies=copies[1] + tied_fixed,
        first_layer_exempt=dora_exempt,
        ckpt_per_token=act.checkpoint_input_per_token(spec, setup),
        ckpt_shared_per_token=act.checkpoint_input_shared_per_token(spec, setup),
        logits_fwd_per_token=logits_fwd, logits_bwd_per_token=logits_bwd, logits_shift_per_token=logits_shift,
        bwd_per_token=act.backward_transient_per_token(spec, setup),
        bwd_per_token_seq=act.backward_transient_per_token_seq(spec, setup),
        end_act_per_token=end_act, end_transient=end_transient, end_transient_per_token=end_transient_per_token,
        adapter_fwd_transient=dora_forward_transient_bytes(spec, setup, autocast_bytes(setup)),
        adapter_first_transient=dora_forward_transient_bytes(spec, setup, autocast_bytes(setup), first_in_layer=True),
        adapter_later_transient=dora_forward_transient_bytes(spec, setup, autocast_bytes(setup), first_in_layer=False),
        params=ParamCounts(total=spec.total_params(), trainable=train.values, quantized=static.quantized_values),
        notes=tuple(notes),
    )
