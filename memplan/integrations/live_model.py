"""Reading a loaded transformers / peft model: what it decides of the training setup, from attributes only.

``read_live_model`` finds the parameter counts by dtype (a bitsandbytes ``Params4bit`` packs two 4-bit values
per byte: its ``quant_state.shape`` holds the logical count), what is trainable, the quantization state (4/8-bit,
NF4 / FP4, nested = double quant, compute dtype), peft's LoRA config (rank, targets, dropout, adapter dtype),
whether the non-quantized weights were upcast to fp32 (``prepare_model_for_kbit_training``), the attention
implementation and gradient checkpointing. No tensor is created or moved, so reading uses no device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from memplan.errors import MemplanError, UnreadableModelError
from memplan.plan.dtypes import dtype_name

__all__ = ["LiveModelInfo", "read_live_model", "is_live_model", "simplify_targets"]


@dataclass(frozen=True)
class LiveModelInfo:
    """What ``read_live_model`` found on a loaded model (counts are logical values: a 4-bit weight is one
    value although two share a byte)."""

    config: dict  # model.config.to_dict()
    name: str
    params_total: int
    params_trainable: int
    params_quantized: int
    values_by_dtype: dict[str, int]  # "bf16" / "fp32" / "nf4" / "fp4" / "int8" -> values
    bytes_by_dtype: dict[str, int]  # the same keys -> storage bytes of the parameters (quant constants apart)
    bits: int  # 4 / 8 for bitsandbytes weights, else 16 / 32 from the frozen linear weights' dtype
    quant_type: str | None = None
    double_quant: bool | None = None
    compute_dtype: str | None = None  # bnb 4-bit compute dtype, or the half dtype of the weights
    upcast_non_quantized: bool | None = None  # norms / embeddings in fp32 next to quantized weights
    lora: dict | None = None  # rank, alpha, targets, lora_dropout, adapter_dtype of peft's active adapter
    trains_all: bool = False  # no peft and every parameter trainable: full fine-tuning
    attn: str | None = None
    grad_ckpt: bool = False
    device: str | None = None  # "cuda:0" / "cpu" of the first parameter

    def setup_fields(self) -> dict:
        """The ``TrainSetup`` fields this model decides."""
        out: dict[str, Any] = {"bits": self.bits}
        if self.bits == 4:
            out.update(quant_type=self.quant_type or "nf4", double_quant=bool(self.double_quant))
        if self.compute_dtype:
            out["dtype"] = self.compute_dtype
        if self.bits in (4, 8) and self.upcast_non_quantized is not None:
            out["upcast_non_quantized"] = self.upcast_non_quantized
        if self.lora is not None:
            out.update(method="qlora" if self.bits == 4 else "lora", rank=self.lora["rank"],
                       targets=self.lora["targets"], lora_dropout=self.lora["lora_dropout"],
                       adapter_dtype=self.lora["adapter_dtype"])
            if self.lora.get("alpha") is not None:
                out["alpha"] = int(self.lora["alpha"])
        elif self.trains_all:
            out["method"] = "full"
        elif self.bits == 4:
            out["method"] = "qlora"
        if self.attn in ("eager", "sdpa", "flash_attention_2"):
            out["attn"] = self.attn
        if self.grad_ckpt:
            out["grad_ckpt"] = True
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        d["model_type"] = self.config.get("model_type")
        return d


def is_live_model(obj) -> bool:
    return hasattr(obj, "parameters") and callable(obj.parameters) and hasattr(obj, "config")


def _dtype_name(dtype) -> str:
    """memplan's name of a torch dtype, or its own name for dtypes memplan does not plan with (int8 ...)."""
    return dtype_name(dtype) or str(dtype).replace("torch.", "")


def read_live_model(model) -> LiveModelInfo:
    """Read a loaded transformers / peft model (see the module docstring). Attributes only: no tensor work."""
    if not is_live_model(model):
        raise UnreadableModelError(
            f"cannot read a model from {type(model).__name__!r}: pass a transformers PreTrainedModel, a peft "
            f"PeftModel, a transformers config, a catalog name or a config.json path")
    config = model.config
    to_dict = getattr(config, "to_dict", None)
    cfg = to_dict() if callable(to_dict) else (dict(config) if isinstance(config, dict) else None)
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise UnreadableModelError(f"{type(model).__name__}.config has no model_type: not a transformers model")
    name = cfg.get("_name_or_path") or cfg["model_type"]

    total = trainable = quantized = 0
    values: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    bits4 = bits8 = False
    quant_type = compute = None
    nested = None
    device = None
    float_frozen: dict[str, int] = {}  # dtype -> values of frozen float weights (the base weights' dtype)
    for p in model.parameters():
        if device is None:
            device = str(p.device)
        kind = type(p).__name__
        qs = getattr(p, "quant_state", None)
        if kind == "Params4bit":
            n = int(qs.shape.numel()) if qs is not None and getattr(qs, "shape", None) is not None else 2 * p.numel()
            key = (getattr(qs, "quant_type", None) or getattr(p, "quant_type", None) or "nf4")
            bits4, quant_type = True, key
            nested = bool(getattr(qs, "nested", False)) if qs is not None else getattr(p, "compress_statistics", None)
            quantized += n
        elif kind == "Int8Params":
            n, key = p.numel(), "int8"
            bits8 = True
            quantized += n
        else:
            n, key = p.numel(), _dtype_name(p.dtype)
            if not p.requires_grad and p.dim() == 2:
                float_frozen[key] = float_frozen.get(key, 0) + n
        total += n
        values[key] = values.get(key, 0) + n
        nbytes[key] = nbytes.get(key, 0) + p.numel() * p.element_size()
        if p.requires_grad:
            trainable += n

    lin4_dtypes = set()
    for m in model.modules():
        cd = getattr(m, "compute_dtype", None)
        if type(m).__name__ == "Linear4bit" and cd is not None:
            lin4_dtypes.add(_dtype_name(cd))
    config_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    config_dtype = dtype_name(config_dtype) if config_dtype else None

    if bits4 or bits8:
        bits = 4 if bits4 else 8
        # prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32
        frozen_float = {k: v for k, v in values.items() if k in ("fp16", "bf16", "fp32")}
        # prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32. On a base model not
        # wrapped by peft yet the script may still call it: then leave memplan's default (upcast on).
        upcast = True if frozen_float and set(frozen_float) == {"fp32"} else None
        compute = (sorted(lin4_dtypes)[0] if lin4_dtypes else None) or config_dtype
        if compute == "fp32" or compute is None:
            compute = config_dtype if config_dtype in ("fp16", "bf16") else None
    else:
        main = max(float_frozen, key=float_frozen.get) if float_frozen else max(values, key=values.get)
        bits = 32 if main == "fp32" else 16
        upcast = None
        compute = main if main in ("fp16", "bf16") else ("fp32" if bits == 32 else None)

    lora = _read_peft(model)
    if (bits4 or bits8) and upcast is None and lora is not None:
        upcast = False  # wrapped by peft with half norms: prepare_model_for_kbit_training was not called
    trains_all = lora is None and total > 0 and trainable == total
    attn = getattr(config, "_attn_implementation", None) or cfg.get("_attn_implementation")
    # transformers 5 renamed it is_activation_checkpointing (the old name warns); peft forwards both
    grad_ckpt = bool(getattr(model, "is_activation_checkpointing", None)
                     if hasattr(model, "is_activation_checkpointing")
                     else getattr(model, "is_gradient_checkpointing", False))
    return LiveModelInfo(config=cfg, name=str(name), params_total=total, params_trainable=trainable,
                         params_quantized=quantized, values_by_dtype=values, bytes_by_dtype=nbytes, bits=bits,
                         quant_type=quant_type, double_quant=nested if bits4 else None, compute_dtype=compute,
                         upcast_non_quantized=upcast, lora=lora, trains_all=trains_all, attn=attn,
                         grad_ckpt=grad_ckpt, device=device)


def _read_peft(model) -> dict | None:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    cfg = peft_config.get(active) if active in peft_config else next(iter(peft_config.values()))
    if str(getattr(cfg, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise UnreadableModelError(f"peft adapter type {getattr(cfg, 'peft_type', None)!s} is not supported; "
                                   "memplan plans LoRA (and QLoRA) adapters")
    adapter_dtype = None
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_A." in n:
            adapter_dtype = _dtype_name(p.dtype)
            break
    return {"rank": int(cfg.r), "alpha": getattr(cfg, "lora_alpha", None),
            "targets": _targets_string(getattr(cfg, "target_modules", None)),
            "lora_dropout": float(getattr(cfg, "lora_dropout", 0.0) or 0.0),
            "adapter_dtype": adapter_dtype or "fp32"}


def _targets_string(target_modules) -> str | None:
    """peft's ``target_modules`` (a set after injection, a list, a regex string, "all-linear") as memplan's
    comma-separated string."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return target_modules
    return ",".join(sorted(str(t) for t in target_modules))


def simplify_targets(spec, targets: str) -> str:
    """peft stores the targets it adapted (for quantized models "all-linear" becomes every full module name):
    give back the shortest spelling that adapts the same modules -- "all-linear", or the short names."""
    try:
        adapted = sorted(spec.adapted_names(targets))
        short = ",".join(sorted({t.strip().rsplit(".", 1)[-1] for t in targets.split(",") if t.strip()}))
        for candidate in ("all-linear", short):
            if sorted(spec.adapted_names(candidate)) == adapted:
                return candidate
    except MemplanError:
        pass
    return targets
