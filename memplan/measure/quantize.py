"""bitsandbytes 4/8-bit base weights for ``memplan.measure.build``: the layers transformers' loader swaps in,
quantized for real (random values), or as fake stand-ins of the exact storage bitsandbytes creates.

bitsandbytes' ``Params4bit`` / ``Int8Params`` cannot hold fake tensors ("Creating a new Tensor subclass
Params4bit but the raw Tensor object is already associated to a python object of type FakeTensor"),
quantizing a fake tensor fails (``DataDependentOutputException`` from ``.tolist()`` in ``create_dynamic_map``),
and a ``Linear4bit`` built on meta cannot be moved ("Cannot copy out of meta tensor"): docs/memory-model.md, "How
simulate builds a model". Fake builds therefore give each quantized layer a stand-in: a plain uint8 (4-bit) /
int8 (8-bit) Parameter plus the quantization state bitsandbytes would create, with the exact shapes and dtypes of
``bnb.functional.quantize_4bit`` / ``Int8Params._quantize`` (bitsandbytes 0.50). bnb's registered fake kernels
(``gemm_4bit``, ``dequantize_4bit``, ``int8_*``) then produce the real sizes: byte-identical to a real CPU QLoRA
run (tests/measure/test_simulate.py).

Only the modules bitsandbytes really replaces become quantized: transformers' ``replace_with_bnb_linear`` swaps
modules whose type is exactly ``nn.Linear`` or ``Conv1D``, minus the output embedding; the spec's
``LinearSpec.quantized_by_bnb`` says which (Falcon's ``FalconLinear`` and Mixtral's fused experts stay 16-bit).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from memplan.catalog.models.layouts import expert_module_names
from memplan.plan.weights import DQ_BLOCK, DQ_CODE_VALUES, NF4_BLOCK, NF4_CODE_VALUES, load_dtype
from memplan.plan.zero_memory import four_bit_storage

from .dtypes import torch_dtype

__all__ = ["LLM_INT8_THRESHOLD", "replace_with_bnb", "bnb_modules", "stash_quantized_weights",
           "materialize_quantized", "quant_state_tensors", "fake_dequantize_for_peft"]

LLM_INT8_THRESHOLD = 6.0  # transformers BitsAndBytesConfig.llm_int8_threshold default


def _quantized_names(spec) -> set[str]:
    names = set()
    for lin in spec.layer_linears:
        if lin.quantized_by_bnb and lin.peft_target == "module":  # (transformers 4.x Mixtral: one per expert)
            names.update(n for i in range(spec.num_layers) for n in expert_module_names(spec, i, lin))
    names.update(lin.name for lin in spec.top_linears if lin.quantized_by_bnb and lin.peft_target == "module")
    return names


def quant_storage(setup):
    """The torch dtype 4-bit weights are packed in (memplan.plan.zero_memory ``four_bit_storage`` owns the rule)."""
    name = four_bit_storage(setup)
    return torch.uint8 if name == "uint8" else torch_dtype(name)


def replace_with_bnb(model, spec, setup, info) -> None:
    """transformers.integrations.bitsandbytes.replace_with_bnb_linear, on meta, for the spec's quantized modules."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    wanted = _quantized_names(spec)
    for name, module in list(model.named_modules()):
        # (the spec names what the installed transformers quantizes: exact nn.Linear from 5.5, subclasses such as
        # FalconLinear before -- memplan.plan.versions, rule "bnb-quantizes-linear-subclasses")
        if name not in wanted or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        bias = module.bias is not None
        if setup.bits == 4:
            new = bnb.nn.Linear4bit(in_f, out_f, bias, torch_dtype(setup.dtype),
                                    compress_statistics=setup.double_quant, quant_type=setup.quant_type,
                                    quant_storage=quant_storage(setup), device="meta")
        else:
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD,
                                      device="meta")
        if bias:  # transformers loads biases in the model dtype
            new.bias = nn.Parameter(torch.empty(out_f, dtype=torch_dtype(load_dtype(setup)), device="meta"))
        new.source_cls = type(module)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        info.quantized_modules.append(name)
        info.quantized_values += in_f * out_f
    if wanted and not info.quantized_modules:
        info.notes.append("no module was quantized (bitsandbytes replaces exact nn.Linear / Conv1D only)")
    setattr(model, "is_loaded_in_4bit" if setup.bits == 4 else "is_loaded_in_8bit", True)


def bnb_modules(model):
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def stash_quantized_weights(model) -> dict:
    """Take the bnb weights out before ``to_empty`` (which cannot make Params4bit / Int8Params), keeping shapes."""
    stash = {}
    for name, m in bnb_modules(model):
        stash[name] = (m.out_features, m.in_features)
        m._parameters["weight"] = None
    return stash


def materialize_quantized(model, stash: dict, setup, info, *, fake: bool, device: str) -> None:
    """Give every bnb layer its quantized weight: real bitsandbytes quantization of random values, or a fake
    stand-in of the exact storage bitsandbytes creates."""
    import bitsandbytes as bnb

    compute = torch_dtype(setup.dtype)
    for name, m in bnb_modules(model):
        out_f, in_f = stash[name]
        if setup.bits == 4:
            if fake:
                qs = _fake_quant_state_4bit(out_f, in_f, setup.quant_type, setup.double_quant, compute)
                storage = quant_storage(setup)
                per = storage.itemsize * 2  # 4-bit values per storage element
                w = nn.Parameter(torch.empty((out_f * in_f + per - 1) // per, 1, dtype=storage), requires_grad=False)
                w.quant_state = qs
                w.compress_statistics, w.quant_type, w.blocksize = setup.double_quant, setup.quant_type, NF4_BLOCK
                w.quant_storage, w.bnb_quantized, w.module = storage, True, m
                m.weight = w
                m.quant_state = qs
            else:
                data = torch.empty(out_f, in_f, dtype=compute, device=device).normal_(0.0, 0.02)
                w = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=setup.double_quant,
                                      quant_type=setup.quant_type, quant_storage=quant_storage(setup), module=m)
                m.weight = w._quantize(torch.device(device))
                qs = m.weight.quant_state
            info.quant_tensors += quant_state_tensors(qs)
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
    blocks = math.ceil(n / NF4_BLOCK)
    code = torch.empty(NF4_CODE_VALUES, dtype=torch.float32)
    shape = torch.Size([out_f, in_f])
    if double_quant:
        state2 = QuantState(absmax=torch.empty(math.ceil(blocks / DQ_BLOCK), dtype=torch.float32),
                            code=torch.empty(DQ_CODE_VALUES, dtype=torch.float32), blocksize=DQ_BLOCK,
                            dtype=torch.float32)
        return QuantState(absmax=torch.empty(blocks, dtype=torch.uint8), shape=shape, code=code,
                          blocksize=NF4_BLOCK, quant_type=quant_type, dtype=compute,
                          offset=torch.empty((), dtype=torch.float32), state2=state2)
    return QuantState(absmax=torch.empty(blocks, dtype=torch.float32), shape=shape, code=code,
                      blocksize=NF4_BLOCK, quant_type=quant_type, dtype=compute)


def quant_state_tensors(qs) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, offset) and of its nested double-quant state."""
    out: list[torch.Tensor] = []
    seen = set()
    while qs is not None and id(qs) not in seen:
        seen.add(id(qs))
        out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


@contextmanager
def fake_dequantize_for_peft():
    """peft's ``dequantize_module_weight`` (DoRA's weight norm, PiSSA/OLoRA/LoftQ on a quantized base) recognises
    bitsandbytes weights by class name (``Params4bit`` / ``Int8Params``), which the fake stand-ins are not: route them
    to the same bitsandbytes calls peft makes for the real classes (peft/utils/integrations.py
    ``dequantize_bnb_weight``: ``dequantize_4bit(weight.data, weight.quant_state)``; ``int8_vectorwise_dequant(data,
    SCB)``), whose fake kernels give the real shapes and dtypes."""
    import bitsandbytes as bnb
    from peft.tuners.lora import dora

    original = dora.dequantize_module_weight

    def dequantize(module):
        weight = module.weight
        if getattr(weight, "quant_state", None) is not None and weight.dtype == torch.uint8:
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        state = getattr(module, "state", None)
        if weight.dtype == torch.int8 and state is not None and getattr(state, "SCB", None) is not None:
            return bnb.functional.int8_vectorwise_dequant(weight.data, state.SCB)
        return original(module)

    dora.dequantize_module_weight = dequantize
    try:
        yield
    finally:
        dora.dequantize_module_weight = original
