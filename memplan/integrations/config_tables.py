"""The config tables: for each training-config format, which key sets which ``TrainSetup`` field and how its
value converts, and which keys change memory without being modelled (reported with a reason).

One table per format (``TABLES``: config key -> (setup field or None, converter)); each cites the class it
reads. ``memplan.integrations.training_configs`` reads files through them; ``memplan.preflight`` maps live
config objects (``to_dict()``) through the same tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from memplan.errors import InvalidSetupError
from memplan.plan.dtypes import dtype_name
from memplan.plan.optimizers import resolve_optimizer

from .config_distributed import DISTRIBUTED_KEYS
from .config_features import as_bool as _bool
from .config_features import liger_plugin, lora_init, module_names, packed, padding_free, peft_type, token_rows
from .config_skip import SILENT, Skip

__all__ = ["FORMATS", "FORMAT_NAMES", "Skip", "TABLES", "EXCLUSIVE", "NESTED", "AXOLOTL_MARKERS", "TRL_MARKERS",
           "TA_MARKERS", "ACCELERATE_MARKERS"]

FORMATS = ("training_args", "axolotl", "trl", "peft", "bnb", "accelerate", "deepspeed")
FORMAT_NAMES = ("transformers TrainingArguments JSON (to_json_string), TRL SFTConfig JSON / YAML, peft "
                 "adapter_config.json (LoRA), bitsandbytes BitsAndBytesConfig JSON, axolotl YAML, accelerate "
                 "config YAML and DeepSpeed config JSON")


_SILENT = SILENT
Converter = Callable[[Any, Mapping[str, Any]], Any]  # (value, the whole flattened file) -> value or Skip


# ---------------------------------------------------------------------------------------------- converters


def _int(v, raw=None) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    raise InvalidSetupError(f"expected an integer, got {v!r}")


def _float(v, raw=None) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise InvalidSetupError(f"expected a number, got {v!r}")


def _alpha(v, raw=None) -> int | float:
    """LoRA alpha (no memory effect): an int as peft writes it; a float alpha is kept as given."""
    v = _float(v)
    return int(v) if v.is_integer() else v


def _true_gives(value) -> Converter:
    """``true`` sets ``value``; ``false`` sets nothing (``load_in_8bit: false`` says nothing about the bits)."""
    return lambda v, raw: value if _bool(v) else _SILENT


def _amp(dtype: str) -> Converter:
    """TrainingArguments / axolotl ``bf16`` / ``fp16``: forward and loss under ``torch.autocast(dtype)`` (the
    weights keep their dtype); both false: no autocast. axolotl also allows ``bf16: auto``."""
    other = "fp16" if dtype == "bf16" else "bf16"

    def conv(v, raw):
        if isinstance(v, str) and v.strip().lower() == "auto":
            return Skip("note", "bf16 autocast where the card has it, else fp16: memplan's default when not given")
        if _bool(v):
            return dtype
        return "off" if raw.get(other) is False else _SILENT  # bf16: false and fp16: false: no autocast
    return conv


def _mixed_precision(v, raw=None) -> str:  # accelerate: no / fp16 / bf16 (fp8 is not modelled)
    s = str(v).strip().lower()
    if s in ("no", "none", "false"):
        return "off"
    if s in ("fp16", "bf16"):
        return s
    if s == "fp8":
        return Skip("warning", "fp8 mixed precision (transformer-engine / torchao) is not modelled: bf16 is assumed")
    raise InvalidSetupError(f"unknown mixed_precision {v!r}; allowed: no, fp16, bf16, fp8")


def _torch_dtype(v, raw=None):
    """``torch_dtype`` / ``dtype`` / ``bnb_4bit_compute_dtype`` as transformers serialises them ("bfloat16")."""
    if str(v).strip().lower() == "auto":
        return Skip("note", "the checkpoint's dtype: memplan's default (bf16 where the card has it) applies")
    name = dtype_name(v)
    if name is None:
        raise InvalidSetupError(f"unknown dtype {v!r}; expected bfloat16, float16 or float32")
    return name


def _quant_type(v, raw=None) -> str:
    s = str(v).strip().lower()
    if s not in ("nf4", "fp4"):
        raise InvalidSetupError(f"unknown 4-bit quant type {v!r}; allowed: nf4, fp4")
    return s


def _targets(v, raw=None) -> str:
    """peft ``target_modules``: a list of names (comma-joined here), a regex string, or "all-linear"."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(t).strip() for t in v)
    if isinstance(v, (set, frozenset)):  # peft keeps target_modules as a set once the adapter is injected
        return ",".join(sorted(str(t).strip() for t in v))
    s = str(v).strip()
    return "all-linear" if s.lower() == "all-linear" else s


def _optimizer(v, raw=None) -> str:
    resolve_optimizer(str(v))  # an unknown name raises InvalidSetupError with close matches
    return str(v).strip()  # kept as written, like --optimizer; resolve_setup canonicalises it


def _attn(v, raw=None):
    """``attn_implementation`` (transformers ``PreTrainedModel.from_pretrained``)."""
    s = str(v).strip()
    if s in ("eager", "sdpa", "flash_attention_2"):
        return s
    return Skip("warning", f"attention {s!r} is not modelled; estimated with memplan's default (sdpa)")


def _adapter(v, raw=None):
    s = str(v).strip().lower()
    if s in ("lora", "qlora"):
        return s
    raise InvalidSetupError(f"adapter {v!r} is not modelled; memplan plans lora, qlora and full fine-tuning "
                            f"(no adapter)")


def _grad_ckpt(v, raw=None):
    """axolotl also accepts ``offload`` / ``unsloth``: checkpoints kept in host memory."""
    if isinstance(v, str) and v.strip().lower() in ("offload", "unsloth"):
        return True  # reported as a warning by _axolotl_post
    return _bool(v)


_4BIT_KEYS = ("load_in_4bit", "_load_in_4bit", "bnb_config_kwargs.load_in_4bit",
              "model_init_kwargs.quantization_config.load_in_4bit",
              "model_init_kwargs.quantization_config._load_in_4bit")


def _if_4bit(conv: Converter) -> Converter:
    """``bnb_4bit_*`` settings mean nothing unless the base is loaded in 4 bits (the bnb default compute dtype
    float32 is in every 8-bit config too)."""
    def wrapped(v, raw):
        on = any(raw.get(k) is True for k in _4BIT_KEYS) or str(raw.get("adapter", "")).lower() == "qlora"
        return conv(v, raw) if on else _SILENT
    return wrapped


def _warn(reason: str, when: Callable[[Any, Mapping], bool] = lambda v, raw: bool(v)) -> Converter:
    return lambda v, raw: Skip("warning", reason) if when(v, raw) else _SILENT


def _note(reason: str, when: Callable[[Any, Mapping], bool] = lambda v, raw: bool(v)) -> Converter:
    return lambda v, raw: Skip("note", reason) if when(v, raw) else _SILENT


def _ckpt_kwargs(v, raw):
    """transformers 5 ``activation_checkpointing_kwargs``: ``every_n_layers`` > 1 and ``offload`` change the
    saved activations; ``use_reentrant`` and the rest do not."""
    if isinstance(v, Mapping) and ((v.get("every_n_layers") or 1) != 1 or v.get("offload")):
        return Skip("warning", "partial or offloaded checkpointing is not modelled: every layer is counted as "
                                "checkpointed on the GPU")
    return _SILENT


def _eval_batch(train_key: str) -> Converter:
    def conv(v, raw):
        evaluates = raw.get("eval_strategy", "no") not in ("no", None) or raw.get("do_eval") is True \
            or train_key == "micro_batch_size"
        if evaluates and isinstance(v, int) and isinstance(raw.get(train_key), int) and v > raw[train_key]:
            return Skip("warning", f"evaluation is not modelled, and its logits (batch x sequence x vocabulary) at "
                                    f"batch {v} can exceed the training peak at {train_key} {raw[train_key]}")
        return _SILENT
    return conv


_COMPILE = _warn("torch.compile changes activation memory (fusion, CUDA graphs); not modelled")


# ------------------------------------------------------------------------------------------------- tables
# key -> (TrainSetup field or None, converter). A later key of the same field wins within one file.

# transformers 5.23 ``transformers/training_args.py`` ``TrainingArguments`` fields.
_TRAINING_ARGS: dict[str, tuple[str | None, Converter]] = {
    "model_name_or_path": ("model", lambda v, raw: str(v)),  # not a TrainingArguments field: run scripts add it
    "per_device_train_batch_size": ("batch_size", _int),
    "optim": ("optimizer", _optimizer),
    "gradient_checkpointing": ("grad_ckpt", _bool),  # deprecated alias in transformers 5
    "activation_checkpointing": ("grad_ckpt", _bool),  # transformers >= 5 name
    "bf16": ("autocast", _amp("bf16")),
    "fp16": ("autocast", _amp("fp16")),
    "tf32": (None, lambda v, raw: _SILENT),  # matmul precision only: no memory effect
    "gradient_checkpointing_kwargs": (None, _ckpt_kwargs),
    "activation_checkpointing_kwargs": (None, _ckpt_kwargs),
    "gradient_accumulation_steps": ("grad_accum", _int),
    "per_device_eval_batch_size": (None, _eval_batch("per_device_train_batch_size")),
    **DISTRIBUTED_KEYS["training_args"],  # fsdp, fsdp_config, deepspeed: config_distributed reads them
    "parallelism_config": (None, _warn("parallelism (tensor / context parallel) is not modelled")),
    "torch_compile": (None, _COMPILE),
    "use_liger_kernel": ("loss", _true_gives("liger")),
    "optim_target_modules": (None, _warn("GaLore / APOLLO projected optimizer state is not modelled")),
    "label_smoothing_factor": (None, _warn("label smoothing makes a second logits-sized log-softmax: not modelled",
                                           lambda v, raw: isinstance(v, (int, float)) and v > 0)),
    "auto_find_batch_size": (None, _note("the Trainer halves the batch after an out-of-memory error; memplan "
                                         "plans the configured batch")),
    "train_sampling_strategy": (None, _note("batches grouped by length: the peak is still the longest batch, "
                                            "modelled at the full sequence length",
                                            lambda v, raw: v == "group_by_length")),
    "group_by_length": (None, _note("batches grouped by length: the peak is still the longest batch, modelled at "
                                    "the full sequence length")),  # transformers 4.x
    "use_cpu": (None, _warn("trains on the CPU: the GPU estimate does not apply")),
}

# TRL: ``trl/trainer/sft_config.py`` ``SFTConfig`` (a TrainingArguments subclass; ``max_length`` since TRL
# 0.20, ``max_seq_length`` before) and ``trl/trainer/model_config.py`` ``ModelConfig`` (``trl sft --config``
# YAML recipes combine both).
_TRL: dict[str, tuple[str | None, Converter]] = {
    **_TRAINING_ARGS,
    "max_seq_length": ("seq_len", _int),
    "max_length": ("seq_len", _int),
    "packing": ("packing", packed),
    "padding_free": ("packing", padding_free),
    "activation_offloading": ("activation_offload", _true_gives("pinned")),
    "model_init_kwargs.torch_dtype": ("dtype", _torch_dtype),
    "model_init_kwargs.dtype": ("dtype", _torch_dtype),  # transformers 5 name
    "model_init_kwargs.attn_implementation": ("attn", _attn),
    "model_init_kwargs.quantization_config.load_in_4bit": ("bits", _true_gives(4)),
    "model_init_kwargs.quantization_config.load_in_8bit": ("bits", _true_gives(8)),
    "model_init_kwargs.quantization_config.bnb_4bit_quant_type": ("quant_type", _if_4bit(_quant_type)),
    "model_init_kwargs.quantization_config.bnb_4bit_use_double_quant": ("double_quant", _if_4bit(_bool)),
    "model_init_kwargs.quantization_config.bnb_4bit_compute_dtype": ("dtype", _if_4bit(_torch_dtype)),
    # ModelConfig
    "torch_dtype": ("dtype", _torch_dtype),
    "dtype": ("dtype", _torch_dtype),
    "attn_implementation": ("attn", _attn),
    "use_peft": ("method", lambda v, raw: _SILENT if _bool(v) else "full"),
    "lora_r": ("rank", _int),
    "lora_alpha": ("alpha", _alpha),
    "lora_dropout": ("lora_dropout", _float),
    "lora_target_modules": ("targets", _targets),
    "lora_modules_to_save": ("modules_to_save", module_names),
    "use_dora": ("adapter", _true_gives("dora")),
    "load_in_4bit": ("bits", _true_gives(4)),
    "load_in_8bit": ("bits", _true_gives(8)),
    "bnb_4bit_quant_type": ("quant_type", _if_4bit(_quant_type)),
    "use_bnb_nested_quant": ("double_quant", _if_4bit(_bool)),
}

# peft 0.21 ``peft/tuners/lora/config.py`` ``LoraConfig`` as ``save_pretrained`` writes adapter_config.json.
_PEFT: dict[str, tuple[str | None, Converter]] = {
    "base_model_name_or_path": ("model", lambda v, raw: str(v)),
    "r": ("rank", _int),
    "lora_alpha": ("alpha", _alpha),
    "lora_dropout": ("lora_dropout", _float),
    "target_modules": ("targets", _targets),
    "peft_type": ("adapter", peft_type),
    "modules_to_save": ("modules_to_save", module_names),
    "use_dora": ("adapter", _true_gives("dora")),
    "use_rslora": ("rslora", _true_gives(True)),
    "init_lora_weights": ("init", lora_init),
    "feedforward_modules": (None, lambda v, raw: _SILENT),  # IA3: memplan takes peft's defaults for the model
    "rank_pattern": (None, _warn("per-module ranks are not modelled: every module is counted at r")),
    "layers_to_transform": (None, _warn("LoRA on some layers only is not modelled: counted on every layer")),
    "exclude_modules": (None, _warn("excluded modules are not modelled: the estimate counts them adapted")),
    "target_parameters": (None, _warn("target_parameters (MoE experts) from a file are not modelled")),
    "trainable_token_indices": ("trainable_tokens", token_rows),
    "layer_replication": (None, _warn("layer replication is not modelled")),
    "bias": (None, _warn("trained biases are not modelled", lambda v, raw: v not in ("none", None))),
    "lora_bias": (None, _warn("LoRA bias terms are not modelled")),
}

# transformers ``transformers/utils/quantization_config.py`` ``BitsAndBytesConfig.to_dict()``.
_BNB: dict[str, tuple[str | None, Converter]] = {
    "_load_in_4bit": ("bits", _true_gives(4)),
    "_load_in_8bit": ("bits", _true_gives(8)),
    "load_in_4bit": ("bits", _true_gives(4)),
    "load_in_8bit": ("bits", _true_gives(8)),
    "bnb_4bit_quant_type": ("quant_type", _if_4bit(_quant_type)),
    "bnb_4bit_use_double_quant": ("double_quant", _if_4bit(_bool)),
    "bnb_4bit_compute_dtype": ("dtype", _if_4bit(_torch_dtype)),
    "llm_int8_skip_modules": (None, _warn("modules kept in float are not modelled: memplan keeps bitsandbytes' "
                                          "default (lm_head and embeddings in float)")),
    "llm_int8_enable_fp32_cpu_offload": (None, _warn("CPU offload of modules is not modelled")),
    "llm_int8_has_fp16_weight": (None, _warn("fp16 master weights beside the int8 ones are not modelled")),
}

# axolotl ``docs/config-reference.qmd`` / ``src/axolotl/utils/schemas/config.py`` names.
_AXOLOTL: dict[str, tuple[str | None, Converter]] = {
    "base_model": ("model", lambda v, raw: str(v)),
    "adapter": ("method", _adapter),
    "load_in_4bit": ("bits", _true_gives(4)),
    "load_in_8bit": ("bits", _true_gives(8)),
    "bnb_config_kwargs.bnb_4bit_quant_type": ("quant_type", _if_4bit(_quant_type)),
    "bnb_config_kwargs.bnb_4bit_use_double_quant": ("double_quant", _if_4bit(_bool)),
    "bnb_config_kwargs.llm_int8_has_fp16_weight": (None, _warn("fp16 master weights beside int8: not modelled")),
    "lora_r": ("rank", _int),
    "lora_alpha": ("alpha", _alpha),
    "lora_dropout": ("lora_dropout", _float),
    "lora_target_modules": ("targets", _targets),
    "lora_target_linear": ("targets", _true_gives("all-linear")),  # wins over lora_target_modules, as in axolotl
    "sequence_len": ("seq_len", _int),
    "micro_batch_size": ("batch_size", _int),
    "gradient_checkpointing": ("grad_ckpt", _grad_ckpt),
    "optimizer": ("optimizer", _optimizer),  # HF TrainingArguments.optim names
    "bf16": ("autocast", _amp("bf16")),
    "fp16": ("autocast", _amp("fp16")),
    "bfloat16": ("dtype", _true_gives("bf16")),  # pure bf16 weights, no autocast (training_configs._axolotl_post)
    "float16": ("dtype", _true_gives("fp16")),
    "tf32": (None, lambda v, raw: _SILENT),  # matmul precision only
    "flash_attention": ("attn", _true_gives("flash_attention_2")),
    "sdp_attention": ("attn", _true_gives("sdpa")),
    "eager_attention": ("attn", _true_gives("eager")),
    "xformers_attention": (None, _note("xformers memory-efficient attention is estimated as sdpa")),
    "flex_attention": (None, _note("flex attention is estimated as sdpa")),
    "s2_attention": (None, _warn("shifted-sparse attention is not modelled")),
    "sample_packing": ("packing", packed),
    "gradient_accumulation_steps": ("grad_accum", _int),
    "eval_batch_size": (None, _eval_batch("micro_batch_size")),
    "group_by_length": (None, _note("batches grouped by length: the peak is still the longest batch")),
    "auto_find_batch_size": (None, _note("the Trainer halves the batch after an out-of-memory error")),
    **DISTRIBUTED_KEYS["axolotl"],  # deepspeed, fsdp, fsdp_config, fsdp_version: read by config_distributed
    "torch_compile": (None, _COMPILE),
    "lora_modules_to_save": ("modules_to_save", module_names),
    "peft_use_dora": ("adapter", _true_gives("dora")),
    "peft_use_rslora": ("rslora", _true_gives(True)),
    "loraplus_lr_ratio": ("loraplus_lr_ratio", _float),
    "peft_layers_to_transform": (None, _warn("LoRA on some layers only is not modelled: counted on every layer")),
    "unfrozen_parameters": (None, _warn("partly unfrozen base parameters are not modelled")),
    "activation_offloading": ("activation_offload", _true_gives("pinned")),
    "plugins": ("loss", liger_plugin),
    "liger_fused_linear_cross_entropy": (None, lambda v, raw: _SILENT),  # read with plugins
    "cut_cross_entropy": (None, _warn("Cut Cross Entropy is not modelled: logits + loss counted in full")),
    "chunked_cross_entropy": ("loss", _true_gives("chunked")),
}

# accelerate's config file (``accelerate config`` -> default_config.yaml; accelerate/commands/config/
# config_args.py ``ClusterConfig``): the precision; the rest is read by config_distributed.
_ACCELERATE: dict[str, tuple[str | None, Converter]] = {
    "mixed_precision": ("autocast", _mixed_precision),
    **DISTRIBUTED_KEYS["accelerate"]}  # GPUs, nodes, FSDP / DeepSpeed: read by config_distributed

TABLES: dict[str, dict[str, tuple[str | None, Converter]]] = {
    "training_args": _TRAINING_ARGS, "trl": _TRL, "peft": _PEFT, "bnb": _BNB, "axolotl": _AXOLOTL,
    "accelerate": _ACCELERATE, "deepspeed": DISTRIBUTED_KEYS["deepspeed"]}

# Keys that cannot both be on (compared without dotted prefix or leading "_"): InvalidSetupError rather than
# "the later key wins".
EXCLUSIVE = ({"load_in_4bit", "load_in_8bit"}, {"bf16", "fp16"})
NESTED = ("model_init_kwargs", "quantization_config", "bnb_config_kwargs")  # dicts read as dotted keys

# Detection markers (checked in the order peft, bnb, axolotl, trl, training_args).
AXOLOTL_MARKERS = {"base_model", "micro_batch_size", "sequence_len", "adapter", "lora_target_linear",
                    "sample_packing", "num_epochs"}
TRL_MARKERS = {"max_length", "max_seq_length", "packing", "model_init_kwargs", "dataset_text_field", "padding_free",
                "completion_only_loss", "assistant_only_loss", "use_peft", "lora_r", "lora_target_modules",
                "model_name_or_path", "use_bnb_nested_quant"}
ACCELERATE_MARKERS = {"compute_environment", "distributed_type", "mixed_precision", "num_processes", "machine_rank",
                      "num_machines", "main_training_function"}
TA_MARKERS = {"per_device_train_batch_size", "optim", "gradient_accumulation_steps", "output_dir",
               "learning_rate", "num_train_epochs", "lr_scheduler_type"}

