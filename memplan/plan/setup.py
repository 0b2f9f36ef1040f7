"""``TrainSetup``: one fine-tuning configuration, validated and with every default made explicit.

A setup is what a user's training script decides: the method (LoRA, QLoRA, full fine-tuning), how the frozen
base weights are stored (bits), the compute dtype, the LoRA adapter, the optimizer, the micro-batch, the
sequence length, gradient checkpointing and the attention implementation. ``resolve_setup`` turns a partly
filled setup into a complete one (``None`` means "the default for this model and card") and rejects values
that are out of range or contradict each other, naming the bad value and what is allowed.

This module owns every knob: its values, its default (the ``TrainSetup`` field default, or the rule that fills
a ``None``) and its help text (``KNOBS``, from which the command line builds its flags), and the one rule for
how long a sequence a model takes (``sequence_limit``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .attention import sdpa_supported
from .distributed import ZERO, describe_distributed
from .dtypes import DTYPES
from .features import resolve_features
from .optimizers import resolve_optimizer
from .stack_effects import default_adapter_dtype, layout_for
from .versions import resolve_versions, stack_of

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec
    from memplan.catalog.models import ModelSpec

__all__ = ["TrainSetup", "resolve_setup", "sequence_limit", "default_attention",
           "describe_setup", "METHODS", "BITS", "QUANT_TYPES", "ADAPTER_DTYPES", "ATTN_IMPLEMENTATIONS",
           "AUTOCASTS", "DEFAULT_SEQ_LEN"]

METHODS = ("lora", "qlora", "full")
BITS = (4, 8, 16, 32)
QUANT_TYPES = ("nf4", "fp4")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
# torch.autocast around forward and loss (TrainingArguments bf16/fp16, accelerate mixed_precision), or none.
AUTOCASTS = ("off", "bf16", "fp16")

# Model classes without ``_supports_sdpa = True`` in the stack's transformers (memplan.plan.versions.SDPA_RELEASES,
# rule "sdpa-support"): asking them for SDPA raises, and ``auto`` picks eager. Gemma-2 (SDPA ignores its attention
# softcapping; transformers 5.21 dropped it) stays eager under ``auto`` on every stack.
_AUTO_EAGER = frozenset({"gemma2"})
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
    adapter_dtype: str | None = None  # LoRA weights; default fp32 (peft >= 0.12 autocast_adapter_dtype=True)
    optimizer: str = "adamw_torch"  # the HF TrainingArguments default
    batch_size: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    grad_ckpt: bool | None = None  # default off; on at 4/8 bits (prepare_model_for_kbit_training's default)
    attn: str = "auto"
    upcast_non_quantized: bool | None = None  # peft.prepare_model_for_kbit_training; default on for 4/8 bits
    autocast: str | None = None  # "off", "bf16", "fp16": torch.autocast around forward and loss (AUTOCASTS)
    grad_accum: int = 1  # micro-batches per optimizer step (TrainingArguments.gradient_accumulation_steps)
    allow_long_context: bool = False  # plan sequences beyond the trained context (RoPE-scaled fine-tuning)
    gpu: str | None = None
    # The library stack planned for, "transformers=4.48.3,peft=0.14.0" (any subset; memplan.plan.versions);
    # resolved to all four packages: the given ones, the rest installed (else the newest memplan models).
    versions: str | None = None
    # What else a script switches on (docs/adapters-and-savers.md); the values and rules of
    # each live in the module named, resolve_features (memplan.plan.features) checks them.
    adapter: str = "lora"  # lora, dora, lora-fa, ia3 (memplan.plan.adapters)
    rslora: bool = False  # peft use_rslora: another scale, no memory
    loraplus_lr_ratio: float | None = None  # LoRA+ (peft create_loraplus_optimizer): another lr for B, no memory
    modules_to_save: str | None = None  # peft modules_to_save: comma-separated names trained in full copies
    trainable_tokens: int = 0  # peft trainable_token_indices: how many embedding rows train
    init: str = "default"  # LoRA initialisation: default, loftq, pissa, olora (memplan.plan.init_phase)
    loss: str | None = None  # default, liger, chunked (memplan.plan.loss); None: default, fit may pick a saver
    packing: str = "off"  # off, packed, padding-free (memplan.plan.seq_shapes)
    seq_len_file: str | None = None  # the dataset's sequence lengths (memplan.plan.seq_shapes)
    activation_offload: str | None = None  # off, pinned, pageable (memplan.plan.offload); None: off, fit may pick
    # Several GPUs (memplan.plan.distributed): the setup is then one rank's, and its estimate that rank's memory.
    gpus: int = 1  # GPUs per node (torchrun --nproc_per_node)
    nodes: int = 1
    strategy: str | None = None  # single, ddp, fsdp, fsdp2, zero1, zero2, zero3; None: ddp on several GPUs
    fsdp_sharding: str | None = None  # full, grad-op, hybrid (FSDP only); None: full
    offload: str = "none"  # none, optimizer, params: what FSDP / DeepSpeed keep in host memory

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> TrainSetup:
        """A copy with some fields changed (re-resolve it before estimating)."""
        return replace(self, **changes)

    def __post_init__(self):
        # peft's target_modules and modules_to_save are lists (sets once injected): accept them, as the comma
        # strings memplan keeps
        for name in ("targets", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                names = sorted(value) if isinstance(value, (set, frozenset)) else value
                text = ",".join(str(t).strip() for t in names)
                object.__setattr__(self, name, text if name == "targets" else text or None)  # (no module: None)

    @property
    def trains_lora(self) -> bool:
        return self.method in ("lora", "qlora")


_FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainSetup)}


def sequence_limit(spec: ModelSpec, *, allow_long_context: bool = False) -> int | None:
    """The longest sequence a plan of ``spec`` may use: the size of a learned position table (OPT, GPT-2, BERT),
    which nothing can exceed; else the trained context, the config's ``max_position_embeddings`` (which already
    includes a RoPE scaling the checkpoint was trained with, e.g. Llama-3.1's 131,072), unless the user opts in to
    a longer, RoPE-scaled fine-tune; None where the config states no context (ALiBi: BLOOM)."""
    if spec.max_seq_len:
        return spec.max_seq_len
    return None if allow_long_context else spec.max_position_embeddings


def default_attention(spec: ModelSpec, versions: str | None = None) -> str:
    """What ``attn="auto"`` becomes: sdpa where transformers supports it for the architecture, else eager."""
    ok = spec.model_type not in _AUTO_EAGER and sdpa_supported(spec.model_type, stack_of(versions))
    if spec.attention_implementations:  # a derived spec: what its model class supports
        ok = "sdpa" in spec.attention_implementations
    return "sdpa" if ok else "eager"


def _grouped_mm_experts(spec: ModelSpec) -> bool:
    """Whether a derived spec's fused 3-D experts run through torch grouped_mm (``ModelSpec.experts_grouped_mm``)."""
    return spec.derived and spec.experts_grouped_mm


def describe_setup(setup: TrainSetup) -> str:
    """``8-bit LLM.int8 LoRA r=64 on all-linear, batch 8, seq 512, checkpointing, adamw_torch, sdpa, bf16``."""
    s = setup
    if s.bits == 4:
        weights = f"4-bit {s.quant_type}{' + double quant' if s.double_quant else ''}"
    elif s.bits == 8:
        weights = "8-bit LLM.int8"
    else:
        weights = f"{s.bits}-bit"
    names = {"lora": "LoRA", "dora": "DoRA", "lora-fa": "LoRA-FA", "ia3": "IA3"}
    adapter = ("full fine-tuning" if s.method == "full" else f"IA3 on {s.targets}" if s.adapter == "ia3"
               else f"{names.get(s.adapter, s.adapter)} r={s.rank} on {s.targets}")
    if s.modules_to_save:
        adapter += f" + {s.modules_to_save} trained in full"
    if s.trainable_tokens:
        adapter += f" + {s.trainable_tokens} token rows"
    if s.init not in (None, "default"):
        adapter += f", init {s.init}"
    ckpt = "checkpointing" if s.grad_ckpt else "no checkpointing"
    precision = s.dtype if s.autocast in (None, "off") else f"{s.dtype}, autocast {s.autocast}"
    batch = f"batch {s.batch_size}" + (f" x {s.grad_accum} accumulated" if s.grad_accum > 1 else "")
    extras = "".join(f", {text}" for text, on in (
        (f"{s.packing} sequences", s.packing not in (None, "off")), (f"lengths {s.seq_len_file}", bool(s.seq_len_file)),
        (f"loss {s.loss}", s.loss not in (None, "default")),
        (f"activation offload {s.activation_offload}", s.activation_offload not in (None, "off"))) if on)
    ranks = describe_distributed(s)
    extras += f", on {ranks}" if ranks else ""
    return f"{weights} {adapter}, {batch}, seq {s.seq_len}, {ckpt}, {s.optimizer}, {s.attn}, {precision}{extras}"


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise InvalidSetupError(f"invalid {field} {value!r}; allowed: {shown}")


@lru_cache(maxsize=1024)  # the search asks for the same few (targets, rank) pairs hundreds of times
def _check_rank(spec: ModelSpec, targets: str, rank: int) -> None:
    """A rank beyond every adapted weight's larger side is not a low-rank adapter of anything (peft would build
    it, each factor larger than the weight it adapts): most likely a typo."""
    widest = max((max(lin.in_features, lin.out_features) for lin in spec.resolve_targets(targets)), default=0)
    if widest and rank > widest:
        raise InvalidSetupError(f"LoRA rank {rank} is larger than every adapted weight of {spec.name} (the widest "
                                f"side is {widest}); a low-rank adapter has rank below min(in, out), typically 8-256")


@lru_cache(maxsize=1024)
def _parameter_targets(spec: ModelSpec, targets: str) -> tuple[str, ...]:
    """Resolve (raising for a module the model does not have) and return the targets peft adapts through
    ``target_parameters`` (Mixtral's router and fused experts in transformers 5)."""
    return tuple(lin.name for lin in spec.resolve_targets(targets) if lin.peft_target == "parameter")


# The Python type each field takes (None allowed where the field's default is None): a wrong type gets
# InvalidSetupError naming it, not a TypeError from deep inside (seq_len=True, grad_ckpt="yes", optimizer=42).
_FIELD_TYPES = {"model": str, "method": str, "bits": int, "quant_type": str, "double_quant": bool, "dtype": str,
                "rank": int, "alpha": (int, float), "targets": str, "lora_dropout": (int, float),
                "adapter_dtype": str, "optimizer": str, "batch_size": int, "seq_len": int, "grad_ckpt": bool,
                "attn": str, "upcast_non_quantized": bool, "autocast": str, "grad_accum": int,
                "allow_long_context": bool, "gpu": str, "versions": str, "adapter": str, "rslora": bool,
                "loraplus_lr_ratio": (int, float), "modules_to_save": str, "trainable_tokens": int, "init": str,
                "loss": str, "packing": str, "seq_len_file": str, "activation_offload": str,
                "gpus": int, "nodes": int, "strategy": str, "fsdp_sharding": str, "offload": str}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", (int, float): "a number"}


def _check_types(setup: TrainSetup) -> None:
    for name, kind in _FIELD_TYPES.items():
        value = getattr(setup, name)
        if value is None and _FIELD_DEFAULTS[name] is None:
            continue
        numeric = kind in (int, (int, float))
        if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
            raise InvalidSetupError(f"invalid {name} {value!r} ({type(value).__name__}); expected {_TYPE_NAMES[kind]}")


def resolve_setup(setup: TrainSetup, spec: ModelSpec, gpu: GPUSpec | None = None) -> TrainSetup:
    """Fill defaults and validate; returns a complete setup or raises ``InvalidSetupError``."""
    _check_types(setup)
    _check_choice("method", setup.method, METHODS)
    method = setup.method

    bits = setup.bits
    if bits is None:
        # --dtype fp32 with LoRA or full fine-tuning means fp32 weights (16-bit weights cannot compute in fp32)
        bits = 4 if method == "qlora" else (32 if setup.dtype == "fp32" else 16)
    _check_choice("bits", bits, BITS)
    if method == "qlora" and bits != 4:
        raise InvalidSetupError(f"method 'qlora' means 4-bit base weights, got bits {bits}; use --method lora for "
                                f"8/16-bit")
    if method == "full" and bits in (4, 8):
        raise InvalidSetupError(
            f"full fine-tuning needs float weights (bits 16 or 32), got bits {bits}; use --method lora or qlora"
        )
    _check_choice("quant type", setup.quant_type, QUANT_TYPES)

    dtype = setup.dtype
    if dtype is None and bits != 32 and setup.autocast in ("bf16", "fp16"):
        dtype = setup.autocast  # a config that names only its autocast (TrainingArguments fp16=True)
    if dtype is None:
        dtype = "fp32" if bits == 32 else ("bf16" if gpu is None or gpu.bf16 else "fp16")
    _check_choice("dtype", dtype, DTYPES)
    if bits == 16 and dtype == "fp32":
        raise InvalidSetupError("bits 16 stores weights in fp16/bf16, so --dtype fp32 contradicts it; use --bits 32")
    if dtype == "bf16" and gpu is not None and not gpu.bf16:
        raise InvalidSetupError(
            f"{gpu.name} (compute capability {gpu.compute_capability}) has no bf16 support; use --dtype fp16"
        )

    versions = resolve_versions(setup.versions)
    spec = layout_for(spec, versions)  # the modules the stack's transformers builds (Mixtral 4.x: expert linears)
    adapter_dtype = setup.adapter_dtype or default_adapter_dtype(bits, dtype, versions)
    _check_choice("adapter dtype", adapter_dtype, ADAPTER_DTYPES)
    if not isinstance(setup.rank, int) or isinstance(setup.rank, bool) or setup.rank < 1:
        raise InvalidSetupError(f"invalid LoRA rank {setup.rank!r}; must be an integer >= 1")
    if not 0.0 <= setup.lora_dropout < 1.0:
        raise InvalidSetupError(f"invalid LoRA dropout {setup.lora_dropout!r}; must be in [0, 1)")
    if not isinstance(setup.batch_size, int) or setup.batch_size < 1:
        raise InvalidSetupError(f"invalid batch size {setup.batch_size!r}; must be an integer >= 1")
    if not isinstance(setup.grad_accum, int) or isinstance(setup.grad_accum, bool) or setup.grad_accum < 1:
        raise InvalidSetupError(f"invalid gradient accumulation {setup.grad_accum!r}; must be an integer >= 1")
    if not isinstance(setup.seq_len, int) or setup.seq_len < 1:
        raise InvalidSetupError(f"invalid sequence length {setup.seq_len!r}; must be an integer >= 1")
    limit = sequence_limit(spec, allow_long_context=setup.allow_long_context)
    if limit and setup.seq_len > limit:
        if spec.max_seq_len:
            raise InvalidSetupError(
                f"sequence length {setup.seq_len} exceeds {spec.name}'s learned position embeddings "
                f"(max_position_embeddings {limit})"
            )
        raise InvalidSetupError(
            f"sequence length {setup.seq_len:,} exceeds {spec.name}'s trained context of {limit:,} tokens "
            f"(max_position_embeddings); pass --allow-long-context to plan a RoPE-scaled fine-tune that long"
        )

    optimizer = resolve_optimizer(setup.optimizer).name

    _check_choice("attention implementation", setup.attn, ATTN_IMPLEMENTATIONS)
    attn = setup.attn
    if attn == "auto":
        attn = default_attention(spec, versions)
    supported = spec.attention_implementations
    if supported and attn not in supported:
        raise InvalidSetupError(f"{spec.model_type} models do not support {attn} attention in transformers; use "
                                f"{' or '.join(supported)}")
    if attn == "sdpa" and not sdpa_supported(spec.model_type, stack_of(versions)):
        raise InvalidSetupError(f"{spec.model_type} models do not support sdpa attention in transformers "
                                f"{stack_of(versions).transformers}; use eager")
    if attn == "flash_attention_2":
        if spec.model_type in _NO_FLASH:
            raise InvalidSetupError(f"{spec.model_type} models do not support flash_attention_2; use eager")
        if dtype == "fp32":
            raise InvalidSetupError("flash_attention_2 runs in fp16/bf16 only; use --dtype bf16 or fp16")
        if gpu is not None and float(gpu.compute_capability) < 8.0:
            raise InvalidSetupError(
                f"flash_attention_2 needs compute capability >= 8.0; {gpu.name} has {gpu.compute_capability}"
            )

    autocast = setup.autocast
    if autocast is None:
        # What the most common script does: a Trainer with bf16=True (fp16=True where the card has no bf16) runs
        # forward and loss under autocast, whatever the weights' dtype; fp32 weights get the card's half dtype
        # (the Trainer's classic AMP). --autocast off is pure precision (torchtune, litgpt bf16-true).
        if dtype in ("bf16", "fp16"):
            autocast = dtype
        else:
            autocast = "bf16" if gpu is None or gpu.bf16 else "fp16"
    _check_choice("autocast", autocast, AUTOCASTS)
    if autocast == "bf16" and gpu is not None and not gpu.bf16:
        raise InvalidSetupError(
            f"{gpu.name} (compute capability {gpu.compute_capability}) has no bf16 support; use --autocast fp16"
        )

    upcast = setup.upcast_non_quantized
    grouped = _grouped_mm_experts(spec)
    if upcast is None:
        upcast = bits in (4, 8) and not grouped
    elif upcast and bits not in (4, 8):
        raise InvalidSetupError("--upcast applies to 4/8-bit (prepare_model_for_kbit_training) only")
    if grouped and (upcast or dtype != "bf16"):
        # transformers 5 runs fused 3-D experts through torch grouped_mm, bf16 only on CUDA (memplan simulate
        # refuses the same, memplan.measure.simulate._check_grouped_mm)
        raise InvalidSetupError(f"{spec.name}: transformers runs its fused MoE experts with torch grouped_mm, which "
                                f"takes bf16 only on CUDA; plan --dtype bf16 without --upcast (skip "
                                f"prepare_model_for_kbit_training's fp32 upcast, or cast the experts back to bf16)")

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
        _check_rank(spec, targets, setup.rank)

    features = resolve_features(setup, spec, method=method, bits=bits, attn=attn,
                                targets=targets if setup.targets is not None or method == "full" else None)
    targets = features.pop("targets", targets)  # IA3's own default targets (memplan.plan.adapters)
    if features["strategy"] in ZERO and dtype in ("bf16", "fp16"):
        # DeepSpeed's engine casts every float parameter to its dtype (engine.py _configure_distributed_model):
        # LoRA's adapters and prepare_model_for_kbit_training's fp32 upcasts alike (memplan.plan.zero_memory)
        adapter_dtype, upcast = dtype, False
    return replace(
        setup,
        **features,
        model=spec.name,
        method=method,
        bits=bits,
        dtype=dtype,
        alpha=alpha,
        targets=targets,
        adapter_dtype=adapter_dtype,
        optimizer=optimizer,
        attn=attn,
        upcast_non_quantized=upcast,
        autocast=autocast,
        grad_ckpt=setup.grad_ckpt if setup.grad_ckpt is not None else bits in (4, 8),
        gpu=gpu.id if gpu is not None else setup.gpu,
        versions=versions,
    )
