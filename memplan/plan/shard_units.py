"""The tensors a sharding engine splits: one decoder layer's (the FSDP unit of a transformer auto-wrap policy, the
granularity ZeRO-3 gathers at) and the root's (embeddings, final norm, lm_head), each with its bytes and component,
as the build makes them (memplan.plan.weights, memplan.plan.trainable). Used by memplan.plan.rank_memory and
memplan.plan.zero_memory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.units import ceil_div, round_up

from .adapters import adapted_linears, ia3_modules
from .dtypes import DTYPE_BYTES
from .runtime import CUDA_BLOCK_BYTES
from .weights import float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["Units", "fsdp_units", "STATIC_SHARDED"]

# The static components a sharding engine divides (quantization constants stay whole: module docstring).
STATIC_SHARDED = ("weights", "quantized_weights", "lora_params")


@dataclass(frozen=True)
class Units:
    """The tensors of one FSDP unit (a decoder layer) and of the root (everything else), as (bytes, component)
    pairs, with the trainable ones' bytes (their gradients)."""

    layer: tuple[tuple[int, str], ...]
    root: tuple[tuple[int, str], ...]
    layer_trainable: int
    root_trainable: int
    num_layers: int

    def gathered(self, which: str) -> int:
        """Bytes of the unit's gathered parameters: each its own allocation."""
        return sum(round_up(b, CUDA_BLOCK_BYTES) for b, _ in getattr(self, which))

    def flat(self, which: str) -> int:
        """Bytes of the unit's all-gather buffer: one allocation."""
        return round_up(sum(b for b, _ in getattr(self, which)), CUDA_BLOCK_BYTES)

    def sharded(self, n: int) -> dict[str, int]:
        """Per-rank bytes of each component, every tensor in ``n`` dim-0 shards rounded to an allocation."""
        out: dict[str, int] = {}
        for tensors, mult in ((self.layer, self.num_layers), (self.root, 1)):
            for b, comp in tensors:
                out[comp] = out.get(comp, 0) + mult * round_up(ceil_div(b, n), CUDA_BLOCK_BYTES)
        return out


@lru_cache(maxsize=512)
def fsdp_units(spec: ModelSpec, setup: TrainSetup) -> Units:
    """The parameters of one decoder layer and of the root, as the build makes them (memplan.plan.weights)."""
    full = setup.method == "full"
    fb = float_weight_bytes(setup)
    layer: list[tuple[int, str]] = []
    root: list[tuple[int, str]] = []
    for lin in spec.layer_linears:
        if setup.bits == 4 and lin.quantized_by_bnb:
            layer.append((ceil_div(lin.weight_numel, 2), "quantized_weights"))
        else:
            layer.append((lin.weight_numel * fb, "weights"))
        if lin.bias:
            layer.append((lin.bias_numel * fb, "weights"))
    for lin in spec.top_linears:
        root.append((lin.weight_numel * fb, "weights"))
        if lin.bias:
            root.append((lin.bias_numel * fb, "weights"))
    for p in spec.params:
        (layer if p.per_layer else root).append((p.numel * fb, "weights"))
    if full:
        return Units(tuple(layer), tuple(root), sum(b for b, _ in layer), sum(b for b, _ in root), spec.num_layers)
    ab = DTYPE_BYTES[setup.adapter_dtype]
    lora: list[int] = []
    if setup.adapter == "ia3":  # one vector per adapted module: its input's size for feed-forward ones
        lora = [(lin.in_features if ff else lin.out_features) * ab for lin, ff in ia3_modules(spec, setup.targets)]
        layer += [(b, "lora_params") for b in lora]
        return Units(tuple(layer), tuple(root), sum(lora), 0, spec.num_layers)
    names = {lin.name for lin in spec.layer_linears}
    for lin in adapted_linears(spec, setup.targets):
        if lin.name not in names:
            continue
        pair = [setup.rank * lin.in_features * ab, lin.out_features * setup.rank * ab]
        if setup.adapter == "dora":
            pair.append(lin.out_features * ab)
        if setup.adapter == "lora-fa":  # A is frozen: a weight
            layer.append((pair.pop(0), "weights"))
        lora += pair * max(1, lin.num_experts if lin.peft_target == "module" else 1)
    layer += [(b, "lora_params") for b in lora]
    return Units(tuple(layer), tuple(root), sum(lora), 0, spec.num_layers)
