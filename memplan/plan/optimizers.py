"""Optimizer catalog: Hugging Face ``TrainingArguments.optim`` names (plus plain ``adam``/``adamw``/``sgd``)
mapped to how much state they keep per trainable value and where it lives.

Sources:
- torch optimizers (``torch/optim/{adam,adamw,sgd,rmsprop,adagrad}.py``): state tensors are created with
  ``torch.zeros_like(p, memory_format=torch.preserve_format)``, i.e. in the *parameter's* dtype.
  The foreach implementation (the default on CUDA) makes one temporary list the size of the state in the
  step: ``_multi_tensor_adam`` computes ``exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)``;
  ``_multi_tensor_rmsprop`` computes ``avg = torch._foreach_sqrt(grouped_square_avgs)``;
  ``_multi_tensor_adagrad`` computes ``std = torch._foreach_sqrt(device_state_sums)``. The fused variant
  (``adamw_torch_fused``) makes none.
- bitsandbytes 0.50 (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state`` /
  ``Optimizer1State.init_state``): 32-bit states are
  fp32 whatever the parameter dtype; 8-bit states are uint8 plus one fp32 absmax per 256-value block
  (blockwise quantization), and a tensor with fewer than ``min_8bit_size = 4096`` values keeps 32-bit state.
  Paged variants allocate state with ``F.get_paged`` (CUDA managed memory): NVML sees it, torch's caching
  allocator does not, and it pages to host RAM under pressure instead of failing. Kernels are fused: no
  step temporaries. Checked on CPU by ``tests/measure/test_profile.py`` (8-bit state is smaller) and by
  ``memplan simulate`` (docs/memory-model.md, "Optimizer state").
- transformers ``Adafactor`` (``transformers/optimization.py``): factored second moment for >= 2-D
  parameters (one row vector + one column vector), a full one for 1-D, no first moment by default
  (``beta1=None``), in the gradient's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import InvalidSetupError, suggestion_suffix

__all__ = ["OptimizerSpec", "resolve_optimizer", "OPTIMIZERS", "optimizer_names"]


@dataclass(frozen=True)
class OptimizerSpec:
    """How an optimizer stores state."""

    name: str  # canonical HF-style name
    states: int  # state tensors per parameter tensor (Adam 2, RMSprop/SGD-momentum 1, SGD 0)
    state_bits: int  # 32: fp32 (bnb) or parameter dtype (torch, see ``state_in_param_dtype``); 8: bnb 8-bit
    state_in_param_dtype: bool  # torch optimizers keep state in the parameter's dtype
    paged: bool  # bnb paged: state in CUDA managed memory
    foreach_temp_states: int  # temporaries of one state's size made during ``step()`` (torch foreach)
    factored: bool = False  # Adafactor
    backend: str = "torch"  # "torch" | "bitsandbytes" | "transformers"
    # One parameter at a time (no foreach): its step temporaries are one tensor's, not every tensor's at once.
    per_tensor_loop: bool = False


def _torch(name: str, states: int, temps: int) -> OptimizerSpec:
    return OptimizerSpec(name, states, 32, True, False, temps)


def _bnb(name: str, states: int, bits: int, paged: bool) -> OptimizerSpec:
    return OptimizerSpec(name, states, bits, False, paged, 0, backend="bitsandbytes")


# Canonical entries. Lion keeps one state (exp_avg); RMSprop in bnb keeps one.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        _torch("adamw_torch", 2, 1),
        _torch("adam_torch", 2, 1),
        OptimizerSpec("adamw_torch_fused", 2, 32, True, False, 0),
        _torch("sgd", 0, 0),
        _torch("sgd_momentum", 1, 0),
        _torch("rmsprop", 1, 1),
        _torch("rmsprop_momentum", 2, 1),
        _torch("rmsprop_centered", 2, 1),
        _torch("adagrad", 1, 1),
        OptimizerSpec("adafactor", 1, 32, True, False, 0, factored=True, backend="transformers"),
        # transformers' own AdamW (TrainingArguments optim "adamw_hf": the Trainer's default in transformers
        # 4.26.1 training_args.py:899-900, adamw_torch by 4.36.2 training_args.py:1090; 4.26.1 optimization.py
        # AdamW.step:336-362): a Python loop over the parameters, whose ``exp_avg_sq.sqrt().add_(eps)`` is one
        # temporary of the parameter's size at a time.
        OptimizerSpec("adamw_hf", 2, 32, True, False, 1, backend="transformers", per_tensor_loop=True),
        _bnb("adamw_bnb_8bit", 2, 8, False),
        _bnb("adamw_bnb_32bit", 2, 32, False),
        _bnb("paged_adamw_8bit", 2, 8, True),
        _bnb("paged_adamw_32bit", 2, 32, True),
        _bnb("lion_8bit", 1, 8, False),
        _bnb("lion_32bit", 1, 32, False),
        _bnb("paged_lion_8bit", 1, 8, True),
        _bnb("paged_lion_32bit", 1, 32, True),
        _bnb("rmsprop_bnb_8bit", 1, 8, False),
        _bnb("rmsprop_bnb_32bit", 1, 32, False),
    )
}

# HF TrainingArguments.optim spellings and common short names -> canonical.
_ALIASES = {
    "adamw": "adamw_torch",
    "adam": "adam_torch",
    "torch_adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "adam8bit": "adamw_bnb_8bit",
    "adamw8bit": "adamw_bnb_8bit",
    "bnb_adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw": "paged_adamw_32bit",
    "paged_adamw8bit": "paged_adamw_8bit",
    "paged_adamw32bit": "paged_adamw_32bit",
    "paged_lion": "paged_lion_32bit",
    "rmsprop_bnb": "rmsprop_bnb_32bit",
    "sgd_nesterov": "sgd_momentum",
}


def optimizer_names() -> list[str]:
    """Every accepted name, canonical first."""
    return sorted(OPTIMIZERS) + sorted(_ALIASES)


def resolve_optimizer(name: str) -> OptimizerSpec:
    """Canonical spec for an HF ``optim`` name; ``InvalidSetupError`` naming the allowed ones otherwise."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    raise InvalidSetupError(
        f"unknown optimizer {name!r}{suggestion_suffix(name, optimizer_names())}; "
        f"allowed: {', '.join(sorted(OPTIMIZERS))} (and HF aliases such as adamw, adam, adamw_8bit, paged_adamw)"
    )
