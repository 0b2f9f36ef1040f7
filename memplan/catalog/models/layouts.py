"""The same architecture as older transformers releases build it: a ``ModelSpec`` derived from the one the
builders make (transformers 5.23's module layout), never a second copy of a family.

Which layout a plan uses is the library stack's decision (``memplan.plan.versions``, the rules named below);
these functions only reshape a spec:

- ``moe_as_linears`` (rule "moe-experts-as-linears", transformers < 5): Mixtral's experts as one
  ``MixtralBlockSparseTop2MLP`` per expert -- nn.Linear ``w1`` (h -> ffn), ``w3`` (h -> ffn), ``w2`` (ffn -> h)
  -- and the router as an nn.Linear ``gate`` (h -> experts), all under ``block_sparse_moe``
  (transformers 4.48.3 models/mixtral/modeling_mixtral.py:67-107). bitsandbytes quantizes them; peft adapts
  them as modules. Each expert linear is one ``LinearSpec`` with ``num_experts`` copies and
  ``peft_target="module"`` (separate modules, where the 5.x fused 3-D tensors are ``"parameter"``); its full
  module names are ``...block_sparse_moe.experts.<e>.w1`` (``expert_module_names``).
- ``quantize_linear_subclasses`` (rule "bnb-quantizes-linear-subclasses", transformers < 5.5): Falcon's
  ``FalconLinear`` layers, an nn.Linear subclass, are quantized by bitsandbytes.

The parameter count is the same in every layout (the same values, stored as other tensors).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from .spec import LinearSpec, ModelSpec

__all__ = ["moe_as_linears", "quantize_linear_subclasses", "expert_module_names", "MOE_V4_PREFIX"]

MOE_V4_PREFIX = "block_sparse_moe"  # MixtralDecoderLayer.block_sparse_moe (transformers 4.x)


@functools.lru_cache(maxsize=64)
def moe_as_linears(spec: ModelSpec) -> ModelSpec:
    """``spec`` with fused MoE experts (``experts_gate_up`` / ``experts_down`` roles, 3-D parameters) and its
    parameter router replaced by per-expert nn.Linear modules; unchanged when it has none."""
    if not any(lin.role in ("experts_gate_up", "experts_down") for lin in spec.layer_linears):
        return spec
    linears: list[LinearSpec] = []
    for lin in spec.layer_linears:
        if lin.role == "router":
            linears.append(LinearSpec(f"{MOE_V4_PREFIX}.gate", lin.in_features, lin.out_features, False, role="router"))
        elif lin.role == "experts_gate_up":
            ffn = lin.out_features // 2
            for leaf, role in (("w1", "experts_gate"), ("w3", "experts_up")):
                linears.append(LinearSpec(f"{MOE_V4_PREFIX}.experts.{leaf}", lin.in_features, ffn, False,
                                          num_experts=lin.num_experts, role=role))
        elif lin.role == "experts_down":
            linears.append(LinearSpec(f"{MOE_V4_PREFIX}.experts.w2", lin.in_features, lin.out_features, False,
                                      num_experts=lin.num_experts, role="experts_down"))
        else:
            linears.append(lin)
    return replace(spec, layer_linears=tuple(linears))


@functools.lru_cache(maxsize=64)
def quantize_linear_subclasses(spec: ModelSpec) -> ModelSpec:
    """``spec`` with the nn.Linear subclasses bitsandbytes left in float marked quantized (Falcon's
    FalconLinear); unchanged for other models."""
    if spec.model_type != "falcon":
        return spec
    linears = tuple(replace(lin, quantized_by_bnb=True) if lin.role != "lm_head" else lin
                    for lin in spec.layer_linears)
    return spec if linears == spec.layer_linears else replace(spec, layer_linears=linears)


def expert_module_names(spec: ModelSpec, layer: int, lin: LinearSpec) -> list[str]:
    """The full module names of a per-expert linear in one layer (``model.layers.0.block_sparse_moe.experts.3.w1``);
    the one name of any other linear."""
    if lin.num_experts > 1 and lin.peft_target == "module":
        container, _, leaf = lin.name.rpartition(".")
        return [f"{spec.layer_prefix}.{layer}.{container}.{e}.{leaf}" for e in range(lin.num_experts)]
    return [f"{spec.layer_prefix}.{layer}.{lin.name}"]
