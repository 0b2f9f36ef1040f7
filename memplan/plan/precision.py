"""What ``torch.autocast`` changes in a training step's memory (the ``autocast`` knob; docs/memory-model.md,
"Autocast"). The policy is CUDA's, torch 2.13.0 ``torch/include/ATen/autocast_mode.h:820-958``
(``memplan.measure.autocast`` runs it in simulations):

- matmul-like ops (``linear``, ``matmul``, ``mm``, ``bmm``, ``scaled_dot_product_attention``...) cast their
  floating inputs to the autocast dtype and return it. A cast input is a new tensor, and it is what autograd
  saves: a LoRA ``lora_A`` saves an autocast-dtype copy of its input, not peft's fp32 one; SDPA saves
  autocast-dtype q, k, v, so fp32 q/k/v (QLoRA's fp32 residual stream) take the flash kernel;
- a float weight whose dtype is not the autocast dtype (fp32 master weights; the fp32 lm_head, embeddings and
  FalconLinear layers after ``prepare_model_for_kbit_training``) is cast at every use, and ``linear`` saves the
  cast for the input gradient: one autocast-dtype copy of each such weight per use, alive until its backward
  (a trainable fp32 leaf, a LoRA factor, is cast once per forward, autocast's weight cache; saved all the same);
- the fp32 list (``layer_norm``, ``pow``, ``rsqrt``, ``exp``, the losses...) runs in fp32: a LayerNorm saves an
  fp32 copy of a 16-bit input; ``softmax`` / ``log_softmax`` / ``sum`` without a dtype run in fp32;
- bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` cast the output back to the input dtype (bitsandbytes/nn/
  modules.py), so k-bit projections keep the residual stream's dtype;
- everything else (add, mul, silu, dropout, embedding) runs in its inputs' (promoted) dtype: the residual stream
  keeps the dtype it had.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dtypes import DTYPE_BYTES
from .trainable import adapted_linears
from .weights import float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["autocast_bytes", "float_weights_dtype", "autocast_weight_copies", "regime_name", "REGIMES"]

# The precision regimes training scripts run in (README, "Precision"), in the order the reports list them.
REGIMES = ("16-bit, no autocast", "16-bit under autocast", "fp32, no autocast", "fp32 master weights under autocast",
           "k-bit prepared, no autocast", "k-bit prepared under autocast", "k-bit not prepared, no autocast",
           "k-bit not prepared under autocast")


def regime_name(bits: int, autocast: str | None, upcast: bool | None) -> str:
    """The regime (``REGIMES``) of a setup's weights' bits, autocast and k-bit upcast (``None``: the default)."""
    on = autocast not in (None, "off")
    if bits in (4, 8):
        prepared = "k-bit prepared" if upcast is not False else "k-bit not prepared"
        return f"{prepared} under autocast" if on else f"{prepared}, no autocast"
    if bits == 32:
        return "fp32 master weights under autocast" if on else "fp32, no autocast"
    return "16-bit under autocast" if on else "16-bit, no autocast"


def autocast_bytes(setup: TrainSetup) -> int:
    """Bytes per value of the autocast dtype; 0 without autocast."""
    return 0 if setup.autocast in (None, "off") else DTYPE_BYTES[setup.autocast]


def float_weights_dtype(setup: TrainSetup) -> str:
    """The dtype of the weights held in float (``weights.float_weight_bytes``): fp32 at 32 bits and after the
    k-bit upcast, else the compute dtype."""
    return "fp32" if float_weight_bytes(setup) == 4 else setup.dtype


def autocast_weight_copies(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int]:
    """(bytes per layer, bytes outside the layers): the autocast-dtype copies of float weights that ``linear``
    saves for the input gradient, when the weights' dtype is not the autocast dtype. Quantized linears are
    bitsandbytes' own matmuls (no cast). A tied lm_head is the embedding matrix used by ``linear``."""
    c = autocast_bytes(setup)
    if not c:
        return 0, 0
    per_layer = top = 0
    if float_weights_dtype(setup) != setup.autocast:
        kbit = setup.bits in (4, 8)
        per_layer = sum(lin.weight_numel for lin in spec.layer_linears if not (kbit and lin.quantized_by_bnb))
        top = sum(lin.weight_numel for lin in spec.top_linears if not (kbit and lin.quantized_by_bnb))
        top += sum(lin.weight_numel for lin in spec.tied_linears)
    if setup.method != "full" and setup.targets and setup.adapter_dtype != setup.autocast:
        # LoRA factors (fp32 leaves): cast once per forward, saved by lora_A / lora_B for the input gradient
        layer_names = {lin.name for lin in spec.layer_linears}
        for lin in adapted_linears(spec, setup.targets):
            n = (lin.lora_params(setup.rank) if lin.num_experts > 1
                 else setup.rank * (lin.in_features + lin.out_features)) * spec.instances(lin)
            if lin.name in layer_names:
                per_layer += -(-n // spec.num_layers)  # layer-restricted targets: a per-layer average
            else:
                top += n
    return per_layer * c, top * c
