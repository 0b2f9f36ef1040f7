"""``memplan.preflight`` (this module is ``memplan.check``, so that the name ``memplan.preflight`` stays the
function): the memory check a training script runs before it loads (or trains) a model.

    import memplan
    memplan.preflight("llama-2-7b-hf", training_args=args, lora_config=lora, bnb_config=bnb, seq_len=2048)
    # ... or, once loaded: memplan.preflight(model, training_args=args, seq_len=2048)

What it reads, most specific first (a later source only fills what an earlier one left open):

1. keyword overrides (``seq_len=``, ``batch_size=``, ``rank=`` ... any ``TrainSetup`` field);
2. a live model (a transformers ``PreTrainedModel`` or a peft ``PeftModel``, quantized or not): its config,
   its parameters by dtype (a bitsandbytes ``Params4bit`` packs two 4-bit values per byte: its
   ``quant_state.shape`` holds the logical count), what is trainable, the quantization state (4/8-bit, NF4 /
   FP4, nested = double quant, compute dtype), peft's LoRA config (rank, targets, dropout, adapter dtype),
   whether the non-quantized weights were upcast to fp32 (``prepare_model_for_kbit_training``), the attention
   implementation and gradient checkpointing. Reading attributes only: no tensor is created or moved, so the
   check uses no device memory;
3. ``TrainingArguments`` (micro-batch, ``optim``, bf16 / fp16, gradient checkpointing), a peft
   ``LoraConfig`` and a ``BitsAndBytesConfig`` -- the objects or their ``to_dict()``;
4. memplan's defaults (``memplan.setups``).

With a model *name* (catalog name, config.json path or local folder) or a transformers config nothing is
loaded at all. The estimate is ``memplan.estimate.estimate_for`` -- the same ``Estimate`` as ``memplan
estimate`` -- so a live model and the equivalent name-based setup give the same bytes.

What it compares with, first given wins:

- ``budget_bytes=``: the run fits when its estimated peak, CUDA context included, is at most this;
- ``gpu=``: a catalog card (or ``"24GiB"``): its memory minus the headroom, as ``memplan fit`` plans;
- otherwise the device: ``torch.cuda.mem_get_info`` (free, total) on ``device`` (default: the live model's
  device, else the current CUDA device). Reading it creates this process's CUDA context, which ``free``
  then no longer includes, and whatever torch's allocator of this process already holds (a model already
  loaded on the card) is also counted in the estimate. So the budget is ``free + memory_reserved + the
  card's CUDA-context default - headroom``. Tensors the estimate does not know of (a reference model, a
  second copy) make it optimistic. No CUDA device: ``NoDeviceError`` saying to pass ``gpu=`` or
  ``budget_bytes=``.

When the estimate is over the budget it raises ``memplan.WontFitError`` (``strict=False``: warns with
``PreflightWarning`` and returns the estimate). The message has the breakdown and the smallest changes that
fit (``memplan.fit.smallest_changes``: the largest micro-batch that fits, checkpointing, a paged 8-bit
optimizer, 8-bit / 4-bit weights), or ``memplan fit``'s plan for the budget when no single change is enough.

Importing this module imports no torch; reading a live model or the device imports torch then.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InvalidSetupError, MemplanError, UnreadableModelError, WontFitError
from .estimate import Estimate, estimate_for
from .setups import DEFAULT_SEQ_LEN, TrainSetup, resolve_setup
from .units import format_gib

__all__ = ["preflight", "read_live_model", "LiveModelInfo", "NoDeviceError", "PreflightWarning",
           "setup_fields_from_training_args", "setup_fields_from_lora_config", "setup_fields_from_bnb_config"]

_SETUP_FIELDS = tuple(f.name for f in fields(TrainSetup) if f.name not in ("model", "gpu"))
_TORCH_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                      "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16",
                      "bf16": "bf16", "float": "fp32", "half": "fp16"}


class NoDeviceError(MemplanError):
    """``preflight`` was asked to read the free memory of a CUDA device this machine does not have."""


class PreflightWarning(UserWarning):
    """``preflight(strict=False)``: the run does not fit (or could not be checked)."""


# ================================================================================================ live models
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


def _is_live_model(obj) -> bool:
    return hasattr(obj, "parameters") and callable(obj.parameters) and hasattr(obj, "config")


def _dtype_name(dtype) -> str:
    return _TORCH_DTYPE_NAMES.get(str(dtype), str(dtype).replace("torch.", ""))


def read_live_model(model) -> LiveModelInfo:
    """Read a loaded transformers / peft model (see the module docstring). Attributes only: no tensor work."""
    if not _is_live_model(model):
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
    config_dtype = _TORCH_DTYPE_NAMES.get(str(config_dtype)) if config_dtype else None

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


def _simplify_targets(spec, targets: str) -> str:
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


# ================================================================================================ config objects
def _as_dict(obj, what: str) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            return d
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    raise InvalidSetupError(f"cannot read {what} from {type(obj).__name__!r}; pass the object or its to_dict()")


def _mapped(obj, fmt: str, what: str) -> dict:
    """``TrainSetup`` fields from a config object through ``memplan.configs``' table for ``fmt`` (the same
    mapping as ``memplan estimate --config``)."""
    from .configs import map_training_config

    if obj is None:
        return {}
    cfg = map_training_config(_as_dict(obj, what), fmt, source=what)
    return dict(cfg.fields)


def setup_fields_from_training_args(args) -> dict:
    """``TrainSetup`` fields from a transformers ``TrainingArguments`` (or its ``to_dict()``): micro-batch,
    ``optim``, bf16 / fp16, gradient (activation) checkpointing."""
    return _mapped(args, "training_args", "training_args")


def setup_fields_from_lora_config(cfg) -> dict:
    """``TrainSetup`` fields from a peft ``LoraConfig`` (or its ``to_dict()``): rank, alpha, dropout, targets."""
    fields_ = _mapped(cfg, "peft", "lora_config")
    return {"method": "lora", **fields_} if cfg is not None else {}


def setup_fields_from_bnb_config(cfg) -> dict:
    """``TrainSetup`` fields from a transformers ``BitsAndBytesConfig`` (or its ``to_dict()``)."""
    return _mapped(cfg, "bnb", "bnb_config")


# ================================================================================================ the check
def _model_spec(model, profiles_dir):
    """(ModelSpec, LiveModelInfo or None) for whatever ``model`` is."""
    from .models import load_model, spec_from_config

    if isinstance(model, (str, os.PathLike)):
        return load_model(model, profiles_dir=profiles_dir), None
    if isinstance(model, dict):
        return spec_from_config(model, name=str(model.get("_name_or_path") or model.get("model_type"))), None
    if _is_live_model(model):
        info = read_live_model(model)
        return spec_from_config(info.config, name=info.name), info
    to_dict = getattr(model, "to_dict", None)
    if callable(to_dict) and getattr(model, "model_type", None):  # a transformers PretrainedConfig
        cfg = to_dict()
        return spec_from_config(cfg, name=str(cfg.get("_name_or_path") or cfg["model_type"])), None
    raise UnreadableModelError(
        f"cannot read a model from {type(model).__name__!r}; pass a catalog name, a config.json path or folder, "
        f"a transformers config, or a loaded transformers / peft model")


def _merge(*layers: dict) -> dict:
    """Later layers fill what earlier ones left unset (layers are given most specific first)."""
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            if k not in out and v is not None:
                out[k] = v
    return out


def _device_budget(device, live: LiveModelInfo | None, headroom: float, profiles_dir):
    """(budget bytes, GPUSpec, description) from the free memory of a CUDA device (module docstring)."""
    try:
        import torch
    except ImportError as exc:
        raise NoDeviceError("reading the free GPU memory needs torch; pass gpu= (a catalog card) or budget_bytes=") from exc
    from .gpus import gpu_from_device

    if not torch.cuda.is_available():
        raise NoDeviceError("no CUDA device is visible (torch.cuda.is_available() is False): pass gpu='3090' to plan "
                            "for a catalog card, or budget_bytes= for a memory budget")
    if device is None and live is not None and live.device and live.device.startswith("cuda"):
        device = live.device
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise NoDeviceError(f"device {str(dev)!r} is not a CUDA device; preflight checks GPU memory "
                            f"(pass gpu= or budget_bytes= to plan anyway)")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    reserved = torch.cuda.memory_reserved(index)
    props = torch.cuda.get_device_properties(index)
    gpu = gpu_from_device(props.name, int(total), f"{props.major}.{props.minor}",
                          source=f"torch.cuda on this machine: {props.name}", profiles_dir=profiles_dir)
    budget = int(free) + int(reserved) + gpu.cuda_context_bytes - gpu.headroom_bytes(headroom)
    what = (f"cuda:{index} ({gpu.label}): {format_gib(free, 2)} free + {format_gib(reserved, 2)} held by this "
            f"process + {format_gib(gpu.cuda_context_bytes, 2)} CUDA context - {headroom:.0%} headroom")
    return budget, gpu, what


def preflight(model, *, training_args=None, lora_config=None, bnb_config=None, seq_len: int | None = None,
              batch_size: int | None = None, device=None, gpu=None, budget_bytes: int | None = None,
              headroom: float | None = None, strict: bool = True, profiles_dir=None, **setup_fields) -> Estimate:
    """Check that a training run fits before it starts; returns its ``Estimate`` (see the module docstring).

    Raises ``WontFitError`` when it does not fit (``strict=False``: a ``PreflightWarning``), ``NoDeviceError``
    when there is no device to read and neither ``gpu`` nor ``budget_bytes`` is given (a warning when not
    strict), ``InvalidSetupError`` / ``UnreadableModelError`` / ``UnknownModelError`` for bad input.
    """
    from .gpus import DEFAULT_HEADROOM, load_gpu

    unknown = sorted(set(setup_fields) - set(_SETUP_FIELDS))
    if unknown:
        raise InvalidSetupError(f"preflight() got unknown setup field(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(_SETUP_FIELDS)}")
    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    spec, live = _model_spec(model, profiles_dir)

    explicit = dict(setup_fields, seq_len=seq_len, batch_size=batch_size)
    live_fields = live.setup_fields() if live is not None else {}
    from_args = setup_fields_from_training_args(training_args)
    from_lora = setup_fields_from_lora_config(lora_config)
    from_bnb = setup_fields_from_bnb_config(bnb_config)
    if from_bnb.get("bits") == 4 and from_lora:
        from_lora["method"] = "qlora"
    if live is not None and live.lora is not None and live_fields.get("targets"):
        live_fields["targets"] = _simplify_targets(spec, live_fields["targets"])
    if live is not None and live.lora is None and from_lora:
        # A base model not wrapped yet, and the LoraConfig the script will apply: get_peft_model freezes the
        # base (a freshly loaded model has requires_grad everywhere, which alone would read as full tuning).
        live_fields.pop("method", None)
        from_lora["method"] = "qlora" if live.bits == 4 else "lora"
    elif live is not None and live.lora is None and not live.trains_all:
        # A frozen base model and no LoraConfig: the script will add LoRA with peft's defaults.
        live_fields.setdefault("method", "qlora" if live.bits == 4 else "lora")
    # A model read live decides its precision; training_args' bf16/fp16 is the autocast dtype, which the
    # estimator does not model separately (the weights' compute dtype is what it uses).
    fields_ = _merge(explicit, live_fields, from_bnb, from_lora, from_args)
    notes: list[str] = []
    if live is not None:
        notes.append(f"read from the live model: {live.params_total:,} parameters "
                     f"({', '.join(f'{k} {v:,}' for k, v in sorted(live.values_by_dtype.items()))}), "
                     f"{live.params_trainable:,} trainable")
        for key, ours in (("lora_config", from_lora), ("bnb_config", from_bnb)):
            clash = {k: v for k, v in ours.items() if k in live_fields and live_fields[k] != v and k != "method"}
            if clash:
                notes.append(f"{key} differs from the live model ({', '.join(f'{k}={v!r}' for k, v in clash.items())}); "
                             f"the live model's values are used")
    if fields_.get("seq_len") is None:
        notes.append(f"no seq_len given: planned for {DEFAULT_SEQ_LEN} tokens per sequence; pass seq_len= "
                     f"(the longest batch your collator makes)")
    fields_ = {k: v for k, v in fields_.items() if k in _SETUP_FIELDS}
    setup = TrainSetup(model=spec.name, **fields_)

    # --- the budget
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise InvalidSetupError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
        gpu_spec = load_gpu(gpu, profiles_dir=profiles_dir) if isinstance(gpu, str) else gpu
        budget, what = budget_bytes, f"budget_bytes={budget_bytes:,} ({format_gib(budget_bytes, 2)})"
    elif gpu is not None:
        gpu_spec = load_gpu(gpu, profiles_dir=profiles_dir) if isinstance(gpu, str) else gpu
        budget = gpu_spec.total_bytes - gpu_spec.headroom_bytes(headroom)
        what = f"{gpu_spec.label} ({format_gib(gpu_spec.total_bytes, 2)}) - {headroom:.0%} headroom"
    else:
        try:
            budget, gpu_spec, what = _device_budget(device, live, headroom, profiles_dir)
        except NoDeviceError as exc:
            if strict:
                raise
            warnings.warn(f"memplan preflight: {exc}; the run was not checked", PreflightWarning, stacklevel=2)
            resolved = resolve_setup(setup, spec)
            est = estimate_for(spec, resolved)
            return replace(est, notes=est.notes + tuple(notes) + (f"not checked: {exc}",))

    resolved = resolve_setup(setup, spec, gpu_spec)
    est = estimate_for(spec, resolved, gpu_spec)
    if live is not None and (live.lora is not None or live.trains_all):
        expected_total = est.params.total + (est.params.trainable if resolved.trains_lora else 0)
        if live.params_total != expected_total or live.params_trainable != est.params.trainable:
            notes.append(f"the live model has {live.params_total:,} parameters ({live.params_trainable:,} trainable); "
                         f"the estimate counts {expected_total:,} ({est.params.trainable:,}) from its config")
    notes.append(f"compared with {what}: {format_gib(budget, 2)}")
    est = replace(est, notes=est.notes + tuple(notes))
    if est.total_bytes <= budget:
        return est

    from .fit import fit_for, smallest_changes

    changes = smallest_changes(spec, resolved, gpu_spec, budget)
    message = _wont_fit_message(est, budget, what, changes)
    if not changes:
        message += "\n" + _fit_fallback(spec, resolved, gpu_spec, budget, fit_for)
    if strict:
        raise WontFitError(message, estimate=est, budget_bytes=budget, changes=changes)
    warnings.warn(message, PreflightWarning, stacklevel=2)
    return est


def _wont_fit_message(est: Estimate, budget: int, what: str, changes) -> str:
    from .render import describe_setup

    over = est.total_bytes - budget
    lines = [f"{est.setup.model} will not fit: an estimated {format_gib(est.total_bytes, 2)} at its peak "
             f"({est.peak_phase}), {format_gib(budget, 2)} available ({what}): {format_gib(over, 2)} short.",
             f"Plan: {describe_setup(est)}.",
             "Where it goes: " + ", ".join(f"{k} {format_gib(v, 2)}" for k, v in
                                            sorted(est.components.items(), key=lambda kv: -kv[1]) if v > 0)]
    if changes:
        lines.append("Smallest changes that fit (each on its own):")
        lines += [f"  - {c.description}: {format_gib(c.estimate.total_bytes, 2)}" for c in changes]
    return "\n".join(lines)


def _fit_fallback(spec, setup, gpu_spec, budget: int, fit_for) -> str:
    """``memplan fit``'s answer for the budget, keeping the sequence length and the adapter (no single change
    was enough)."""
    from dataclasses import replace as dc_replace

    from .gpus import custom_gpu
    from .render import describe_setup

    card = gpu_spec if gpu_spec is not None else custom_gpu(budget / 2**30)
    card = dc_replace(card, total_bytes=budget)  # headroom already taken out of the budget
    # The adapter (rank, targets) is the user's modelling choice: keep it, search precision, batch,
    # checkpointing and optimizer.
    result = fit_for(spec, setup, card, headroom=0.0, pinned=frozenset({"seq_len", "attn", "dtype", "rank", "targets"}))
    if result.recommended is not None:
        return (f"No single change is enough; memplan fit's plan for {format_gib(budget, 2)} with this adapter: "
                f"{describe_setup(result.recommended)} ({format_gib(result.recommended.total_bytes, 2)}).")
    where = (f"; the smallest catalog card it fits is the {result.smallest_gpu}" if result.smallest_gpu
             else "; no catalog card is large enough")
    return (f"Nothing fits {format_gib(budget, 2)} at sequence length {setup.seq_len}: the leanest plan "
            f"({describe_setup(result.leanest)}) needs {format_gib(result.leanest.total_bytes, 2)}{where}.")
