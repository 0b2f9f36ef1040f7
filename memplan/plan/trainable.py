"""What trains: the trainable tensors (LoRA A/B pairs, or every weight under full fine-tuning), and the gradient
and optimizer-state bytes they bring.

Optimizer state follows ``memplan.plan.optimizers``: torch keeps state in the parameter's dtype, bitsandbytes
32-bit state is fp32, 8-bit state is uint8 plus an fp32 absmax per 256-value block except for tensors under
4096 values, and paged state lives in CUDA managed memory for tensors of at least 1e5 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.units import ceil_div

from .dtypes import DTYPE_BYTES
from .adapters import adapted_linears, ia3_vectors, saved_modules
from .weights import all_linears, float_weight_bytes, load_dtype

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .optimizers import OptimizerSpec
    from .setup import TrainSetup

__all__ = ["TrainableTensor", "Trainable", "adapted_linears", "trainable", "optimizer_state_bytes",
           "gradients_held", "BNB_OPT_BLOCK", "BNB_MIN_8BIT_SIZE", "BNB_MIN_PAGED_SIZE"]

# bnb 8-bit optimizers: 256-value blocks with an fp32 absmax; tensors below 4096 values stay 32-bit
# (bitsandbytes/optim/optimizer.py: min_8bit_size=4096, blockwise, block size 256).
BNB_OPT_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
# bnb paged optimizers page only state of parameters with at least 1e5 values
# (bitsandbytes/optim/optimizer.py get_state_buffer: ``if not self.is_paged or A.numel() < 1e5``).
BNB_MIN_PAGED_SIZE = 100_000


@dataclass(frozen=True)
class TrainableTensor:
    numel: int
    bytes_per_value: int
    factored_numel: int  # rows + cols for a matrix, numel for a vector (Adafactor's second moment)


def _matrix(rows: int, cols: int, b: int) -> TrainableTensor:
    return TrainableTensor(rows * cols, b, rows + cols)


def _vector(n: int, b: int) -> TrainableTensor:
    return TrainableTensor(n, b, n)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: instances are memoized by ``trainable``
class Trainable:
    """The trainable tensors of a setup and what they cost: values, gradient bytes, optimizer state.

    ``tensors`` holds each distinct tensor shape once with its number of copies (a LoRA pair repeats in every
    layer), so that sizing optimizer state is a handful of multiplications, not one per parameter tensor."""

    tensors: tuple[tuple[TrainableTensor, int], ...]
    values: int
    grad_bytes: int

    @property
    def largest_grad_bytes(self) -> int:
        """The largest trainable tensor's gradient: what a per-parameter optimizer loop holds at once."""
        return max((t.numel * t.bytes_per_value for t, _ in self.tensors), default=0)

    def state_bytes(self, opt: OptimizerSpec) -> int:
        """Optimizer state of every trainable tensor."""
        return optimizer_state_bytes(opt, self.tensors)

    def fp32_state_tensors(self, opt: OptimizerSpec) -> tuple[int, int, int]:
        """For a bitsandbytes 8-bit optimizer: (tensors kept in 32-bit state because they have fewer than
        ``BNB_MIN_8BIT_SIZE`` values, all trainable tensors, bytes of that 32-bit state); zeros otherwise.
        Such tensors cost 8 B of state per value (Adam) instead of about 2: a LoRA rank that puts lora_A/B
        under the threshold can need more state than a larger one."""
        if opt.state_bits != 8 or opt.factored:
            return 0, 0, 0
        small = tuple((t, n) for t, n in self.tensors if t.numel < BNB_MIN_8BIT_SIZE)
        return (sum(n for _, n in small), sum(n for _, n in self.tensors), optimizer_state_bytes(opt, small))

    def paged_state_bytes(self, opt: OptimizerSpec) -> int:
        """The part of the state a bitsandbytes paged optimizer puts in CUDA managed memory (0 if not paged)."""
        if not opt.paged:
            return 0
        return optimizer_state_bytes(opt, tuple((t, n) for t, n in self.tensors if t.numel >= BNB_MIN_PAGED_SIZE))


def trainable(spec: ModelSpec, setup: TrainSetup) -> Trainable:
    """Every trainable tensor of a resolved setup, which sizes gradients and optimizer state."""
    if setup.method == "full":
        return _trainable(spec, None, 0, DTYPE_BYTES[load_dtype(setup)])
    # modules_to_save copies keep their module's dtype (a deep copy: fp32 after prepare_model_for_kbit_training);
    # peft's autocast_adapter_dtype casts the trainable token rows with the adapter (memplan simulate)
    return _trainable(spec, setup.targets, setup.rank, DTYPE_BYTES[setup.adapter_dtype], setup.adapter,
                      setup.modules_to_save or "", setup.trainable_tokens, float_weight_bytes(setup))


@lru_cache(maxsize=4096)
def _trainable(spec: ModelSpec, targets: str | None, rank: int, b: int, adapter: str = "lora", saved: str = "",
               tokens: int = 0, copy_b: int = 0) -> Trainable:
    copies: dict[TrainableTensor, int] = {}
    if targets is None:
        found = _full_tensors(spec, b)
    elif adapter == "ia3":
        found = tuple(_vector(n, b) for n in ia3_vectors(spec, targets))
    else:
        found = _lora_tensors(spec, targets, rank, b, adapter)
    found += tuple(_matrix(m.rows, m.cols, copy_b) for m in saved_modules(spec, saved)) if saved else ()
    found += (_matrix(tokens, spec.hidden_size, b),) if tokens else ()
    for t in found:
        copies[t] = copies.get(t, 0) + 1
    tensors = tuple(copies.items())
    values = sum(t.numel * n for t, n in tensors)
    return Trainable(tensors, values, sum(t.numel * t.bytes_per_value * n for t, n in tensors))


def _full_tensors(spec: ModelSpec, b: int) -> tuple[TrainableTensor, ...]:
    tensors: list[TrainableTensor] = []
    for lin, mult in all_linears(spec):
        if lin.num_experts > 1 and lin.peft_target == "parameter":  # a 3-D expert weight: Adafactor factors the
            w = TrainableTensor(lin.weight_numel, b, lin.num_experts * (lin.in_features + lin.out_features))
        else:  # last two dims per expert; per-expert nn.Linear modules (transformers 4.x) are num_experts matrices
            w = _matrix(lin.out_features, lin.in_features, b)
            mult *= lin.num_experts
        tensors += [w] * mult
        if lin.bias:
            tensors += [_vector(lin.bias_numel, b)] * mult
    for p in spec.params:
        mult = spec.num_layers if p.per_layer else 1
        if p.kind in ("embedding", "position_embedding") and p.numel % spec.hidden_size == 0:
            t = _matrix(p.numel // spec.hidden_size, spec.hidden_size, b)
        else:
            t = _vector(p.numel, b)
        tensors += [t] * mult
    return tuple(tensors)


def _lora_tensors(spec: ModelSpec, targets: str, rank: int, b: int, adapter: str = "lora"
                  ) -> tuple[TrainableTensor, ...]:
    tensors: list[TrainableTensor] = []
    for lin in adapted_linears(spec, targets):
        mult = spec.instances(lin)  # layer-restricted targets adapt only some layers
        if lin.num_experts == 1 or lin.peft_target == "module":  # (per-expert modules: a pair per expert)
            pair = [_matrix(rank, lin.in_features, b), _matrix(lin.out_features, rank, b)] * lin.num_experts
            if adapter == "lora-fa":  # A frozen (memplan.plan.adapters): weights, not trainable
                pair = pair[1::2]
            elif adapter == "dora":  # DoraLinearLayer.weight: the magnitude, one value per output row
                pair += [_vector(lin.out_features, b)] * lin.num_experts
        else:  # fused experts: peft's parameter wrapper; one tensor of peft's exact count
            n = lin.lora_params(rank)
            pair = [TrainableTensor(n, b, n)]
        tensors += pair * mult
    return tuple(tensors)


def optimizer_state_bytes(opt: OptimizerSpec, tensors: tuple[tuple[TrainableTensor, int], ...]) -> int:
    """Bytes of state ``opt`` keeps for ``tensors`` ((tensor, copies) pairs; module docstring)."""
    total = 0
    for t, copies in tensors:
        n = t.numel
        if opt.factored:
            per_state = t.factored_numel * t.bytes_per_value
        elif opt.state_bits == 8 and n >= BNB_MIN_8BIT_SIZE:
            per_state = n + ceil_div(n, BNB_OPT_BLOCK) * 4  # uint8 state + fp32 absmax per block
        elif opt.state_in_param_dtype:
            per_state = n * t.bytes_per_value
        else:
            per_state = n * 4  # bnb 32-bit state is fp32
        total += opt.states * per_state * copies
    return total


def gradients_held(setup: TrainSetup) -> bool:
    """Whether a step's forward and backward run with every gradient already allocated: from the second
    micro-batch of gradient accumulation on, the earlier micro-batches' gradients wait for the optimizer step
    (transformers ``Trainer._inner_training_loop`` calls ``optimizer.step()`` / ``zero_grad()`` once per
    ``gradient_accumulation_steps`` micro-batches); and before torch 2.0 the Trainer's ``model.zero_grad()``
    zeroes the gradients in place rather than freeing them (rule "zero-grad-keeps-buffers")."""
    if setup.grad_accum > 1:
        return True
    from .versions import applies, stack_of

    return applies("zero-grad-keeps-buffers", stack_of(setup.versions))
