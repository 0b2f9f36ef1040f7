"""``TrainSetup``: one fine-tuning configuration, validated and with every default made explicit.

A setup is what a user's training script decides: the method (LoRA, QLoRA, full fine-tuning), how the frozen
base weights are stored (bits), the compute dtype, the LoRA adapter, the optimizer, the micro-batch, the
sequence length, gradient checkpointing and the attention implementation. ``resolve_setup`` turns a partly
filled setup into a complete one (``None`` means "the default for this model and card") and rejects values
that are out of range or contradict each other, naming the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import InvalidSetupError
from .optimizers import resolve_optimizer

if TYPE_CHECKING:
    from .gpus import GPUSpec
    from .models import ModelSpec

__all__ = ["TrainSetup", "resolve_setup", "METHODS", "BITS", "DTYPES", "ATTN_IMPLEMENTATIONS", "DTYPE_BYTES"]

METHODS = ("lora", "qlora", "full")
BITS = (4, 8, 16, 32)
DTYPES = ("fp16", "bf16", "fp32")
QUANT_TYPES = ("nf4", "fp4")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}

# transformers 5.23 model classes without ``_supports_sdpa = True`` (checked in
# ``transformers/models/<type>/modeling_<type>.py``): asking them for SDPA raises, and ``auto`` picks eager.
_NO_SDPA = frozenset({"bloom", "gemma2"})
# ... and without ``_supports_flash_attn = True``.
_NO_FLASH = frozenset({"bloom"})

DEFAULT_SEQ_LEN = 512
DEFAULT_RANK = 8  # peft ``LoraConfig.r`` default
DEFAULT_LORA_DROPOUT = 0.05  # the common QLoRA / alpaca-lora recipe value (peft's own default is 0.0)


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration. ``None`` fields are filled by ``resolve_setup``."""

    model: str
    method: str = "lora"
    bits: int | None = None  # storage of the frozen base weights: 32/16 float, 8 LLM.int8, 4 NF4/FP4
    quant_type: str = "nf4"
    double_quant: bool = True
    dtype: str | None = None  # compute dtype; default bf16 where the card supports it, else fp16
    rank: int = DEFAULT_RANK
    alpha: int | None = None  # does not change memory; default 2 * rank
    targets: str | None = None  # comma-separated module names, a regex, or "all-linear"; default: peft's
    lora_dropout: float = DEFAULT_LORA_DROPOUT
    adapter_dtype: str = "fp32"  # peft ``autocast_adapter_dtype=True`` keeps adapters in fp32
    optimizer: str = "adamw_torch"  # the HF TrainingArguments default
    batch_size: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    grad_ckpt: bool = False
    attn: str = "auto"
    upcast_non_quantized: bool | None = None  # peft.prepare_model_for_kbit_training; default on for 4/8 bits
    gpu: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> TrainSetup:
        """A copy with some fields changed (re-resolve it before estimating)."""
        return replace(self, **changes)

    @property
    def trains_lora(self) -> bool:
        return self.method in ("lora", "qlora")


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise InvalidSetupError(f"invalid {field} {value!r}; allowed: {shown}")


@lru_cache(maxsize=1024)
def _parameter_targets(spec: ModelSpec, targets: str) -> tuple[str, ...]:
    """Resolve (raising for a module the model does not have) and return the targets peft adapts through
    ``target_parameters`` (Mixtral's router and fused experts in transformers 5)."""
    return tuple(lin.name for lin in spec.resolve_targets(targets) if lin.peft_target == "parameter")


def resolve_setup(setup: TrainSetup, spec: ModelSpec, gpu: GPUSpec | None = None) -> TrainSetup:
    """Fill defaults and validate; returns a complete setup or raises ``InvalidSetupError``."""
    _check_choice("method", setup.method, METHODS)
    method = setup.method

    bits = setup.bits
    if bits is None:
        bits = 4 if method == "qlora" else 16
    _check_choice("bits", bits, BITS)
    if method == "qlora" and bits != 4:
        raise InvalidSetupError(f"method 'qlora' means 4-bit base weights, got bits {bits}; use --method lora for 8/16-bit")
    if method == "full" and bits in (4, 8):
        raise InvalidSetupError(
            f"full fine-tuning needs float weights (bits 16 or 32), got bits {bits}; use --method lora or qlora"
        )
    _check_choice("quant type", setup.quant_type, QUANT_TYPES)

    dtype = setup.dtype
    if dtype is None:
        dtype = "fp32" if bits == 32 else ("bf16" if gpu is None or gpu.bf16 else "fp16")
    _check_choice("dtype", dtype, DTYPES)
    if bits == 16 and dtype == "fp32":
        raise InvalidSetupError("bits 16 stores weights in fp16/bf16, so --dtype fp32 contradicts it; use --bits 32")
    if dtype == "bf16" and gpu is not None and not gpu.bf16:
        raise InvalidSetupError(
            f"{gpu.name} (compute capability {gpu.compute_capability}) has no bf16 support; use --dtype fp16"
        )

    _check_choice("adapter dtype", setup.adapter_dtype, ADAPTER_DTYPES)
    if not isinstance(setup.rank, int) or isinstance(setup.rank, bool) or setup.rank < 1:
        raise InvalidSetupError(f"invalid LoRA rank {setup.rank!r}; must be an integer >= 1")
    if not 0.0 <= setup.lora_dropout < 1.0:
        raise InvalidSetupError(f"invalid LoRA dropout {setup.lora_dropout!r}; must be in [0, 1)")
    if not isinstance(setup.batch_size, int) or setup.batch_size < 1:
        raise InvalidSetupError(f"invalid batch size {setup.batch_size!r}; must be an integer >= 1")
    if not isinstance(setup.seq_len, int) or setup.seq_len < 1:
        raise InvalidSetupError(f"invalid sequence length {setup.seq_len!r}; must be an integer >= 1")
    if spec.max_seq_len and setup.seq_len > spec.max_seq_len:
        raise InvalidSetupError(
            f"sequence length {setup.seq_len} exceeds {spec.name}'s learned position embeddings "
            f"(max_position_embeddings {spec.max_seq_len})"
        )

    optimizer = resolve_optimizer(setup.optimizer).name

    _check_choice("attention implementation", setup.attn, ATTN_IMPLEMENTATIONS)
    attn = setup.attn
    if attn == "auto":
        attn = "eager" if spec.model_type in _NO_SDPA else "sdpa"
    if attn == "sdpa" and spec.model_type in _NO_SDPA:
        raise InvalidSetupError(f"{spec.model_type} models do not support sdpa attention in transformers; use eager")
    if attn == "flash_attention_2":
        if spec.model_type in _NO_FLASH:
            raise InvalidSetupError(f"{spec.model_type} models do not support flash_attention_2; use eager")
        if dtype == "fp32":
            raise InvalidSetupError("flash_attention_2 runs in fp16/bf16 only; use --dtype bf16 or fp16")
        if gpu is not None and float(gpu.compute_capability) < 8.0:
            raise InvalidSetupError(
                f"flash_attention_2 needs compute capability >= 8.0; {gpu.name} has {gpu.compute_capability}"
            )

    upcast = setup.upcast_non_quantized
    if upcast is None:
        upcast = bits in (4, 8)
    elif upcast and bits not in (4, 8):
        raise InvalidSetupError("--upcast applies to 4/8-bit (prepare_model_for_kbit_training) only")

    targets = setup.targets
    alpha = setup.alpha
    if method == "full":
        targets, alpha = None, None
    else:
        if targets is None:
            targets = ",".join(spec.default_lora_targets())
        parameter_targets = _parameter_targets(spec, targets)
        if parameter_targets and setup.lora_dropout > 0:
            # peft 0.21 lora.ParamWrapper raises "does not work with lora_dropout != 0".
            raise InvalidSetupError(
                f"LoRA on {', '.join(parameter_targets)} (peft target_parameters) needs --lora-dropout 0, "
                f"got {setup.lora_dropout}"
            )
        alpha = alpha if alpha is not None else 2 * setup.rank

    return replace(
        setup,
        model=spec.name,
        method=method,
        bits=bits,
        dtype=dtype,
        alpha=alpha,
        targets=targets,
        optimizer=optimizer,
        attn=attn,
        upcast_non_quantized=upcast,
        gpu=gpu.id if gpu is not None else setup.gpu,
    )
