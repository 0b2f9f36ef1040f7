"""Build the model a fine-tuning script trains, from a resolved ``TrainSetup``, on real or fake tensors.

``build_training_model`` does what a user's script does -- transformers model from the config, bitsandbytes
4/8-bit base weights, ``peft.prepare_model_for_kbit_training``, gradient checkpointing, a LoRA adapter from
peft -- but never reads a checkpoint: the model is built from ``spec.config`` on the meta device and then
materialized, either as fake tensors (``fake=True``: no memory, any size, for ``memplan simulate``) or as
real tensors with random values (``fake=False``: the CPU/GPU reference runs of the profiler).

Versions this reproduces: transformers 5.23, peft 0.21, bitsandbytes 0.50 (``shared/notes/feasibility.md``
holds the recipes and the exact errors of what does not work). Why it is built the way it is:

- Build and peft-wrap on ``torch.device("meta")``, never inside ``FakeTensorMode``: ``Module._apply`` has to
  swap fake parameters and fails with "Cannot swap t1 because it has weakref associated with it".
  ``accelerate.init_empty_weights`` is not used either: it leaves lm_head untied (13.11e9 instead of
  12.85e9 parameters for OPT-13B). ``to_empty()`` unties lm_head / embed_tokens, so ``tie_weights()`` follows.
- bitsandbytes' ``Params4bit`` / ``Int8Params`` cannot hold fake tensors ("Creating a new Tensor subclass
  Params4bit but the raw Tensor object is already associated to a python object of type FakeTensor"), and
  quantizing a fake or meta tensor fails (``.tolist()`` in ``create_dynamic_map``; "Cannot copy out of meta
  tensor"). Fake mode therefore gives each quantized layer a stand-in: a plain uint8 (4-bit) / int8 (8-bit)
  Parameter plus the quantization state bitsandbytes would create, with the exact shapes and dtypes of
  ``bnb.functional.quantize_4bit`` / ``Int8Params._quantize``. bnb's registered fake kernels
  (``gemm_4bit``, ``dequantize_4bit``, ``int8_*``) then produce the real sizes. Byte-identical to a real
  CPU QLoRA run (tests/test_trace.py).
- Only the modules bitsandbytes really replaces become quantized: transformers' ``replace_with_bnb_linear``
  swaps modules whose type is exactly ``nn.Linear`` or ``Conv1D``, minus the output embedding; the spec's
  ``LinearSpec.quantized_by_bnb`` says which (Falcon's ``FalconLinear`` and Mixtral's fused experts stay
  16-bit).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

__all__ = ["BuildInfo", "build_training_model", "make_optimizer", "TORCH_DTYPES", "lora_target_arg"]

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_NF4_BLOCK = 64  # bnb Params4bit default blocksize
_DQ_BLOCK = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256
_LLM_INT8_THRESHOLD = 6.0  # transformers BitsAndBytesConfig.llm_int8_threshold default
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


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
    """The training model for a resolved ``setup`` (see ``memplan.setups.resolve_setup``).

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
    import importlib.util

    import transformers

    info = BuildInfo()
    attn = attn_implementation or setup.attn
    if attn == "flash_attention_2" and attn_implementation is None and importlib.util.find_spec("flash_attn") is None:
        # no flash_attn package (there is none for CPU): sdpa is the nearest kernel transformers can run
        from memplan.setups import _NO_SDPA

        attn = "eager" if spec.model_type in _NO_SDPA else "sdpa"
        info.notes.append(f"flash_attention_2 needs the flash_attn package: built with {attn} attention")
    info.attn_implementation = attn

    cfg = transformers.AutoConfig.for_model(**spec.config)
    cfg.use_cache = False  # trainers do; a DynamicCache would keep K/V copies alive (feasibility.md §4)
    auto = transformers.AutoModelForMaskedLM if spec.model_type == "bert" else transformers.AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The meta build must not run under a FakeTensorMode (see the module docstring).
        with unset_fake_temporarily(), torch.device("meta"):
            model = auto.from_config(cfg, dtype=_param_dtype(setup), attn_implementation=attn)
            if setup.bits in (4, 8):
                _replace_with_bnb(model, spec, setup, info)
            model = _prepare(model, spec, setup)
        stash = _stash_quantized_weights(model, info) if setup.bits in (4, 8) else {}
        if fake:
            info.fake_mode = detect_fake_mode() or FakeTensorMode(allow_non_fake_inputs=True)
            with info.fake_mode:
                model.to_empty(device="cpu")
                _retie(model)
                if setup.bits in (4, 8):
                    _materialize_quantized(model, stash, setup, info, fake=True, device="cpu")
        else:
            torch.manual_seed(seed)
            model.to_empty(device=device)
            _init_real(model)
            _retie(model)
            if setup.bits in (4, 8):
                _materialize_quantized(model, stash, setup, info, fake=False, device=device)
    model.train()
    if setup.bits == 8 and (fake or torch.device(device).type == "cpu"):
        info.notes.append(
            "int8: on CPU bitsandbytes trains Linear8bitLt through MatMul8bitFp (dequantize, then a float matmul); "
            "CUDA uses MatMul8bitLt (int8 matmul, saves the input and an int8 copy), so CPU int8 memory is not a "
            "GPU's")
    return model, info


def make_optimizer(setup, params, *, foreach: bool | None = None, fake: bool = False, lr: float = 5e-5):
    """The optimizer a HF ``Trainer`` builds for ``setup.optimizer`` (transformers/trainer_optimizer.py).

    ``foreach=None`` is torch's default: the foreach (multi-tensor) implementation on CUDA, the per-tensor
    loop on CPU. ``simulate`` passes ``foreach=True`` for CUDA semantics. bitsandbytes optimizers build their
    quantile maps with ``.tolist()`` at construction, which fake tensors cannot do: they are constructed with
    fake mode switched off (``fake=True``), and step fine on fake tensors afterwards.
    """
    from memplan.optimizers import resolve_optimizer

    name = resolve_optimizer(setup.optimizer).name
    params = list(params)
    tkw = {} if foreach is None else {"foreach": foreach}
    if name in ("adamw_torch", "adam_torch", "adamw_torch_fused"):
        cls = torch.optim.AdamW if name != "adam_torch" else torch.optim.Adam
        kw = {"fused": True} if name == "adamw_torch_fused" else tkw
        return cls(params, lr=lr, **kw)
    if name in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd_momentum" else 0.0, **tkw)
    if name.startswith("rmsprop") and "bnb" not in name:
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9 if name == "rmsprop_momentum" else 0.0,
                                   centered=name == "rmsprop_centered", **tkw)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, **tkw)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    # bitsandbytes: what Trainer._get_bitsandbytes_optimizer builds
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    bits = 8 if "8bit" in name else 32
    if "adamw" in name:
        cls, kw = bnb.optim.AdamW, {"optim_bits": bits, "is_paged": "paged" in name}
    elif "lion" in name:
        cls, kw = bnb.optim.Lion, {"optim_bits": bits, "is_paged": "paged" in name}
    else:
        cls, kw = bnb.optim.RMSprop, {"optim_bits": bits}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        if fake:
            with unset_fake_temporarily():
                return cls(params, lr=lr, **kw)
        return cls(params, lr=lr, **kw)


def lora_target_arg(spec, targets: str):
    """``LoraConfig.target_modules`` for memplan's target string, as a user passes it to peft.

    A comma list becomes a list; "all-linear" stays; a bare module name that fully matches no module is the
    one-name list memplan means by it (see memplan.models); anything else is a regex peft full-matches.
    """
    s = targets.strip()
    if "," in s:
        return [t.strip() for t in s.split(",") if t.strip()]
    if s.lower() == "all-linear":
        return "all-linear"
    if _PLAIN_NAME.fullmatch(s) and not any(re.fullmatch(s, n) for n in spec.linear_module_names()):
        return [s]
    return s


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def _param_dtype(setup) -> torch.dtype:
    """dtype the base model is loaded in (``from_pretrained(dtype=...)``): fp32 at 32 bits, else the compute
    dtype; prepare_model_for_kbit_training may upcast the non-quantized part to fp32 afterwards."""
    return torch.float32 if setup.bits == 32 else TORCH_DTYPES[setup.dtype]


def _quantized_names(spec) -> set[str]:
    names = set()
    for lin in spec.layer_linears:
        if lin.quantized_by_bnb and lin.peft_target == "module":
            names.update(f"{spec.layer_prefix}.{i}.{lin.name}" for i in range(spec.num_layers))
    names.update(lin.name for lin in spec.top_linears if lin.quantized_by_bnb and lin.peft_target == "module")
    return names


def _replace_with_bnb(model, spec, setup, info: BuildInfo) -> None:
    """transformers.integrations.bitsandbytes.replace_with_bnb_linear, on meta, for the spec's quantized modules."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    wanted = _quantized_names(spec)
    for name, module in list(model.named_modules()):
        if name not in wanted or not (type(module) is nn.Linear or isinstance(module, Conv1D)):
            continue
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        bias = module.bias is not None
        if setup.bits == 4:
            new = bnb.nn.Linear4bit(in_f, out_f, bias, TORCH_DTYPES[setup.dtype],
                                    compress_statistics=setup.double_quant, quant_type=setup.quant_type,
                                    quant_storage=torch.uint8, device="meta")
        else:
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias, has_fp16_weights=False, threshold=_LLM_INT8_THRESHOLD,
                                      device="meta")
        if bias:  # transformers loads biases in the model dtype
            new.bias = nn.Parameter(torch.empty(out_f, dtype=_param_dtype(setup), device="meta"))
        new.source_cls = type(module)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        info.quantized_modules.append(name)
        info.quantized_values += in_f * out_f
    if wanted and not info.quantized_modules:
        info.notes.append("no module was quantized (bitsandbytes replaces exact nn.Linear / Conv1D only)")
    setattr(model, "is_loaded_in_4bit" if setup.bits == 4 else "is_loaded_in_8bit", True)


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
    cfg = peft.LoraConfig(
        r=setup.rank, lora_alpha=setup.alpha, target_modules=lora_target_arg(spec, setup.targets),
        lora_dropout=setup.lora_dropout, bias="none", task_type="CAUSAL_LM" if spec.is_causal_lm else None,
    )
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=setup.adapter_dtype == "fp32")
    if setup.adapter_dtype != "fp32":
        dt = TORCH_DTYPES[setup.adapter_dtype]
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dt)
    return model


def _bnb_modules(model):
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _stash_quantized_weights(model, info: BuildInfo) -> dict:
    """Take the bnb weights out before ``to_empty`` (which cannot make Params4bit / Int8Params), keeping shapes."""
    stash = {}
    for name, m in _bnb_modules(model):
        stash[name] = (m.out_features, m.in_features)
        m._parameters["weight"] = None
    return stash


def _retie(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()


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


def _materialize_quantized(model, stash: dict, setup, info: BuildInfo, *, fake: bool, device: str) -> None:
    """Give every bnb layer its quantized weight: real bitsandbytes quantization of random values, or a fake
    stand-in of the exact storage bitsandbytes creates."""
    import bitsandbytes as bnb

    compute = TORCH_DTYPES[setup.dtype]
    for name, m in _bnb_modules(model):
        out_f, in_f = stash[name]
        if setup.bits == 4:
            if fake:
                qs = _fake_quant_state_4bit(out_f, in_f, setup.quant_type, setup.double_quant, compute)
                w = nn.Parameter(torch.empty((out_f * in_f + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
                w.quant_state = qs
                w.compress_statistics, w.quant_type, w.blocksize = setup.double_quant, setup.quant_type, _NF4_BLOCK
                w.quant_storage, w.bnb_quantized, w.module = torch.uint8, True, m
                m.weight = w
                m.quant_state = qs
            else:
                data = torch.empty(out_f, in_f, dtype=compute, device=device).normal_(0.0, 0.02)
                w = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=setup.double_quant,
                                      quant_type=setup.quant_type, quant_storage=torch.uint8, module=m)
                m.weight = w._quantize(torch.device(device))
                qs = m.weight.quant_state
            info.quant_tensors += _quant_state_tensors(qs)
            info.quantized_weights.append(m.weight)
        else:
            if fake:
                w = nn.Parameter(torch.empty(out_f, in_f, dtype=torch.int8), requires_grad=False)
                w.CB, w.SCB = None, None
                m.weight = w
                # Int8Params._quantize: CB int8 (out, in) is the weight's data; SCB one fp32 scale per row.
                # Linear8bitLt.init_8bit_state would move them into the matmul state on the first forward.
                m.state.CB, m.state.SCB = w.data, torch.empty(out_f, dtype=torch.float32)
                m.state.has_fp16_weights = False
                scb = m.state.SCB
            else:
                data = torch.empty(out_f, in_f, dtype=compute, device=device).normal_(0.0, 0.02)
                w = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
                m.weight = w._quantize(torch.device(device))
                scb = m.weight.SCB
            info.quant_tensors.append(scb)
            info.quantized_weights.append(m.weight)


def _fake_quant_state_4bit(out_f: int, in_f: int, quant_type: str, double_quant: bool, compute):
    """The QuantState ``bnb.functional.quantize_4bit`` makes for an (out, in) weight (bitsandbytes 0.50):
    absmax one per 64-value block (fp32; with double quant uint8 + a nested state of one fp32 absmax per 256
    blocks, a 256-entry fp32 dynamic code and an fp32 offset), and the layer's own 16-entry fp32 code."""
    from bitsandbytes.functional import QuantState

    n = out_f * in_f
    blocks = math.ceil(n / _NF4_BLOCK)
    code = torch.empty(16, dtype=torch.float32)
    shape = torch.Size([out_f, in_f])
    if double_quant:
        state2 = QuantState(absmax=torch.empty(math.ceil(blocks / _DQ_BLOCK), dtype=torch.float32),
                            code=torch.empty(256, dtype=torch.float32), blocksize=_DQ_BLOCK, dtype=torch.float32)
        return QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=shape, code=code,
                          blocksize=_NF4_BLOCK, quant_type=quant_type, dtype=compute,
                          offset=torch.empty((), dtype=torch.float32), state2=state2)
    return QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=shape, code=code,
                      blocksize=_NF4_BLOCK, quant_type=quant_type, dtype=compute)


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
    if qs.state2 is not None:
        out += [t for t in (qs.state2.absmax, qs.state2.code) if isinstance(t, torch.Tensor)]
    return out
