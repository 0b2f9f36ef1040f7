"""The LoRA initialisation phase measured: peft's real ``pissa`` / ``olora`` / ``loftq`` initialisation run on
CPU, on a real model with random values, under the exact storage tracker (``memplan.measure.tracker``).

What runs (peft 0.21.2, transformers 5.2x, bitsandbytes 0.50):

- ``path="full_precision"``: the base model loaded in float (``load_dtype`` of the setup at 16/32 bits, the
  compute dtype for a QLoRA setup), then ``peft.get_peft_model`` with ``LoraConfig(init_lora_weights=...)``;
  for LoftQ also ``loftq_config=LoftQConfig(loftq_bits, loftq_iter)``. peft decomposes each target layer
  in ``LoraLayer.update_layer`` (peft/tuners/lora/layer.py ``pissa_init`` / ``olora_init`` / ``loftq_init``).
- ``path="kbit_model"``: the 4/8-bit model of the setup (``memplan.measure.build.build_training_model``), then
  OLoRA through ``get_peft_model`` (peft dequantizes each bnb weight, decomposes, requantizes), or LoftQ
  through ``peft.replace_lora_weights_loftq`` on the QLoRA peft model, which reads every layer's float weight
  from a safetensors checkpoint (written to a temporary folder first).

peft 0.21's LoftQ needs a GPU: ``loftq_init`` and ``_loftq_init_new`` (peft/utils/loftq_utils.py) hard-code
``compute_device = "cuda"`` (peft 0.20 removed the pure-torch ``NFQuantizer``). On CPU they are replaced, for
the duration of the run, by line-for-line copies with ``compute_device = "cpu"`` (``_loftq_init_cpu`` /
``_loftq_init_new_cpu`` below): the same tensors in the same order, quantized by bitsandbytes' CPU kernels. The
one host-only tensor of a GPU run, the ``res.to("cpu")`` copy handed to ``Params4bit``, is a no-op on CPU;
the layer ``replace_lora_weights_loftq`` reads from safetensors (on the host in a GPU run) is registered and
excluded from the device peak, and reported as the host peak.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from memplan.catalog.models.targets import lora_target_arg
from memplan.plan.init_phase import PATHS, init_config_value

from .build import build_training_model, hf_config
from .dtypes import torch_dtype
from .tracker import MemoryTracker

__all__ = ["InitMeasurement", "measure_init", "float_model"]


@dataclass(frozen=True)
class InitMeasurement:
    """One measured initialisation: tensor-level bytes (rounded per storage to ``round_to``) and seconds."""

    init: str
    path: str
    device_peak_bytes: int  # every storage alive at the worst moment, minus host-only ones
    resident_bytes: int  # alive before the initialisation started (model weights, LoRA of a kbit model)
    host_peak_bytes: int  # the largest host-only tensor (replace_lora_weights_loftq's safetensors read)
    seconds: float
    peak_components: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def transient_bytes(self) -> int:
        return self.device_peak_bytes - self.resident_bytes

    def to_dict(self) -> dict:
        return {"init": self.init, "path": self.path, "device_peak_bytes": self.device_peak_bytes,
                "resident_bytes": self.resident_bytes, "host_peak_bytes": self.host_peak_bytes,
                "transient_bytes": self.transient_bytes, "seconds": self.seconds,
                "peak_components": dict(self.peak_components), "notes": list(self.notes)}


def float_model(spec, dtype: str, seed: int = 0):
    """The base model of ``spec`` in ``dtype`` on CPU with random values (no checkpoint), in train mode."""
    import transformers

    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if spec.is_causal_lm else transformers.AutoModelForMaskedLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(hf_config(spec), dtype=torch_dtype(dtype))
    return model.train()


def measure_init(spec, setup, *, path: str | None = None, loftq_iter: int = 1, round_to: int = 512,
                 seed: int = 0) -> InitMeasurement:
    """Run ``setup.init`` for real on CPU and measure its peak (see the module docstring for what runs).

    ``setup`` is resolved (``memplan.plan.setup.resolve_setup``); ``path`` is one of
    ``memplan.plan.init_phase.PATHS`` (default: the one ``init_phase_for`` plans); ``round_to=512`` counts
    storages as the CUDA caching allocator hands them out."""
    from memplan.plan.init_phase import init_phase_for

    if setup.init == "default":
        raise ValueError("init 'default' has no initialisation phase to measure")
    planned = init_phase_for(spec, setup, path=path, loftq_iter=loftq_iter)
    path = planned.path_id
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; allowed: {', '.join(PATHS)}")
    notes: list[str] = []
    if setup.init == "loftq":
        notes.append("peft 0.21 LoftQ hard-codes compute_device='cuda': run through a CPU copy of its code")
    if path == "kbit_model" and setup.init == "loftq":
        return _measure_replace_loftq(spec, setup, round_to, seed, notes)
    return _measure_get_peft(spec, setup, path, planned.loftq_bits, loftq_iter, round_to, seed, notes)


def _lora_config(spec, setup, loftq_bits: int, loftq_iter: int):
    import peft

    cfg = peft.LoraConfig(r=setup.rank, lora_alpha=setup.alpha, target_modules=lora_target_arg(spec, setup.targets),
                          lora_dropout=setup.lora_dropout, bias="none", init_lora_weights=True,
                          task_type="CAUSAL_LM" if spec.is_causal_lm else None)
    # set after construction: LoraConfig.__post_init__ (peft 0.21.2) refuses "loftq" unless scipy is installed,
    # and this venv has none; the loftq_init code measured here does not import scipy
    cfg.init_lora_weights = init_config_value(setup)
    if setup.init == "loftq":
        cfg.loftq_config = {"loftq_bits": loftq_bits, "loftq_iter": loftq_iter}
    return cfg


def _measure_get_peft(spec, setup, path, loftq_bits, loftq_iter, round_to, seed, notes) -> InitMeasurement:
    import peft

    if path == "full_precision":
        base = float_model(spec, "fp32" if setup.bits == 32 else setup.dtype, seed)
    else:  # the 4/8-bit model as a QLoRA script holds it, without its default adapter
        # (not the BuildInfo: its quantized_weights list would keep the replaced 4-bit weights alive)
        model = build_training_model(spec, setup.with_(init="default"), fake=False, seed=seed)[0]
        base = model.unload()
        del model
    trk = MemoryTracker(round_to=round_to)
    _register_model(trk, base)
    resident = trk.current_bytes
    with _cpu_loftq(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        with trk:
            model = peft.get_peft_model(base, _lora_config(spec, setup, loftq_bits, loftq_iter),
                                        autocast_adapter_dtype=setup.adapter_dtype == "fp32")
        seconds = time.perf_counter() - t0
    res = trk.result()
    del model
    return InitMeasurement(setup.init, path, res.peak_bytes, resident, 0, seconds, _nonzero(res.peak_components),
                           tuple(notes))


def _measure_replace_loftq(spec, setup, round_to, seed, notes) -> InitMeasurement:
    import peft
    from peft.utils import loftq_utils
    from safetensors.torch import save_file

    model = build_training_model(spec, setup.with_(init="default"), fake=False, seed=seed)[0]
    with tempfile.TemporaryDirectory() as tmp:
        # the original float weights of the quantized layers, as a checkpoint holds them (compute dtype)
        ref = float_model(spec, setup.dtype, seed)
        names = {n[len("base_model.model."):] + ".weight" for n, m in model.named_modules()
                 if type(m).__name__ == "Linear4bit"}
        save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k in names},
                  os.path.join(tmp, "model.safetensors"))
        del ref
        trk = MemoryTracker(round_to=round_to)
        _register_model(trk, model)
        resident = trk.current_bytes
        host = [0]
        original_get = loftq_utils._SafetensorLoader.get_tensor

        def get_tensor(self, name):  # the checkpoint read: host memory in a GPU run
            t = original_get(self, name)
            trk.register(t, "inputs")
            trk.exclude(t)
            host[0] = max(host[0], -(-t.untyped_storage().nbytes() // round_to) * round_to)
            return t

        loftq_utils._SafetensorLoader.get_tensor = get_tensor
        try:
            with _cpu_loftq(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                with trk:
                    peft.replace_lora_weights_loftq(model, model_path=tmp)
                seconds = time.perf_counter() - t0
        finally:
            loftq_utils._SafetensorLoader.get_tensor = original_get
    res = trk.result()
    notes.append("replace_lora_weights_loftq: the safetensors layer read is host memory, left out of the device "
                 "peak")
    return InitMeasurement("loftq", "kbit_model", res.peak_bytes, resident, host[0], seconds,
                           _nonzero(res.peak_components), tuple(notes))


def _register_model(trk: MemoryTracker, model) -> None:
    for p in model.parameters():
        trk.register(p, "lora_params" if p.requires_grad else "weights")
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in _quant_state_tensors(qs):
                trk.register(t, "quant_constants")
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            trk.register(scb, "quant_constants")
    for b in model.buffers():
        trk.register(b, "weights")


def _quant_state_tensors(qs) -> list:
    out = [getattr(qs, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return [t for t in out if isinstance(t, torch.Tensor)]


def _nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}


# ---------------------------------------------------------------------------------------------------------------
# peft 0.21.2 peft/utils/loftq_utils.py, loftq_init and _loftq_init_new, with compute_device = "cpu"


@torch.no_grad()
def _loftq_init_cpu(weight, num_bits: int, reduced_rank: int, num_iter=1):
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    if num_bits not in [4, 8]:
        raise ValueError("Only nf4 and int8 quantization is supported")
    device, dtype, compute_device = weight.device, weight.dtype, "cpu"
    weight = weight.to(device=compute_device, dtype=torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            qweight = bnb.nn.Params4bit(
                res.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4"
            ).to(compute_device)
            dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        else:
            qweight = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to(device)
            dequantized_weight = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB).to(compute_device)
        res = weight - dequantized_weight
        output = _low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R, reduced_rank = output["L"], output["R"], output["reduced_rank"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    lora_A, lora_B = R, L
    return dequantized_weight.to(device=device, dtype=dtype), lora_A, lora_B


@torch.no_grad()
def _loftq_init_new_cpu(qweight, weight, num_bits: int, reduced_rank: int):
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    if num_bits != 4:
        raise ValueError("Only 4 bit quantization supported at the moment.")
    dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
    weight = weight.to(device="cpu", dtype=torch.float32)
    residual = weight - dequantized_weight
    output = _low_rank_decomposition(residual, reduced_rank=reduced_rank)
    L, R, reduced_rank = output["L"], output["R"], output["reduced_rank"]
    return R, L


@contextmanager
def _cpu_loftq():
    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    saved = layer.loftq_init, loftq_utils._loftq_init_new
    layer.loftq_init, loftq_utils._loftq_init_new = _loftq_init_cpu, _loftq_init_new_cpu
    try:
        yield
    finally:
        layer.loftq_init, loftq_utils._loftq_init_new = saved
