"""The frozen base weights: float, packed 4-bit / int8, and the quantization constants beside them.

One owner of two facts the rest of memplan relies on:

- ``load_dtype`` / ``float_weight_bytes``: the dtype the base model is loaded in, and the dtype of every
  weight held in float after loading (the non-quantized part at 4/8 bits: embeddings, norms, lm_head). The
  residual stream and the logits take that dtype too (the embedding's output, the lm_head's matmul), which is
  why ``memplan.plan.activations`` asks here.
- bitsandbytes' 4-bit storage layout (``NF4_BLOCK`` ...), which ``memplan.measure.quantize`` also uses to
  build fake quantization states of the same sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.units import ceil_div, format_bytes, round_up

from .dtypes import DTYPE_BYTES
from .runtime import CUDA_BLOCK_BYTES

if TYPE_CHECKING:
    from memplan.catalog.models import LinearSpec, ModelSpec

    from .setup import TrainSetup

__all__ = ["StaticTerms", "static_terms", "all_linears", "load_dtype", "float_weight_bytes", "kbit_weights_note",
           "NF4_BLOCK", "DQ_BLOCK", "NF4_CODE_VALUES", "DQ_CODE_VALUES"]

# bitsandbytes 0.50 4-bit (bitsandbytes/functional.py quantize_4bit): blocks of 64 values, one absmax per
# block (fp32; with double quant: uint8, plus one fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32
# offset), and a 16-entry fp32 code per layer. That is 0.5625 B/param without double quant and, with it,
# 0.5 + 1/64 + 4/(64*256) = 0.515869 B/param plus the per-layer codes (0.5161 for a 2048x2048 weight, 0.5159
# for OPT-13B's layers): docs/memory-model.md, "Quantized weights"; tests/plan/test_estimate.py.
NF4_BLOCK = 64
DQ_BLOCK = 256
NF4_CODE_VALUES = 16
DQ_CODE_VALUES = 256


@dataclass(frozen=True)
class StaticTerms:
    """Bytes of the frozen base weights, by component, and how many values are stored quantized."""

    weights: int  # float weights
    quantized: int  # packed 4-bit / int8 values
    quant_constants: int
    quantized_values: int


def load_dtype(setup: TrainSetup) -> str:
    """The dtype the base model is loaded in (``from_pretrained(dtype=...)``): fp32 at 32 bits, else the
    compute dtype."""
    return "fp32" if setup.bits == 32 else setup.dtype


def float_weight_bytes(setup: TrainSetup) -> int:
    """Bytes per value of every weight held in float after loading: fp32 at 32 bits, and at 4/8 bits after
    ``prepare_model_for_kbit_training`` (peft/utils/other.py casts every fp16/bf16 parameter that is not a
    bitsandbytes one to fp32); else the compute dtype (transformers loads with ``dtype=``)."""
    return 4 if (setup.upcast_non_quantized or setup.bits == 32) else DTYPE_BYTES[setup.dtype]


def all_linears(spec: ModelSpec) -> list[tuple[LinearSpec, int]]:
    """Every linear with its multiplicity in the model (per-layer ones count once per layer)."""
    return [(lin, spec.num_layers) for lin in spec.layer_linears] + [(lin, 1) for lin in spec.top_linears]


def static_terms(spec: ModelSpec, setup: TrainSetup) -> StaticTerms:
    """The base weights of a resolved setup."""
    return _static_terms(spec, setup.bits, setup.dtype, setup.quant_type, setup.double_quant,
                         float_weight_bytes(setup))


@lru_cache(maxsize=4096)
def _static_terms(spec: ModelSpec, bits: int, dtype: str, quant_type: str, double_quant: bool,
                  float_bytes: int) -> StaticTerms:
    if bits in (16, 32):
        return StaticTerms(spec.total_params() * float_bytes, 0, 0, 0)

    quantized_linears = [(lin, mult) for lin, mult in all_linears(spec) if lin.quantized_by_bnb]
    quantized_values = sum(lin.weight_numel * mult for lin, mult in quantized_linears)
    # Everything bitsandbytes leaves in float (embeddings, lm_head, norms, biases, routers): float_bytes.
    weights = (spec.total_params() - quantized_values) * float_bytes

    packed = consts = 0
    for lin, whole_mult in quantized_linears:
        # one bitsandbytes layer per module: per-expert nn.Linear modules (transformers 4.x Mixtral,
        # memplan.catalog.models.layouts) are num_experts layers, each with its own state
        pieces = lin.num_experts if lin.peft_target == "module" else 1
        n, mult = lin.weight_numel // pieces, whole_mult * pieces
        if bits == 4:
            packed += mult * round_up(ceil_div(n, 2), CUDA_BLOCK_BYTES)  # two 4-bit codes per byte
            blocks = ceil_div(n, NF4_BLOCK)
            per_layer = round_up(NF4_CODE_VALUES * 4, CUDA_BLOCK_BYTES)  # the 16-entry fp32 code (nf4 or fp4)
            if double_quant:
                per_layer += round_up(blocks, CUDA_BLOCK_BYTES)  # uint8 absmax
                per_layer += round_up(ceil_div(blocks, DQ_BLOCK) * 4, CUDA_BLOCK_BYTES)  # fp32 absmax of absmax
                per_layer += round_up(DQ_CODE_VALUES * 4, CUDA_BLOCK_BYTES)  # fp32 code of the 8-bit absmax
                per_layer += CUDA_BLOCK_BYTES  # fp32 offset (a scalar, one block)
            else:
                per_layer += round_up(blocks * 4, CUDA_BLOCK_BYTES)  # fp32 absmax
            consts += mult * per_layer
        else:  # LLM.int8: int8 weight (CB) + one fp32 scale per output row (SCB), bnb Int8Params
            packed += mult * round_up(n, CUDA_BLOCK_BYTES)
            consts += mult * round_up(lin.num_experts // pieces * lin.out_features * 4, CUDA_BLOCK_BYTES)
    return StaticTerms(weights, packed, consts, quantized_values)


def kbit_weights_note(spec: ModelSpec, setup: TrainSetup, static: StaticTerms) -> str | None:
    """Why a 4/8-bit setup's base weights outweigh the same model's 16-bit weights, when they do (else None).

    Two causes, both real: the float rest (embeddings, lm_head, norms, biases) held in fp32, by
    prepare_model_for_kbit_training's upcast (or an fp32 compute dtype), which outweighs the quantization's
    saving on models whose embeddings are a large share (bloom-560m, qwen2.5-0.5b, bert); and linears bitsandbytes
    does not quantize (it replaces exact ``nn.Linear`` / ``Conv1D`` modules only: Falcon's ``FalconLinear``
    stays float, so falcon-7b needs more at 4 and 8 bits than at 16)."""
    if setup.bits not in (4, 8):
        return None
    base = static.weights + static.quantized + static.quant_constants
    total = spec.total_params()
    at_16 = total * 2
    if base <= at_16:
        return None
    float_values = total - static.quantized_values
    share = static.quantized_values / total
    why = []
    if share < 0.5:
        why.append(f"bitsandbytes quantizes {'none' if not share else f'only {share:.0%}'} of this model's weights "
                   f"(it replaces exact nn.Linear / Conv1D modules only)")
    if float_weight_bytes(setup) == 4:
        by = "prepare_model_for_kbit_training's fp32 upcast" if setup.upcast_non_quantized else "loading in fp32"
        what = "values" if share < 0.5 else f"values ({1 - share:.0%} of the model: embeddings, lm_head, norms, biases)"
        why.append(f"{by} holds the {float_values:,} {what} bitsandbytes leaves in float in "
                   f"{format_bytes(static.weights)} instead of {format_bytes(float_values * 2)}")
    return (f"the {setup.bits}-bit base weights ({format_bytes(base)}) are larger than the same model's 16-bit "
            f"weights ({format_bytes(at_16)}): " + "; ".join(why or ["the quantization constants"]))
