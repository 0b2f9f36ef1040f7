"""The one model builder: the model a fine-tuning script trains, from a resolved ``TrainSetup``, on real or fake
tensors. ``memplan simulate``, ``memplan profile`` and ``memplan validate`` all build through it.

``build_training_model`` does what a user's script does -- transformers model from the config, bitsandbytes
4/8-bit base weights, ``peft.prepare_model_for_kbit_training``, gradient checkpointing, a LoRA adapter from
peft -- but never reads a checkpoint: the model is built from ``spec.config`` on the meta device and then
materialized, either as fake tensors (``fake=True``: no memory, any size, for ``memplan simulate``) or as
real tensors with random values (``fake=False``: ``memplan profile``'s runs on a CPU or a GPU). Values do not
change memory; shapes, dtypes and the modules built do.

Versions this reproduces: transformers 5.23, peft 0.21, bitsandbytes 0.50. Why it is built the way it is
(docs/memory-model.md, "How simulate builds a model", has the errors each alternative raises):

- Build and peft-wrap on ``torch.device("meta")``, never inside ``FakeTensorMode``: ``Module._apply`` has to
  swap fake parameters and fails with "Cannot swap t1 because it has weakref associated with it".
  ``accelerate.init_empty_weights`` is not used either: it leaves lm_head untied (13.11e9 instead of
  12.85e9 parameters for OPT-13B). ``to_empty()`` unties lm_head / embed_tokens, so ``tie_weights()`` follows.
- The bitsandbytes layers are swapped in on meta and quantized one layer at a time afterwards
  (``memplan.measure.quantize``): a real build never holds the whole float model, and a fake one holds nothing.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
import warnings
from dataclasses import dataclass, field

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from memplan.catalog.models.targets import lora_target_arg
from memplan.plan.setup import default_attention
from memplan.plan.versions import parse_version
from memplan.plan.weights import load_dtype

from .dtypes import torch_dtype
from .quantize import materialize_quantized, replace_with_bnb, stash_quantized_weights

__all__ = ["BuildInfo", "build_training_model", "hf_config"]

# config.json keys that are about a checkpoint, not the architecture: a pre-quantized checkpoint's
# quantization_config would make from_config quantize, auto_map points at remote code (never run).
_NOT_ARCHITECTURE = ("quantization_config", "auto_map", "_name_or_path", "transformers_version")


@dataclass
class BuildInfo:
    """What was built, for registering storages with a tracker and for reporting."""

    quantized_modules: list[str] = field(default_factory=list)  # full names of the bnb 4/8-bit layers
    quantized_weights: list[torch.Tensor] = field(default_factory=list)  # the packed 4-bit / int8 weights
    quant_tensors: list[torch.Tensor] = field(default_factory=list)  # quantization constants (absmax, codes, SCB)
    quantized_values: int = 0  # weight values stored in 4/8 bits
    attn_implementation: str = ""
    fake_mode: FakeTensorMode | None = None  # the mode the fake tensors belong to (enter it to run the model)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def build_training_model(spec, setup, *, device: str = "cpu", fake: bool = False,
                         attn_implementation: str | None = None, seed: int = 0):
    """The training model for a resolved ``setup`` (see ``memplan.plan.setup.resolve_setup``).

    Args:
        spec: the ``ModelSpec`` (``spec.config`` holds the config.json values).
        setup: a resolved ``TrainSetup``.
        device: where real tensors go (``fake=False``); fake tensors always live on "cpu".
        fake: build fake CPU tensors, in the ``FakeTensorMode`` that is active (or a new one), returned as
            ``info.fake_mode``: run the model inside it. The model is built on meta first, outside that mode.
        attn_implementation: overrides ``setup.attn`` (``simulate`` passes a registered CUDA-like one).
        seed: seeds the random values of a real build.

    Returns:
        ``(model, info)``: the model in train mode (a peft model for LoRA / QLoRA) and a ``BuildInfo``.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "You are using a model of type ... " and friends, once per build
    try:
        return _build(spec, setup, device=device, fake=fake, attn_implementation=attn_implementation, seed=seed)
    finally:
        hf_logging.set_verbosity(verbosity)


def _build(spec, setup, *, device: str, fake: bool, attn_implementation: str | None, seed: int):
    import transformers

    info = BuildInfo()
    attn = attn_implementation or setup.attn
    if attn == "flash_attention_2" and attn_implementation is None and importlib.util.find_spec("flash_attn") is None:
        # no flash_attn package (there is none for CPU): sdpa is the nearest kernel transformers can run
        attn = default_attention(spec, setup.versions)
        info.notes.append(f"flash_attention_2 needs the flash_attn package: built with {attn} attention")
    info.attn_implementation = attn

    cfg = hf_config(spec)
    auto = transformers.AutoModelForCausalLM if spec.is_causal_lm else transformers.AutoModelForMaskedLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The meta build must not run under a FakeTensorMode (see the module docstring).
        with unset_fake_temporarily(), torch.device("meta"):
            # transformers 4.56 renamed from_config's torch_dtype= to dtype= (modeling_utils.py _from_config)
            dtype_kw = "dtype" if parse_version(transformers.__version__) >= (4, 56, 0) else "torch_dtype"
            model = auto.from_config(cfg, **{dtype_kw: torch_dtype(load_dtype(setup))}, attn_implementation=attn)
            if setup.bits in (4, 8):
                replace_with_bnb(model, spec, setup, info)
            model = _prepare(model, spec, setup)
        stash = stash_quantized_weights(model) if setup.bits in (4, 8) else {}
        shared = _shared_parameters(model)
        if fake:
            info.fake_mode = detect_fake_mode() or FakeTensorMode(allow_non_fake_inputs=True)
            with info.fake_mode:
                model.to_empty(device="cpu")
                _retie(model, shared)
                if setup.bits in (4, 8):
                    materialize_quantized(model, stash, setup, info, fake=True, device="cpu")
        else:
            torch.manual_seed(seed)
            model.to_empty(device=device)
            _init_real(model)
            _retie(model, shared)
            if setup.bits in (4, 8):
                materialize_quantized(model, stash, setup, info, fake=False, device=device)
    _name_the_loss(model, spec)
    model.train()
    if setup.bits == 8 and (fake or torch.device(device).type == "cpu"):
        info.notes.append(
            "int8: on CPU bitsandbytes trains Linear8bitLt through MatMul8bitFp (dequantize, then a float matmul); "
            "CUDA uses MatMul8bitLt (int8 matmul, saves the input and an int8 copy), so CPU int8 memory is not a "
            "GPU's")
    return model, info


def _name_the_loss(model, spec) -> None:
    """transformers derives ``loss_type`` from the class name and, for classes it cannot map (OPTForCausalLM
    ...), logs "`loss_type=None` was set in the config but it is unrecognized" at the first forward before
    using the default: name that default, so that the run prints nothing (modeling_utils.py loss_function)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # transformers < 4.46: each model computes its own loss, nothing to name
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "loss_type", None) not in LOSS_MAPPING:
        base.loss_type = "ForCausalLM" if spec.is_causal_lm else "ForMaskedLM"


def hf_config(spec):
    """The transformers config of ``spec`` from its config.json values: no download, no remote code, and
    ``use_cache`` off as trainers set it (a DynamicCache would keep K/V copies of every layer alive)."""
    import transformers

    values = {k: v for k, v in dict(spec.config).items() if k not in _NOT_ARCHITECTURE}
    model_type = values.pop("model_type", spec.model_type)
    cfg = transformers.AutoConfig.for_model(model_type, **values)
    cfg.use_cache = False
    return cfg


def _prepare(model, spec, setup):
    """prepare_model_for_kbit_training / gradient checkpointing / peft LoRA, as a training script does."""
    import peft

    gc = bool(setup.grad_ckpt)
    if setup.bits in (4, 8) and setup.upcast_non_quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif gc:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    if setup.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    cfg = adapter_config(spec, setup)
    import inspect

    # peft >= 0.12 keeps adapters in fp32 with autocast_adapter_dtype=True; older peft has no such argument and
    # gives them the base layer's float dtype (memplan.plan.versions, rule "adapters-in-base-dtype")
    kw = ({"autocast_adapter_dtype": setup.adapter_dtype == "fp32"}
          if "autocast_adapter_dtype" in inspect.signature(peft.get_peft_model).parameters else {})
    with _dora_on_meta(setup):
        model = peft.get_peft_model(model, cfg, **kw)
    dt = torch_dtype(setup.adapter_dtype)
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != dt and _is_adapter_parameter(name):
            p.data = p.data.to(dt)
        if setup.adapter == "lora-fa" and "lora_A" in name:
            p.requires_grad_(False)  # what peft.optimizers.create_lorafa_optimizer does to every lora_A
    return model


@contextmanager
def _dora_on_meta(setup):
    """DoRA's magnitude is the weight norm of W + BA, computed as the adapter is made (peft/tuners/lora/dora.py
    ``DoraLinearLayer.update_layer``); a 4/8-bit layer built on meta has no quantized values to dequantize yet
    (memplan.measure.quantize quantizes after the build), so the magnitude is made with its shape and dtype only --
    the norm's own dtype, fp32 from the fp32 adapter -- values do not change memory."""
    if setup.adapter != "dora" or setup.bits not in (4, 8):
        yield
        return
    from peft.tuners.lora.dora import DoraLinearLayer

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False):
        rows = base_layer.out_features
        self.weight = torch.nn.Parameter(torch.empty(rows, device=lora_A.device, dtype=torch.float32))

    original = DoraLinearLayer.update_layer
    DoraLinearLayer.update_layer = update_layer
    try:
        yield
    finally:
        DoraLinearLayer.update_layer = original


def _is_adapter_parameter(name: str) -> bool:
    """The adapter's own tensors, which take the adapter dtype; a trainable copy (modules_to_save) or the trainable
    token rows keep their module's dtype, as peft creates them (a deep copy; ``values.clone()``)."""
    return not ("modules_to_save" in name or "trainable_tokens_delta" in name)


def adapter_config(spec, setup):
    """The peft config a script passes to ``get_peft_model`` for ``setup``'s adapter (memplan.plan.adapters)."""
    import peft

    from memplan.plan.adapters import ia3_targets

    task = "CAUSAL_LM" if spec.is_causal_lm else None
    extra = {}
    if setup.modules_to_save:
        extra["modules_to_save"] = [m.strip() for m in setup.modules_to_save.split(",")]
    if setup.adapter == "ia3":
        targets, feedforward = ia3_targets(spec, setup.targets)
        return peft.IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward), task_type=task,
                              **extra)
    if setup.trainable_tokens:
        extra["trainable_token_indices"] = list(range(setup.trainable_tokens))  # which rows does not matter
    return peft.LoraConfig(
        r=setup.rank, lora_alpha=setup.alpha, target_modules=lora_target_arg(spec, setup.targets),
        lora_dropout=setup.lora_dropout, bias="none", task_type=task, use_dora=setup.adapter == "dora",
        use_rslora=setup.rslora, **extra,
    )


def _shared_parameters(model) -> list[list[tuple]]:
    """(module, name) slots that hold one and the same parameter (a tied lm_head and embedding), and (parent, name)
    slots that hold one and the same submodule (peft's trainable tokens of a tied lm_head share the embedding's
    ``ParameterDict``), found on meta before ``to_empty`` gives every slot its own storage. The second and later
    module slots are emptied until ``_retie``: ``to_empty`` on fake tensors swaps each parameter once ("Cannot swap
    t1 because it has weakref associated with it" on a second visit)."""
    slots: dict[int, list[tuple]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, name))
    children: dict[int, list[tuple]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                children.setdefault(id(child), []).append((parent, name))
    shared = [group for group in slots.values() if len(group) > 1]
    for first, *rest in (g for g in children.values() if len(g) > 1):
        shared.append([("module", *first), *(("module", *slot) for slot in rest)])
        for parent, name in rest:
            parent._modules[name] = None
    return shared


def _retie(model, shared: list[list[tuple]]) -> None:
    """Point every tied slot at the first one's parameter (or submodule) again. ``tie_weights()`` cannot: peft's
    wrappers of a tied lm_head (``ModulesToSaveWrapper``, ``TrainableTokensWrapper``) hide the module it expects."""
    for group in shared:
        if group[0][0] == "module":
            (_, first, first_name), *rest = group
            for _, parent, name in rest:
                parent._modules[name] = first._modules[first_name]
            continue
        (first, first_name), *rest = group
        for module, name in rest:
            module._parameters[name] = first._parameters[first_name]


@torch.no_grad()
def _init_real(model) -> None:
    """Random values for a real build: ``to_empty`` leaves memory uninitialized (NaNs would be legal).

    Parameters get N(0, 0.02) (matrices) / 1 (norm weights) / 0 (biases): values do not change memory. Buffers
    need their real values (rotary inv_freq, BERT position_ids): transformers' ``_init_weights`` computes
    them, module by module.
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        if any(True for _ in module.buffers(recurse=False)):
            base._init_weights(module)
