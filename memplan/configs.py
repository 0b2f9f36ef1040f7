"""Plan from the training config files users already have: transformers ``TrainingArguments`` JSON, TRL
``SFTConfig`` JSON / YAML, peft ``adapter_config.json``, a bitsandbytes ``BitsAndBytesConfig`` and axolotl YAML.

``load_training_config`` reads one file, recognises its format by content (not by extension) and maps every key
that changes training memory onto ``TrainSetup`` fields through one table per format (``TABLES``: config key ->
(setup field, converter)). Keys that matter for memory but that memplan does not model are reported in
``ignored`` with a reason, as a warning or a note. ``merge_configs`` layers several files (later files win, a
conflict is reported) and then the command-line flags. Pure standard library: pyyaml is imported only when a
YAML file is read.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidSetupError
from .fileio import read_text
from .optimizers import resolve_optimizer
from .setups import TrainSetup

__all__ = ["TrainingConfig", "MergeReport", "load_training_config", "map_training_config", "merge_configs",
           "FORMATS", "TABLES"]

FORMATS = ("training_args", "axolotl", "trl", "peft", "bnb")
_FORMAT_NAMES = ("transformers TrainingArguments JSON (to_json_string), TRL SFTConfig JSON / YAML, peft "
                 "adapter_config.json (LoRA), bitsandbytes BitsAndBytesConfig JSON and axolotl YAML")


class _Skip:
    """A converter's answer for a value that sets no field: silent, or a note / warning with its reason."""

    __slots__ = ("level", "reason")

    def __init__(self, level: str = "silent", reason: str = ""):
        self.level, self.reason = level, reason


_SILENT = _Skip()
Converter = Callable[[Any, Mapping[str, Any]], Any]  # (value, the whole flattened file) -> value or _Skip


# ---------------------------------------------------------------------------------------------- converters


def _bool(v, raw=None) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise InvalidSetupError(f"expected true or false, got {v!r}")


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
    """TrainingArguments / axolotl ``bf16`` / ``fp16``; axolotl also allows ``bf16: auto``."""
    def conv(v, raw):
        if isinstance(v, str) and v.strip().lower() == "auto":
            return _Skip("note", "bf16 where the card has it, else fp16: memplan's default when the dtype is not given")
        return dtype if _bool(v) else _SILENT
    return conv


_TORCH_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
                 "float32": "fp32", "fp32": "fp32", "float": "fp32"}


def _torch_dtype(v, raw=None):
    """``torch_dtype`` / ``dtype`` / ``bnb_4bit_compute_dtype`` as transformers serialises them ("bfloat16")."""
    s = str(v).strip().lower().removeprefix("torch.")
    if s == "auto":
        return _Skip("note", "the checkpoint's dtype: memplan's default (bf16 where the card has it) applies")
    if s not in _TORCH_DTYPES:
        raise InvalidSetupError(f"unknown dtype {v!r}; expected bfloat16, float16 or float32")
    return _TORCH_DTYPES[s]


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
    return _Skip("warning", f"attention {s!r} is not modelled; estimated with memplan's default (sdpa)")


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
    return lambda v, raw: _Skip("warning", reason) if when(v, raw) else _SILENT


def _note(reason: str, when: Callable[[Any, Mapping], bool] = lambda v, raw: bool(v)) -> Converter:
    return lambda v, raw: _Skip("note", reason) if when(v, raw) else _SILENT


def _more_than_one(v, raw) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1


def _ckpt_kwargs(v, raw):
    """transformers 5 ``activation_checkpointing_kwargs``: ``every_n_layers`` > 1 and ``offload`` change the
    saved activations; ``use_reentrant`` and the rest do not."""
    if isinstance(v, Mapping) and ((v.get("every_n_layers") or 1) != 1 or v.get("offload")):
        return _Skip("warning", "partial or offloaded checkpointing is not modelled: every layer is counted as "
                                "checkpointed on the GPU")
    return _SILENT


def _eval_batch(train_key: str) -> Converter:
    def conv(v, raw):
        evaluates = raw.get("eval_strategy", "no") not in ("no", None) or raw.get("do_eval") is True \
            or train_key == "micro_batch_size"
        if evaluates and isinstance(v, int) and isinstance(raw.get(train_key), int) and v > raw[train_key]:
            return _Skip("warning", f"evaluation is not modelled, and its logits (batch x sequence x vocabulary) at "
                                    f"batch {v} can exceed the training peak at {train_key} {raw[train_key]}")
        return _SILENT
    return conv


_DEEPSPEED = _warn("DeepSpeed ZeRO sharding/offload is NOT modelled: the estimate is one GPU holding everything")
_FSDP = _warn("FSDP sharding is NOT modelled: the estimate is one GPU holding everything")
_COMPILE = _warn("torch.compile changes activation memory (fusion, CUDA graphs); not modelled")
_SAVE = _warn("modules_to_save train a full-precision copy of those modules (weights, gradients, optimizer "
              "state): not modelled, the estimate is low")
_ACCUM = _note("no effect on the peak: each micro-batch's activations are freed before the next",
               _more_than_one)
_PACKING = _note("packing changes no per-step memory at a fixed length: modelled as full sequences of sequence_len")
_OFFLOAD = _warn("activation offloading to host memory is not modelled: activations are counted on the GPU")
_LIGER = _warn("Liger kernels (fused linear cross-entropy) are not modelled: logits + loss are counted in full")

# ------------------------------------------------------------------------------------------------- tables
# key -> (TrainSetup field or None, converter). A later key of the same field wins within one file.

# transformers 5.23 ``transformers/training_args.py`` ``TrainingArguments`` fields.
_TRAINING_ARGS: dict[str, tuple[str | None, Converter]] = {
    "model_name_or_path": ("model", lambda v, raw: str(v)),  # not a TrainingArguments field: run scripts add it
    "per_device_train_batch_size": ("batch_size", _int),
    "optim": ("optimizer", _optimizer),
    "gradient_checkpointing": ("grad_ckpt", _bool),  # deprecated alias in transformers 5
    "activation_checkpointing": ("grad_ckpt", _bool),  # transformers >= 5 name
    "bf16": ("dtype", _amp("bf16")),
    "fp16": ("dtype", _amp("fp16")),
    "tf32": (None, lambda v, raw: _SILENT),  # matmul precision only: no memory effect
    "gradient_checkpointing_kwargs": (None, _ckpt_kwargs),
    "activation_checkpointing_kwargs": (None, _ckpt_kwargs),
    "gradient_accumulation_steps": (None, _ACCUM),
    "per_device_eval_batch_size": (None, _eval_batch("per_device_train_batch_size")),
    "deepspeed": (None, _DEEPSPEED),
    "fsdp": (None, _FSDP),
    "parallelism_config": (None, _warn("parallelism (tensor / context parallel) is not modelled")),
    "torch_compile": (None, _COMPILE),
    "use_liger_kernel": (None, _LIGER),
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
    "packing": (None, _PACKING),
    "padding_free": (None, _note("padding-free batches hold fewer tokens than batch x max_length: modelled in "
                                 "full")),
    "activation_offloading": (None, _OFFLOAD),
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
    "lora_modules_to_save": (None, _SAVE),
    "use_dora": (None, _warn("DoRA (weight-decomposed LoRA) is not modelled")),
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
    "modules_to_save": (None, _SAVE),
    "use_dora": (None, _warn("DoRA (weight-decomposed LoRA) is not modelled")),
    "rank_pattern": (None, _warn("per-module ranks are not modelled: every module is counted at r")),
    "layers_to_transform": (None, _warn("LoRA on some layers only is not modelled: counted on every layer")),
    "exclude_modules": (None, _warn("excluded modules are not modelled: the estimate counts them adapted")),
    "target_parameters": (None, _warn("target_parameters (MoE experts) from a file are not modelled")),
    "trainable_token_indices": (None, _warn("trainable token embeddings are not modelled")),
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
    "bf16": ("dtype", _amp("bf16")),
    "fp16": ("dtype", _amp("fp16")),
    "bfloat16": ("dtype", _true_gives("bf16")),  # pure bf16 weights, no autocast
    "float16": ("dtype", _true_gives("fp16")),
    "tf32": (None, lambda v, raw: _SILENT),  # matmul precision only
    "flash_attention": ("attn", _true_gives("flash_attention_2")),
    "sdp_attention": ("attn", _true_gives("sdpa")),
    "eager_attention": ("attn", _true_gives("eager")),
    "xformers_attention": (None, _note("xformers memory-efficient attention is estimated as sdpa")),
    "flex_attention": (None, _note("flex attention is estimated as sdpa")),
    "s2_attention": (None, _warn("shifted-sparse attention is not modelled")),
    "sample_packing": (None, _PACKING),
    "gradient_accumulation_steps": (None, _ACCUM),
    "eval_batch_size": (None, _eval_batch("micro_batch_size")),
    "group_by_length": (None, _note("batches grouped by length: the peak is still the longest batch")),
    "auto_find_batch_size": (None, _note("the Trainer halves the batch after an out-of-memory error")),
    "deepspeed": (None, _DEEPSPEED),
    "fsdp": (None, _FSDP),
    "fsdp_config": (None, _warn("FSDP sharding is NOT modelled: the estimate is one GPU holding everything",
                                lambda v, raw: bool(v) and not raw.get("fsdp"))),  # FSDP2 configs set only this
    "torch_compile": (None, _COMPILE),
    "lora_modules_to_save": (None, _SAVE),
    "peft_use_dora": (None, _warn("DoRA (weight-decomposed LoRA) is not modelled")),
    "peft_layers_to_transform": (None, _warn("LoRA on some layers only is not modelled: counted on every layer")),
    "unfrozen_parameters": (None, _warn("partly unfrozen base parameters are not modelled")),
    "activation_offloading": (None, _OFFLOAD),
    "plugins": (None, _warn("plugins (Liger, Cut Cross Entropy) are not modelled: logits + loss counted in full",
                            lambda v, raw: any("liger" in str(p).lower() or "cut_cross" in str(p).lower()
                                               for p in (v or ())))),
    "liger_fused_linear_cross_entropy": (None, _LIGER),
    "cut_cross_entropy": (None, _warn("Cut Cross Entropy is not modelled: logits + loss counted in full")),
    "chunked_cross_entropy": (None, _warn("chunked cross-entropy is not modelled: logits + loss counted in full")),
}

TABLES: dict[str, dict[str, tuple[str | None, Converter]]] = {
    "training_args": _TRAINING_ARGS, "trl": _TRL, "peft": _PEFT, "bnb": _BNB, "axolotl": _AXOLOTL}

# Keys that cannot both be on (compared without dotted prefix or leading "_"): InvalidSetupError rather than
# "the later key wins".
_EXCLUSIVE = ({"load_in_4bit", "load_in_8bit"}, {"bf16", "fp16"})
_NESTED = ("model_init_kwargs", "quantization_config", "bnb_config_kwargs")  # dicts read as dotted keys

# Detection markers (checked in the order peft, bnb, axolotl, trl, training_args).
_AXOLOTL_MARKERS = {"base_model", "micro_batch_size", "sequence_len", "adapter", "lora_target_linear",
                    "sample_packing", "num_epochs"}
_TRL_MARKERS = {"max_length", "max_seq_length", "packing", "model_init_kwargs", "dataset_text_field", "padding_free",
                "completion_only_loss", "assistant_only_loss", "use_peft", "lora_r", "lora_target_modules",
                "model_name_or_path", "use_bnb_nested_quant"}
_TA_MARKERS = {"per_device_train_batch_size", "optim", "gradient_accumulation_steps", "output_dir",
               "learning_rate", "num_train_epochs", "lr_scheduler_type"}


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class TrainingConfig:
    """One training config file read into ``TrainSetup`` fields.

    ``used`` lists (config key, value in the file, setup field) for every key that set a field; ``ignored``
    lists (key, reason) for keys that matter for memory but are not modelled (each also in ``warnings`` or
    ``notes``)."""

    path: str
    format: str
    model: str | None
    fields: dict
    used: tuple[tuple[str, Any, str], ...]
    ignored: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "model": self.model, "fields": dict(self.fields),
                "used": [{"key": k, "value": v, "field": f} for k, v, f in self.used],
                "ignored": [{"key": k, "reason": r} for k, r in self.ignored],
                "warnings": list(self.warnings), "notes": list(self.notes)}


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)


def _read(p: Path) -> tuple[dict, bool]:
    """The file's top-level mapping, and whether it was YAML."""
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise ConfigError(f"{p}: the folder holds no adapter_config.json; pass a config file")
        p = p / "adapter_config.json"
    text = read_text(p, missing="config file not found")
    is_yaml = p.suffix.lower() in (".yml", ".yaml") or (p.suffix.lower() != ".json" and
                                                        not text.lstrip().startswith("{"))
    if is_yaml:
        try:
            import yaml  # lazy: only YAML files need pyyaml (the `yaml` extra)
        except ImportError:
            raise ConfigError(f"{p}: reading YAML needs pyyaml: pip install 'memplan[yaml]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            if p.suffix.lower() not in (".yml", ".yaml"):  # neither JSON nor YAML: say what is read
                raise ConfigError(f"{p}: not a training config memplan recognises; it reads {_FORMAT_NAMES}") from None
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            msg = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"{p}: invalid YAML{where}: {msg}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        if is_yaml and p.suffix.lower() not in (".yml", ".yaml"):
            raise ConfigError(f"{p}: not a training config memplan recognises; it reads {_FORMAT_NAMES}")
        raise ConfigError(f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data, is_yaml


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out[key] = v
        if k in _NESTED and isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
    return out


def _detect(raw: Mapping) -> str | None:
    keys = set(raw)
    if "peft_type" in keys:
        return "peft"
    training = _AXOLOTL_MARKERS | _TRL_MARKERS | _TA_MARKERS
    if raw.get("quant_method") == "bitsandbytes" or (not keys & training and (
            keys & {"load_in_4bit", "load_in_8bit"} or any(k.startswith(("bnb_4bit_", "llm_int8_")) for k in keys))):
        return "bnb"
    if keys & _AXOLOTL_MARKERS:
        return "axolotl"
    if keys & _TRL_MARKERS:
        return "trl"
    if keys & {"per_device_train_batch_size", "optim"} or len(keys & _TA_MARKERS) >= 2:
        return "training_args"
    return None


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read one training config file and map it onto ``TrainSetup`` fields.

    Args:
        path: a TrainingArguments / TRL JSON, a TRL or axolotl YAML, a peft adapter_config.json (or the adapter
            folder holding it) or a BitsAndBytesConfig JSON. The format is recognised by content.

    Returns:
        The ``TrainingConfig``: fields set, keys used, keys ignored with a reason, warnings and notes.

    Raises:
        ConfigError: a missing or unparsable file, or a format memplan does not recognise.
        InvalidSetupError: a bad value (unknown optimizer, 4 and 8 bits at once ...), naming file and key.
    """
    p = Path(path)
    raw, hand_written = _read(p)
    fmt = _detect(raw)
    if fmt is None:
        if "model_type" in raw:
            raise ConfigError(f"{p}: a model config.json (model_type {raw['model_type']!r}); pass it as MODEL or "
                              f"--model, not --config")
        raise ConfigError(f"{p}: not a training config memplan recognises; it reads {_FORMAT_NAMES}")
    return map_training_config(raw, fmt, source=str(path), hand_written=hand_written)


def map_training_config(raw: Mapping[str, Any], fmt: str, *, source: str, hand_written: bool = False) -> TrainingConfig:
    """Map one config's values (a parsed file, or ``to_dict()`` of a ``TrainingArguments`` / ``LoraConfig`` /
    ``BitsAndBytesConfig`` object: ``memplan.preflight`` uses this) of format ``fmt`` (one of ``FORMATS``) onto
    ``TrainSetup`` fields. ``source`` names it in messages; ``hand_written`` turns on the misspelt-key check."""
    if fmt not in TABLES:
        raise ConfigError(f"{source}: unknown config format {fmt!r}; allowed: {', '.join(FORMATS)}")
    p = source
    if fmt == "peft" and str(raw.get("peft_type")).rsplit(".", 1)[-1].upper() != "LORA":
        raise ConfigError(f"{p}: peft_type {str(raw.get('peft_type')).rsplit('.', 1)[-1]!r} is not modelled; "
                          f"memplan plans LoRA adapters "
                          f"(peft_type LORA)")
    flat = _flatten(raw)
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    used: list[tuple[str, Any, str]] = []
    ignored: list[tuple[str, str]] = []
    warnings: list[str] = []
    notes: list[str] = []
    for key, (field, conv) in TABLES[fmt].items():
        value = flat.get(key)
        if value is None or value == "":  # YAML `key:` with nothing after it is unset
            continue
        try:
            out = conv(value, flat)
        except InvalidSetupError as exc:
            raise InvalidSetupError(f"{p}: {key}: {exc}") from None
        if isinstance(out, _Skip):
            if out.level != "silent":
                ignored.append((key, out.reason))
                (warnings if out.level == "warning" else notes).append(f"{key}={_show(value)}: {out.reason}")
            continue
        prev = origin.get(field)
        if prev is not None and fields[field] != out:
            if {prev.rsplit(".", 1)[-1].lstrip("_"), key.rsplit(".", 1)[-1].lstrip("_")} in _EXCLUSIVE:
                raise InvalidSetupError(f"{p}: contradictory settings {prev}: {_show(flat[prev])} and "
                                        f"{key}: {_show(value)}; keep one")
            warnings.append(f"{prev}={_show(flat[prev])} and {key}={_show(value)} both set {field}; using {key}")
        if prev is not None:
            used = [u for u in used if u[0] != prev]
        fields[field], origin[field] = out, key
        used.append((key, value, field))
    if fmt == "axolotl":
        _axolotl_post(flat, fields, used, ignored, warnings, notes)
    if fields.get("method") == "qlora" and fields.get("bits") not in (None, 4):
        raise InvalidSetupError(f"{p}: contradictory settings {origin['method']}: qlora and "
                                f"{origin['bits']}: {_show(flat[origin['bits']])} (QLoRA is 4-bit); keep one")
    if hand_written:  # JSON files are written by the libraries themselves: no typos to catch
        warnings += _typos(raw, TABLES[fmt])
    model = fields.pop("model", None)
    return TrainingConfig(source, fmt, model, fields, tuple(used), tuple(ignored), tuple(warnings), tuple(notes))


def _typos(raw: Mapping, table: Mapping) -> list[str]:
    """A key close to one memplan reads (``micro_batchsize``) is probably a typo the training tool rejects or
    ignores; a documented extension of a read key (``eval_sample_packing``, ``torch_compile_mode``) is not."""
    out = []
    top = [t for t in table if "." not in t]
    for key in raw:
        if key in table or any(key.startswith(t + "_") or key.endswith("_" + t) for t in top):
            continue
        hits = difflib.get_close_matches(key, top, n=1, cutoff=0.85)
        if hits:
            out.append(f"{key}: not a key memplan reads (did you mean {hits[0]}?)")
    return out


def _axolotl_post(flat, fields, used, ignored, warnings, notes) -> None:
    """axolotl rules that span keys: no adapter trains every parameter; offloaded checkpointing."""
    if not flat.get("adapter"):
        fields["method"] = "full"
        used.append(("adapter", None, "method"))
        notes.append("adapter=null: axolotl trains every parameter (full fine-tuning)")
    ckpt = flat.get("gradient_checkpointing")
    if isinstance(ckpt, str) and ckpt.strip().lower() in ("offload", "unsloth"):
        reason = "checkpoints offloaded to host memory are not modelled: counted on the GPU"
        ignored.append(("gradient_checkpointing", reason))
        warnings.append(f"gradient_checkpointing={ckpt}: {reason}")


# ------------------------------------------------------------------------------------------------ merging


@dataclass(frozen=True)
class MergeReport:
    """What ``merge_configs`` did: the files, where the model came from, file-over-file conflicts and the flags
    that overrode a file."""

    configs: tuple[TrainingConfig, ...]
    model_source: str | None  # a file's path, or None when the model was given directly
    conflicts: tuple[str, ...]
    overrides: tuple[str, ...]

    def lines(self) -> list[tuple[str, str]]:
        """(kind, text) lines for a terminal: kind is "used", "warning" or "note"."""
        out: list[tuple[str, str]] = []
        for c in self.configs:
            used = ", ".join(f"{k}={_show(v)} -> {f}" for k, v, f in c.used) or "no setting memplan models"
            out.append(("used", f"from {c.path}: {used}"))
            out += [("warning", f"warning: {c.path}: {w}") for w in c.warnings]
            out += [("note", f"note: {c.path}: {n}") for n in c.notes]
        out += [("warning", f"warning: {w}") for w in self.conflicts]
        out += [("note", f"note: {o}") for o in self.overrides]
        return out

    def to_dict(self) -> dict:
        return {"files": [c.to_dict() for c in self.configs], "model_source": self.model_source,
                "conflicts": list(self.conflicts), "overrides": list(self.overrides)}


def _same_model(a: str, b: str) -> bool:
    """Names that differ only by org, case or an ``-hf`` suffix (``meta-llama/Llama-2-7b-hf``, ``llama-2-7b``)
    are the same model to a reader: no conflict to report."""
    def norm(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")
    return norm(a) == norm(b)


def _key_for(cfg: TrainingConfig, field: str) -> str:
    return next((k for k, _, f in reversed(cfg.used) if f == field), field)


def merge_configs(configs: Iterable[TrainingConfig], flags: Mapping[str, Any], model: str | None = None
                  ) -> tuple[TrainSetup, frozenset[str], MergeReport]:
    """Layer config files (later ones win) and then flags into one ``TrainSetup``.

    Args:
        configs: loaded files, in the order given; a later file overrides an earlier one (reported).
        flags: ``TrainSetup`` field -> value from the command line; ``None`` means not given.
        model: the model named directly (positional MODEL or ``--model``); else the last file that names one.

    Returns:
        (setup, pinned, report): ``pinned`` holds every knob set by a file or a flag (``fit`` keeps them).

    Raises:
        ConfigError: no model anywhere.
    """
    configs = tuple(configs)
    values: dict[str, Any] = {}
    source: dict[str, TrainingConfig] = {}
    conflicts: list[str] = []
    overrides: list[str] = []
    file_model, model_source = None, None
    for cfg in configs:
        if cfg.model is not None:
            if file_model is not None and not _same_model(cfg.model, file_model):
                conflicts.append(f"model {file_model} from {model_source} overridden by {cfg.model} from {cfg.path}")
            file_model, model_source = cfg.model, cfg.path
        for field, value in cfg.fields.items():
            if field in values and values[field] != value:
                prev = source[field]
                k1, k2 = _key_for(prev, field), _key_for(cfg, field)
                conflicts.append(f"{k1} {_show(values[field])} from {prev.path} overridden by {_show(value)} from "
                                 f"{cfg.path}" + (f" ({k2})" if k2 != k1 else ""))
            values[field], source[field] = value, cfg
    given = {f: v for f, v in flags.items() if v is not None}
    for field, value in given.items():
        if field in values and values[field] != value:
            overrides.append(f"flag {field}={_show(value)} overrides {_key_for(source[field], field)}="
                             f"{_show(values[field])} from {source[field].path}")
    pinned = frozenset(values) | frozenset(given)
    values.update(given)
    if model is None:
        model = file_model
    else:
        if file_model is not None and not _same_model(file_model, model):
            overrides.append(f"model {model} overrides {file_model} from {model_source}")
        model_source = None
    if model is None:
        where = f" and none of {', '.join(c.path for c in configs)} names one" if configs else ""
        raise ConfigError(f"no model given{where}; pass MODEL (memplan models), --model NAME, or a --config that "
                          f"names it (axolotl base_model, peft base_model_name_or_path, model_name_or_path)")
    values.pop("model", None)
    setup = TrainSetup(model=model, **values)
    return setup, pinned - {"model", "gpu"}, MergeReport(configs, model_source, tuple(conflicts), tuple(overrides))
