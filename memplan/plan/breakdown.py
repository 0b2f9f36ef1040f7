"""The shape of every answer: named components that sum to a total, per phase of a training step.

``Estimate`` (the analytic model's answer), ``memplan.measure.simulate.SimResult`` and run records all use these
component and phase names, so any two can be compared column by column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["COMPONENTS", "COMPONENT_LABELS", "PHASES", "ParamCounts", "Estimate"]

# Component names, in display order. JSON output uses exactly these keys.
COMPONENTS = (
    "weights",  # frozen base weights kept in float (all of them at 16/32 bits; the non-quantized rest at 4/8)
    "quantized_weights",  # bitsandbytes packed 4-bit / int8 values
    "quant_constants",  # 4-bit absmax + codes (+ double-quant state), int8 row scales
    "lora_params",
    "gradients",
    "optimizer_state",
    "activations",  # tensors saved for backward by the layers (+ checkpoint inputs, embeddings, ids)
    "logits_loss",  # lm_head output, its fp32 upcast, log-softmax and their gradients
    "transients",  # backward temporaries, dequantized weights, optimizer step temporaries, cuBLAS workspace
    # several GPUs (memplan.plan.distributed): FSDP's gathered layers and all-gather / reduce-scatter buffers, DDP's
    # gradient buckets, DeepSpeed's buckets and prefetch
    "comm_buffers",
    "cuda_context",  # driver context + kernels: visible to nvidia-smi, not to torch
    "allocator_overhead",  # caching-allocator rounding and fragmentation (reserved - allocated)
)
PHASES = ("forward_end", "backward_start", "backward", "backward_end", "optimizer_step")

# How people read the components (terminal tables, reports, plots).
COMPONENT_LABELS = {
    "weights": "base weights (float)",
    "quantized_weights": "base weights (quantized)",
    "quant_constants": "quantization constants",
    "lora_params": "LoRA parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits_loss": "logits + loss",
    "transients": "transients",
    "comm_buffers": "communication buffers",
    "cuda_context": "CUDA context",
    "allocator_overhead": "allocator overhead",
}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    quantized: int  # values stored by bitsandbytes in 4/8 bits (0 at 16/32 bits)

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "quantized": self.quantized}


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training step: a breakdown whose components sum to ``total_bytes``."""

    setup: TrainSetup
    total_bytes: int
    components: dict[str, int]
    peak_phase: str
    phases: dict[str, dict[str, int]] = field(repr=False)
    params: ParamCounts
    paged_bytes: int  # part of optimizer_state in CUDA managed memory (bnb paged optimizers)
    notes: tuple[str, ...] = ()
    # host memory the step needs beyond the card's, by cause (activation offloading: "activation_offload")
    host_bytes: dict[str, int] = field(default_factory=dict)
    # the LoRA initialisation's own peak (--init loftq/pissa/olora) on each way to run it, the planned one first
    # (memplan.plan.init_phase.InitPhase), beside training's
    init_phase: tuple = ()
    # the step's batch shape (--packing, --seq-len-file: memplan.plan.seq_shapes.SequenceShape); None: plain batches
    shape: object | None = None

    @property
    def dominant(self) -> str:
        """The largest component."""
        return max(self.components, key=self.components.__getitem__)

    @property
    def allocatable_bytes(self) -> int:
        """What the process asks of torch's allocator: the total minus the CUDA context."""
        return self.total_bytes - self.components["cuda_context"]

    def to_dict(self) -> dict:
        return {
            "model": self.setup.model,
            "total_bytes": self.total_bytes,
            "components": dict(self.components),
            "peak_phase": self.peak_phase,
            "phases": {p: sum(c.values()) for p, c in self.phases.items()},
            "params": self.params.to_dict(),
            "paged_bytes": self.paged_bytes,
            "dominant": self.dominant,
            "setup": self.setup.to_dict(),
            "notes": list(self.notes),
            "host_bytes": dict(self.host_bytes),
            "init_phase": [p.to_dict() for p in self.init_phase],
            "shape": self.shape.to_dict() if self.shape is not None else None,
        }
