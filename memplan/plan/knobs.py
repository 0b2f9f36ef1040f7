"""The command-line face of ``TrainSetup``: one ``Knob`` per field, with its flag, values, default text and help.

``memplan.cli.common`` builds every command's setup flags from ``KNOBS``; ``memplan fit`` searches the knobs marked
``searched`` unless the user gives them. The values each knob allows and the rules that fill a ``None`` live with
the setup (``memplan.plan.setup``) and, for the adapter variants, initialisations, losses, sequence shapes and
activation offloading, in the modules named in each help text.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .adapters import ADAPTERS
from .distributed import FSDP_SHARDINGS, OFFLOADS, STRATEGIES
from .dtypes import DTYPES
from .init_choice import INITS
from .loss import LOSSES
from .offload import ACTIVATION_OFFLOADS
from .seq_shapes import PACKINGS
from .setup import (ADAPTER_DTYPES, ATTN_IMPLEMENTATIONS, AUTOCASTS, BITS, METHODS, QUANT_TYPES, TrainSetup)

__all__ = ["Knob", "KNOBS"]

_FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainSetup)}


@dataclass(frozen=True)
class Knob:
    """One ``TrainSetup`` field as a command-line flag: its values and its help. The default shown is the
    field's own default, or ``default_text`` for fields whose ``None`` is filled by ``resolve_setup``."""

    field: str
    flag: str
    help: str
    kind: type = str  # str, int, float or bool (a --flag / --no-flag pair)
    choices: tuple | None = None
    default_text: str | None = None
    searched: bool = False  # memplan fit searches it unless it is given

    @property
    def default(self):
        return _FIELD_DEFAULTS[self.field]

    def help_text(self, *, show_default: bool = True) -> str:
        if not show_default:
            return self.help
        shown = self.default_text if self.default_text is not None else self.default
        if isinstance(shown, bool):
            shown = "on" if shown else "off"
        return f"{self.help} (default {shown})"


KNOBS: tuple[Knob, ...] = (
    Knob("method", "--method", "lora, qlora (= 4-bit base weights) or full (every weight trains)",
         choices=METHODS, searched=True),
    Knob("bits", "--bits", "storage of the frozen base weights: 16/32 float, 8 LLM.int8, 4 NF4/FP4", int,
         BITS, "16 for lora, 4 for qlora", searched=True),
    Knob("quant_type", "--quant", "4-bit data type", choices=QUANT_TYPES),
    Knob("double_quant", "--double-quant", "quantize the 4-bit quantization constants", bool),
    Knob("dtype", "--dtype", "compute dtype", choices=DTYPES,
         default_text="bf16 where the card supports it, else fp16; fp32 at 32 bits"),
    Knob("rank", "--rank", "LoRA rank r", int, searched=True),
    Knob("alpha", "--alpha", "LoRA alpha (no effect on memory)", int, default_text="2r"),
    Knob("targets", "--targets", "LoRA target modules: q_proj,v_proj | all-linear | a regex",
         default_text="peft's default for the architecture", searched=True),
    Knob("lora_dropout", "--lora-dropout", "LoRA dropout", float),
    Knob("adapter_dtype", "--adapter-dtype", "dtype of the LoRA weights", choices=ADAPTER_DTYPES,
         default_text="fp32 (peft >= 0.12; older peft: the base weights' dtype at 16 bits)"),
    Knob("optimizer", "--optimizer", "HF TrainingArguments.optim name: adamw_torch, adamw_bnb_8bit, "
         "paged_adamw_8bit, paged_adamw_32bit, sgd, sgd_momentum, rmsprop, adafactor, ...", searched=True),
    Knob("batch_size", "--batch-size", "micro-batch size per step", int, searched=True),
    Knob("seq_len", "--seq-len", "tokens per sequence", int),
    Knob("grad_ckpt", "--grad-ckpt", "gradient checkpointing", bool, searched=True,
         default_text="off; on at 4/8 bits, as prepare_model_for_kbit_training turns it on"),
    Knob("attn", "--attn", "attention implementation", choices=ATTN_IMPLEMENTATIONS,
         default_text="auto: sdpa where transformers supports it, else eager"),
    Knob("upcast_non_quantized", "--upcast", "prepare_model_for_kbit_training's fp32 upcast of the "
         "non-quantized weights", bool, default_text="on at 4/8 bits"),
    Knob("autocast", "--autocast", "torch.autocast around forward and loss, as TrainingArguments(bf16=True) / "
         "fp16=True and accelerate's mixed_precision run it", choices=AUTOCASTS,
         default_text="the compute dtype, as a Trainer script with bf16=True (fp16=True on cards without bf16); "
                      "for fp32 weights the card's half dtype (the Trainer's AMP)"),
    Knob("allow_long_context", "--allow-long-context", "plan sequences longer than the model's trained context "
         "(max_position_embeddings), as a RoPE-scaled fine-tune does; learned position tables stay a hard limit",
         bool),
    Knob("grad_accum", "--grad-accum", "micro-batches accumulated per optimizer step (gradient_accumulation_steps): "
         "from the second on, forward and backward run with the gradients of the earlier ones held", int),
    Knob("versions", "--versions", "library versions to plan for, e.g. transformers=4.48.3,peft=0.14.0,"
         "bitsandbytes=0.45.2,torch=2.5.1 (any subset); memplan.plan.versions.RULES says what each changes",
         default_text="the installed versions; the newest memplan models for packages not installed"),
    Knob("adapter", "--adapter", "adapter method: lora, dora (peft use_dora), lora-fa (frozen A), ia3 "
         "(memplan.plan.adapters)", choices=ADAPTERS),
    Knob("rslora", "--rslora", "rank-stabilised LoRA scale alpha/sqrt(r) (peft use_rslora; no effect on memory)", bool),
    Knob("loraplus_lr_ratio", "--loraplus-lr-ratio", "LoRA+: B's learning rate over A's (no effect on memory)",
         float, default_text="off"),
    Knob("modules_to_save", "--modules-to-save", "modules trained in full, as peft modules_to_save: lm_head, "
         "embed_tokens, score, ... (comma-separated)", default_text="none"),
    Knob("trainable_tokens", "--trainable-tokens", "embedding rows trained, as peft trainable_token_indices "
         "(new special tokens)", int),
    Knob("init", "--init", "LoRA initialisation: default, loftq, pissa, olora; the initialisation's own peak is "
         "reported beside training's (memplan.plan.init_phase)", choices=INITS),
    Knob("loss", "--loss", "loss over the logits: default (transformers' cross-entropy), liger (fused linear "
         "cross-entropy, use_liger_kernel), chunked (memplan.plan.loss)", choices=LOSSES,
         default_text="default; fit tries the fused and chunked losses when nothing else fits", searched=True),
    Knob("packing", "--packing", "sequence shape: off (padded batches), packed (TRL packing), padding-free "
         "(TRL padding_free / DataCollatorWithFlattening) (memplan.plan.seq_shapes)", choices=PACKINGS),
    Knob("seq_len_file", "--seq-len-file", "the dataset's sequence lengths, one per line or 'length count' "
         "histogram lines: the peak is the longest batch the sampler can form", default_text="none"),
    Knob("activation_offload", "--activation-offload", "activations saved for backward kept in host memory "
         "(TRL activation_offloading, torch save_on_cpu): off, pinned, pageable (memplan.plan.offload)",
         choices=ACTIVATION_OFFLOADS, default_text="off; fit tries it when nothing else fits", searched=True),
    Knob("gpus", "--gpus", "GPUs per node (torchrun --nproc_per_node); the estimate is one rank's memory", int),
    Knob("nodes", "--nodes", "nodes (torchrun --nnodes)", int),
    Knob("strategy", "--strategy", "data-parallel engine: ddp, fsdp (FSDP1), fsdp2 (fully_shard), zero1, zero2, "
         "zero3 (DeepSpeed), single (memplan.plan.distributed)", choices=STRATEGIES,
         default_text="single on one GPU, ddp on several", searched=True),
    Knob("fsdp_sharding", "--fsdp-sharding", "FSDP sharding: full (FULL_SHARD), grad-op (SHARD_GRAD_OP), hybrid "
         "(HYBRID_SHARD: within a node)", choices=FSDP_SHARDINGS, default_text="full under fsdp / fsdp2"),
    Knob("offload", "--offload", "what the engine keeps in host memory: none, optimizer (DeepSpeed "
         "offload_optimizer), params (parameters, gradients and optimizer: FSDP CPUOffload, ZeRO-3 offload_param)",
         choices=OFFLOADS, searched=True),
)
