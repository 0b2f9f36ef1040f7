"""The analytic memory model: a ``TrainSetup`` in, a named breakdown of peak device memory out.

Pure arithmetic on the architecture spec (no torch). Peak memory is the sum of what is alive at the worst
moment of one steady-state training step (step >= 2, so optimizer state exists). The step is modelled as
phases, and the breakdown of the phase with the largest total is reported, so components always sum to it:

- ``forward_end``:     weights + optimizer state + saved activations + logits and log-softmax
- ``backward_start``:  the loss gradient: fp32 grads of log-softmax and of the logits appear while the
                       saved log-softmax and all layer activations are still alive (the usual LoRA peak)
- ``backward``:        backpropagating through the last layer: all saved activations + gradient
                       temporaries of one layer + the dequantized weight of a 4/8-bit matmul
- ``backward_end``:    all gradients, one layer's activations (the full fine-tuning peak candidate)
- ``optimizer_step``:  all gradients + the optimizer's step temporaries

The terms come from ``weights`` (base weights), ``trainable`` (adapter, gradients, optimizer state),
``activations`` (activations, logits, transients) and ``runtime`` (CUDA context, allocator, cuBLAS);
docs/memory-model.md lists each with its formula and source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import activations as act
from .breakdown import COMPONENTS, PHASES, Estimate, ParamCounts
from .dtypes import DTYPE_BYTES
from .optimizers import resolve_optimizer
from .runtime import ALLOCATOR_OVERHEAD_FRACTION, CUBLAS_WORKSPACE_BYTES, cuda_context_bytes
from .setup import TrainSetup, resolve_setup
from .trainable import optimizer_state_bytes, pageable, trainable_tensors, trainable_totals
from .weights import load_dtype, static_terms

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

__all__ = ["Estimate", "ParamCounts", "estimate", "estimate_for", "COMPONENTS", "PHASES"]


def estimate(setup: TrainSetup, *, gpu: GPUSpec | str | None = None, profiles_dir=None) -> Estimate:
    """Resolve the setup's model (catalog name or local config) and card, then estimate."""
    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_name = gpu if gpu is not None else setup.gpu
    gpu_spec = load_gpu(gpu_name, profiles_dir=profiles_dir) if isinstance(gpu_name, str) else gpu_name
    return estimate_for(spec, resolve_setup(setup, spec, gpu_spec), gpu_spec)


def estimate_for(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None = None, *,
                 include_runtime: bool = True) -> Estimate:
    """Estimate an already resolved setup (see ``resolve_setup``). The search calls this in its loop.

    ``include_runtime=False`` leaves out what no tensor tracker sees (CUDA context, allocator overhead,
    cuBLAS workspace): the tensor-level peak that ``memplan simulate`` and the profiler's tracker measure.
    """
    opt = resolve_optimizer(setup.optimizer)
    tokens = setup.batch_size * setup.seq_len
    notes: list[str] = []

    # ---- static memory: weights, adapter, optimizer state --------------------------------------------
    static = static_terms(spec, setup)
    tensors = trainable_tensors(spec, setup)
    trainable, grad_bytes = trainable_totals(tensors)
    lora_param_bytes = trainable * DTYPE_BYTES[setup.adapter_dtype] if setup.trains_lora else 0
    opt_state_bytes = optimizer_state_bytes(opt, tensors)
    opt_temp_bytes = opt.foreach_temp_states * grad_bytes  # same size and dtype as one state (= the grads)
    paged_bytes = optimizer_state_bytes(opt, pageable(tensors)) if opt.paged else 0

    # ---- activations ---------------------------------------------------------------------------------
    layer = act.layer_activations(spec, setup)
    layer_bytes = layer.per_token * tokens + layer.per_token_seq * tokens * setup.seq_len
    extras = act.model_extras_per_token(spec, setup) * tokens
    ckpt_input_bytes = act.checkpoint_input_per_token(spec, setup) * tokens
    logits_fwd, logits_bwd = act.logits_bytes(spec, setup, tokens)
    bwd_transient = act.backward_transient_per_token(spec, setup) * tokens
    bwd_transient += act.backward_transient_per_token_seq(spec, setup) * tokens * setup.seq_len
    dequant = act.dequant_transient_bytes(spec, setup)
    L = spec.num_layers
    if setup.grad_ckpt:
        saved_all = L * ckpt_input_bytes + extras
        saved_in_backward = saved_all + layer_bytes  # the layer being recomputed
    else:
        saved_all = L * layer_bytes + extras
        saved_in_backward = saved_all
    # At the end of backward only the first layer's tensors remain (its checkpointed input, if any).
    one_layer = (ckpt_input_bytes if setup.grad_ckpt else 0) + layer_bytes + extras

    # Full fine-tuning: the lm_head / tied-embedding gradient is produced with the logits gradient.
    head_grad = 0
    if setup.method == "full":
        head_grad = spec.vocab_size * spec.hidden_size * DTYPE_BYTES[load_dtype(setup)]

    workspace = CUBLAS_WORKSPACE_BYTES if include_runtime else 0
    base = {
        "weights": static.weights,
        "quantized_weights": static.quantized,
        "quant_constants": static.quant_constants,
        "lora_params": lora_param_bytes,
        "optimizer_state": opt_state_bytes,
        "cuda_context": cuda_context_bytes(gpu) if include_runtime else 0,
    }
    phase_dynamic = {
        "forward_end": dict(activations=saved_all, logits_loss=logits_fwd, gradients=0,
                            transients=workspace),
        "backward_start": dict(activations=saved_all, logits_loss=logits_bwd, gradients=head_grad,
                               transients=workspace),
        "backward": dict(activations=saved_in_backward, logits_loss=0, gradients=head_grad,
                         transients=bwd_transient + dequant + workspace),
        "backward_end": dict(activations=one_layer, logits_loss=0, gradients=grad_bytes,
                             transients=bwd_transient + dequant + workspace),
        "optimizer_step": dict(activations=0, logits_loss=0, gradients=grad_bytes,
                               transients=opt_temp_bytes + workspace),
    }
    phases: dict[str, dict[str, int]] = {}
    for name, dyn in phase_dynamic.items():
        dynamic = sum(dyn.values())
        overhead = int(ALLOCATOR_OVERHEAD_FRACTION * dynamic) if include_runtime else 0
        comps = dict(base, **dyn, allocator_overhead=overhead)
        phases[name] = {c: int(comps[c]) for c in COMPONENTS}
    peak_phase = max(PHASES, key=lambda p: sum(phases[p].values()))
    components = phases[peak_phase]

    if setup.bits == 8:
        notes.append("int8 (LLM.int8) memory follows bitsandbytes' CUDA MatMul8bitLt path, not yet calibrated on a GPU")
    if opt.paged:
        notes.append(f"{opt.name} keeps {paged_bytes} bytes of state in CUDA managed memory (counted as resident)")
    if setup.attn == "eager" and setup.seq_len >= 1024:
        notes.append("eager attention keeps batch x heads x seq^2 score matrices per layer; sdpa does not")

    params = ParamCounts(total=spec.total_params(), trainable=trainable, quantized=static.quantized_values)
    return Estimate(setup=setup, total_bytes=sum(components.values()), components=components,
                    peak_phase=peak_phase, phases=phases, params=params, paged_bytes=paged_bytes,
                    notes=tuple(notes))
