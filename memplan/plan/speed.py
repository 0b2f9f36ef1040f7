"""Expected relative step time: how much slower a plan trains than the same model, batch and sequence in
16-bit weights without gradient checkpointing. A small multiplicative model with a source for each factor
(docs/step-time.md); ``memplan fit`` ranks with it and shows it beside each plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["StepTime", "step_time", "INT8_FACTOR", "NF4_FACTOR"]

# LLM.int8() + LoRA against FP16 + LoRA, OPT-1.3B on one RTX 3090 at equal batch: 1.46x, 1.28x, 1.32x, 1.23x
# (MRPC, BoolQ, HellaSwag, SAMSum), median 1.30 (docs/step-time.md, "LLM.int8() + LoRA against FP16 + LoRA").
INT8_FACTOR = 1.30
# No same-setup measurement of NF4/FP4 + LoRA against 16-bit to cite: assumed equal to LLM.int8 (the same kind of
# extra pass over every quantized weight per matmul) until GPU runs measure it (docs/step-time.md, "4-bit").
NF4_FACTOR = 1.30
# Forward : backward FLOPs per token = 2N : 4N, half of backward being the weights' gradients (Kaplan et al.
# 2020, arXiv:2001.08361, §2.1). Checkpointing recomputes the forward once (Chen et al. 2016, arXiv:1604.06174).
_FORWARD, _BACKWARD_INPUTS, _BACKWARD_WEIGHTS = 2.0, 2.0, 2.0


@dataclass(frozen=True)
class StepTime:
    """``factor``: expected step time relative to 16-bit weights without checkpointing; ``parts``: the factors
    it multiplies (name -> factor), each in docs/step-time.md."""

    factor: float
    parts: dict[str, float]

    def describe(self) -> str:
        """``~1.95x the step time of 16-bit without checkpointing (LLM.int8 1.30, checkpointing 1.50)``."""
        if not self.parts:
            return "the step time of 16-bit weights without checkpointing (the baseline)"
        why = ", ".join(f"{name} {f:.2f}" for name, f in self.parts.items())
        return f"~{self.factor:.2f}x the step time of 16-bit weights without checkpointing ({why})"


def step_time(setup: TrainSetup) -> StepTime:
    """The expected relative step time of a resolved setup (module docstring)."""
    parts: dict[str, float] = {}
    if setup.bits == 8:
        parts["LLM.int8"] = INT8_FACTOR
    elif setup.bits == 4:
        parts[f"4-bit {setup.quant_type}"] = NF4_FACTOR
    if setup.grad_ckpt:
        # frozen base weights skip their gradients: a step is forward + input gradients (+ weight gradients
        # when every weight trains), and checkpointing adds one forward
        backward = _BACKWARD_INPUTS + (_BACKWARD_WEIGHTS if setup.method == "full" else 0.0)
        parts["checkpointing"] = round(1 + _FORWARD / (_FORWARD + backward), 2)
    factor = 1.0
    for f in parts.values():
        factor *= f
    return StepTime(round(factor, 4), parts)
