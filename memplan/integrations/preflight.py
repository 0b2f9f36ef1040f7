"""``memplan.preflight``: the memory check a training script runs before it loads (or trains) a model.

    import memplan
    memplan.preflight("llama-2-7b-hf", training_args=args, lora_config=lora, bnb_config=bnb, seq_len=2048)
    # ... or, once loaded: memplan.preflight(model, training_args=args, seq_len=2048)

What it reads, least specific first; a later source wins (``memplan.integrations.training_configs.merge_layers``,
the rule ``--config`` follows too):

1. memplan's defaults (``memplan.plan.setup``);
2. ``TrainingArguments`` (micro-batch, ``optim``, bf16 / fp16, gradient checkpointing), a peft ``LoraConfig``
   and a ``BitsAndBytesConfig`` -- the objects or their ``to_dict()``, through the same tables as ``--config``;
3. a live model (a transformers ``PreTrainedModel`` or a peft ``PeftModel``, quantized or not), read from its
   attributes only (``memplan.integrations.live_model``): no tensor is created or moved, so the check uses no
   device memory;
4. keyword arguments (``seq_len=``, ``batch_size=``, ``rank=`` ... any ``TrainSetup`` field).

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
fit (``memplan.plan.changes.smallest_changes``: the largest micro-batch that fits, checkpointing, a paged 8-bit
optimizer, 8-bit / 4-bit weights), or ``memplan fit``'s plan for the budget when no single change is enough.

Importing this module imports no torch; reading a live model or the device imports torch then.
"""


from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields, replace

from memplan.errors import InvalidSetupError, MemplanError, UnreadableModelError, WontFitError
from memplan.plan.breakdown import COMPONENT_LABELS
from memplan.plan.budget import Budget, check_headroom
from memplan.plan.estimate import Estimate, estimate_for
from memplan.plan.setup import DEFAULT_SEQ_LEN, TrainSetup, describe_setup, resolve_setup
from memplan.plan.versions import describe_versions
from memplan.units import format_gib

from .live_model import LiveModelInfo, is_live_model, read_live_model, simplify_targets
from .training_configs import map_training_config, merge_layers

__all__ = ["preflight", "check", "Checked", "NoDeviceError", "PreflightWarning", "setup_fields_from_training_args",
           "setup_fields_from_lora_config", "setup_fields_from_bnb_config"]

# (versions: preflight checks the run of this process, so it plans for the libraries installed here)
_SETUP_FIELDS = tuple(f.name for f in fields(TrainSetup) if f.name not in ("model", "gpu", "versions"))


class NoDeviceError(MemplanError):
    """``preflight`` was asked to read the free memory of a CUDA device this machine does not have."""


class PreflightWarning(UserWarning):
    """``preflight(strict=False)``: the run does not fit (or could not be checked)."""


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


def _model_spec(model, profiles_dir):
    """(ModelSpec, LiveModelInfo or None) for whatever ``model`` is."""
    from memplan.catalog.models import load_model, spec_from_config

    if isinstance(model, (str, os.PathLike)):
        return load_model(model, profiles_dir=profiles_dir), None
    if isinstance(model, dict):
        return spec_from_config(model, name=str(model.get("_name_or_path") or model.get("model_type"))), None
    if is_live_model(model):
        info = read_live_model(model)
        return spec_from_config(info.config, name=info.name), info
    to_dict = getattr(model, "to_dict", None)
    if callable(to_dict) and getattr(model, "model_type", None):  # a transformers PretrainedConfig
        cfg = to_dict()
        return spec_from_config(cfg, name=str(cfg.get("_name_or_path") or cfg["model_type"])), None
    raise UnreadableModelError(
        f"cannot read a model from {type(model).__name__!r}; pass a catalog name, a config.json path or folder, "
        f"a transformers config, or a loaded transformers / peft model")




def _device_budget(device, live: LiveModelInfo | None, headroom: float, profiles_dir):
    """(Budget, GPUSpec) from the free memory of a CUDA device (module docstring)."""
    try:
        import torch
    except ImportError as exc:
        raise NoDeviceError("reading the free GPU memory needs torch; pass gpu= (a catalog card) or "
                            "budget_bytes=") from exc
    from memplan.catalog.gpus import gpu_from_device

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
    what = (f"{format_gib(free, 2)} free + {format_gib(reserved, 2)} held by this process + "
            f"{format_gib(gpu.cuda_context_bytes, 2)} CUDA context - {headroom:.0%} headroom")
    held = int(headroom * gpu.total_bytes)  # of the card, as for a catalog card
    return Budget(int(free) + int(reserved) + gpu.cuda_context_bytes, gpu.cuda_context_bytes, held, what,
                  f"cuda:{index} ({gpu.label})"), gpu


@dataclass(frozen=True)
class Checked:
    """What ``check`` found: the estimate and the budget it was compared with (None: not checked)."""

    estimate: Estimate
    budget: Budget | None


def preflight(model, *, training_args=None, lora_config=None, bnb_config=None, seq_len: int | None = None,
              batch_size: int | None = None, device=None, gpu=None, budget_bytes: int | None = None,
              headroom: float | None = None, strict: bool = True, profiles_dir=None, **setup_fields) -> Estimate:
    """Check that a training run fits before it starts; returns its ``Estimate`` (see the module docstring).

    Raises ``WontFitError`` when it does not fit (``strict=False``: a ``PreflightWarning``), ``NoDeviceError``
    when there is no device to read and neither ``gpu`` nor ``budget_bytes`` is given (a warning when not
    strict), ``InvalidSetupError`` / ``UnreadableModelError`` / ``UnknownModelError`` for bad input.
    """
    return check(model, training_args=training_args, lora_config=lora_config, bnb_config=bnb_config,
                 seq_len=seq_len, batch_size=batch_size, device=device, gpu=gpu, budget_bytes=budget_bytes,
                 headroom=headroom, strict=strict, profiles_dir=profiles_dir, **setup_fields).estimate


def check(model, *, training_args=None, lora_config=None, bnb_config=None, seq_len: int | None = None,
          batch_size: int | None = None, device=None, gpu=None, budget_bytes: int | None = None,
          headroom: float | None = None, strict: bool = True, profiles_dir=None, **setup_fields) -> Checked:
    """``preflight``, returning the budget beside the estimate (the Trainer callback says both)."""
    from memplan.catalog.gpus import as_gpu

    if "versions" in setup_fields:
        raise InvalidSetupError(f"preflight checks the run of this process, with the libraries installed here "
                                f"({describe_versions(None)}); versions= plans another stack: use memplan.estimate "
                                f"or memplan estimate --versions")
    unknown = sorted(set(setup_fields) - set(_SETUP_FIELDS))
    if unknown:
        raise InvalidSetupError(f"preflight() got unknown setup field(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(_SETUP_FIELDS)}")
    headroom = check_headroom(headroom)
    spec, live = _model_spec(model, profiles_dir)

    explicit = dict(setup_fields, seq_len=seq_len, batch_size=batch_size)
    live_fields = live.setup_fields() if live is not None else {}
    from_args = setup_fields_from_training_args(training_args)
    from_lora = setup_fields_from_lora_config(lora_config)
    from_bnb = setup_fields_from_bnb_config(bnb_config)
    if from_bnb.get("bits") == 4 and from_lora:
        from_lora["method"] = "qlora"
    if live is not None and live.lora is not None and live_fields.get("targets"):
        live_fields["targets"] = simplify_targets(spec, live_fields["targets"])
    if live is not None and live.lora is None and from_lora:
        # A base model not wrapped yet, and the LoraConfig the script will apply: get_peft_model freezes the
        # base (a freshly loaded model has requires_grad everywhere, which alone would read as full tuning).
        live_fields.pop("method", None)
        from_lora["method"] = "qlora" if live.bits == 4 else "lora"
    elif live is not None and live.lora is None and not live.trains_all:
        # A frozen base model and no LoraConfig: the script will add LoRA with peft's defaults.
        live_fields.setdefault("method", "qlora" if live.bits == 4 else "lora")
    # A model read live decides the weights' dtype; training_args' bf16/fp16 is the autocast the Trainer runs
    # forward and loss under (the setup's ``autocast``, memplan.plan.precision).
    fields_ = merge_layers(_launched_ranks(), from_args, from_lora, from_bnb, live_fields, explicit)
    notes: list[str] = []
    if live is not None:
        notes.append(f"read from the live model: {live.params_total:,} parameters "
                     f"({', '.join(f'{k} {v:,}' for k, v in sorted(live.values_by_dtype.items()))}), "
                     f"{live.params_trainable:,} trainable")
        for key, ours in (("lora_config", from_lora), ("bnb_config", from_bnb)):
            clash = {k: v for k, v in ours.items() if k in live_fields and live_fields[k] != v and k != "method"}
            if clash:
                shown = ", ".join(f"{k}={v!r}" for k, v in clash.items())
                notes.append(f"{key} differs from the live model ({shown}); the live model's values are used")
    if fields_.get("seq_len") is None:
        notes.append(f"no seq_len given: planned for {DEFAULT_SEQ_LEN} tokens per sequence; pass seq_len= "
                     f"(the longest batch your collator makes)")
    fields_ = {k: v for k, v in fields_.items() if k in _SETUP_FIELDS}
    setup = TrainSetup(model=spec.name, **fields_)

    # --- the budget
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise InvalidSetupError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
        gpu_spec = as_gpu(gpu, profiles_dir=profiles_dir)
        budget = Budget.of_limit(budget_bytes)
    elif gpu is not None:
        gpu_spec = as_gpu(gpu, profiles_dir=profiles_dir)
        budget = Budget.for_gpu(gpu_spec, headroom)
    else:
        try:
            budget, gpu_spec = _device_budget(device, live, headroom, profiles_dir)
        except NoDeviceError as exc:
            if strict:
                raise
            warnings.warn(f"memplan preflight: {exc}; the run was not checked", PreflightWarning, stacklevel=3)
            resolved = resolve_setup(setup, spec)
            est = estimate_for(spec, resolved)
            return Checked(replace(est, notes=est.notes + tuple(notes) + (f"not checked: {exc}",)), None)

    resolved = resolve_setup(setup, spec, gpu_spec)
    est = estimate_for(spec, resolved, gpu_spec)
    if live is not None and (live.lora is not None or live.trains_all):
        expected_total = est.params.total + (est.params.trainable if resolved.trains_lora else 0)
        if live.params_total != expected_total or live.params_trainable != est.params.trainable:
            notes.append(f"the live model has {live.params_total:,} parameters ({live.params_trainable:,} trainable); "
                         f"the estimate counts {expected_total:,} ({est.params.trainable:,}) from its config")
    notes.append(f"compared with the {budget.describe()}")
    notes.append(f"library versions: {describe_versions(resolved.versions)}")
    est = replace(est, notes=est.notes + tuple(notes))
    if budget.fits(est.total_bytes):
        return Checked(est, budget)

    from memplan.plan.changes import smallest_changes

    changes = smallest_changes(spec, resolved, gpu_spec, budget)
    message = _wont_fit_message(est, budget, changes)
    if not changes:
        message += "\n" + _fit_fallback(spec, resolved, gpu_spec, budget)
    if strict:
        raise WontFitError(message, estimate=est, budget_bytes=budget.limit_bytes, changes=changes)
    warnings.warn(message, PreflightWarning, stacklevel=3)
    return Checked(est, budget)


def _wont_fit_message(est: Estimate, budget: Budget, changes) -> str:
    over = budget.shortfall(est.total_bytes)
    lines = [f"{est.setup.model} will not fit: an estimated {format_gib(est.total_bytes, 2)} at its peak "
             f"({est.peak_phase}) against the {budget.describe()}: {format_gib(over, 2)} over.",
             f"Plan: {describe_setup(est.setup)}.",
             "Where it goes: " + ", ".join(f"{COMPONENT_LABELS[k]} {format_gib(v, 2)}" for k, v in
                                            sorted(est.components.items(), key=lambda kv: -kv[1]) if v > 0)]
    if changes:
        lines.append("Smallest changes that fit (each on its own):")
        lines += [f"  - {c.description}: {format_gib(c.estimate.total_bytes, 2)}" for c in changes]
    return "\n".join(lines)


def _fit_fallback(spec, setup, gpu_spec, budget: Budget) -> str:
    """``memplan fit``'s answer for the budget, keeping the sequence length and the adapter (no single change
    was enough)."""
    from memplan.plan.search import fit_for

    # The adapter (rank, targets) is the user's modelling choice: keep it, search precision, batch,
    # checkpointing and optimizer. (headroom=0: the cards named for the leanest plan are judged on their total.)
    result = fit_for(spec, setup, gpu_spec, budget=budget, headroom=0.0,
                     pinned=frozenset({"seq_len", "attn", "dtype", "rank", "targets"}))
    limit = format_gib(budget.limit_bytes, 2)
    if result.recommended is not None:
        return (f"No single change is enough; memplan fit's plan for {limit} with this adapter: "
                f"{describe_setup(result.recommended.setup)} ({format_gib(result.recommended.total_bytes, 2)}).")
    where = (f"; the smallest catalog card it fits is the {result.smallest_gpu}" if result.smallest_gpu
             else "; no catalog card is large enough")
    return (f"Nothing fits {limit} at sequence length {setup.seq_len}: the leanest plan "
            f"({describe_setup(result.leanest.setup)}) needs {format_gib(result.leanest.total_bytes, 2)}{where}.")


def _launched_ranks() -> dict:
    """Inside torchrun / accelerate launch: the GPUs per node and nodes its environment says (LOCAL_WORLD_SIZE,
    WORLD_SIZE), so that a script's preflight plans one rank of its own launch; {} when not launched."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        return {}
    if world <= 1 or local < 1 or world % local:
        return {}
    return {"gpus": local, "nodes": world // local}
