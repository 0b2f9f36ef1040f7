"""The LoRA initialisation phase (``--init default|loftq|pissa|olora``): what peft holds while it decomposes the
base weights, before training starts, and which way of running it fits a card.

peft 0.21.2 initialises each adapted layer in ``LoraLayer.update_layer`` (peft/tuners/lora/layer.py), one layer
at a time, while the whole model is resident:

- ``pissa``: ``pissa_init``: an fp32 copy of W, ``torch.linalg.svd(W, full_matrices=False)`` (U m x k, S k,
  Vh k x n, k = min(m, n)); ``pissa_niter_<q>``: ``torch.svd_lowrank(W, r, niter=q)`` (outputs m x r, r, n x r).
  Then A, B from the top r singular triplets and W - scaling * B @ A (two more m x n fp32 tensors at once).
  peft refuses bnb 4/8-bit weights ("Please initialize PiSSA under float32, float16, or bfloat16"): a QLoRA
  user runs PiSSA on a full-precision load, saves the residual model and reloads it quantized.
- ``olora``: ``olora_init``: fp32 copy of W (bnb weights: ``dequantize_module_weight`` first), ``torch.linalg.qr``
  (Q m x k, R k x n), W -= scaling * B @ A in place, and on a bnb layer a fresh ``Params4bit`` / ``Int8Params``
  (requantized) beside the old one.
- ``loftq``: two routes. ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits,
  loftq_iter))`` on a full-precision load: ``loftq_init`` (peft/utils/loftq_utils.py) quantizes the fp32 residual
  with bitsandbytes (``Params4bit(res.to("cpu"), compress_statistics=False).to("cuda")``: a host copy of the
  residual and a device copy inside ``Params4bit._quantize``), dequantizes it, SVDs ``weight - dequantized``, and
  repeats ``loftq_iter`` times, the previous iteration's U, S, Vh, L, R alive during the next SVD; the model then
  still holds 16-bit (dequantized) weights, to be saved and reloaded in 4 bits. Or
  ``replace_lora_weights_loftq(peft_model)`` on the already quantized QLoRA model: per ``Linear4bit`` it reads the
  layer's float weight from the safetensors checkpoint on the host, dequantizes the 4-bit weight (compute dtype),
  and SVDs the fp32 residual once (``_loftq_init_new``).

``init_phase_for`` replays those allocations, in peft's order, for the layer whose replay peaks highest, on top of
what is resident (every base weight, every other adapter), with CUDA's 512-byte blocks; ``semantics="cpu"``
leaves out what only a GPU run allocates (the solver's input copy inside cuSOLVER, bitsandbytes' device copy
of the host residual), which is what ``memplan.measure.init_measure`` measures on CPU (tests/plan/
test_init_phase.py: equal within 2%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError
from memplan.units import format_bytes, round_up

from .dtypes import DTYPE_BYTES
from .init_choice import INITS, NITER, check_init_name, init_config_value, resolve_init
from .runtime import CUDA_BLOCK_BYTES
from .init_replay import layer_replay, own_weight_bytes
from .trainable import adapted_linears
from .weights import all_linears, static_terms

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["INITS", "PATHS", "InitPhase", "resolve_init", "init_phase_for", "init_paths", "init_path_within",
           "init_config_value",
           "SVD_SECONDS_PER_MNK", "QR_SECONDS_PER_MNK", "LOWRANK_SECONDS_PER_MNR", "QUANT_SECONDS_PER_VALUE"]

PATHS = ("full_precision", "kbit_model")
_PATH_TEXT = {
    ("pissa", "full_precision"): "PiSSA on a full-precision load (peft refuses bnb weights; save the residual "
                                 "model, reload it quantized)",
    ("olora", "full_precision"): "OLoRA on a full-precision load",
    ("olora", "kbit_model"): "OLoRA on the bnb-quantized model (peft dequantizes, decomposes, requantizes)",
    ("loftq", "full_precision"): "LoftQConfig on a full-precision load (init_lora_weights='loftq')",
    ("loftq", "kbit_model"): "replace_lora_weights_loftq on the 4-bit model",
}

# CPU seconds of the decompositions, fitted by `python benchmarks/init_phase.py --quick` on this project's 2-core
# CPU with nothing else running (torch 2.13, 2 threads, fp32, 512 x 512 .. 2752 x 1024 matrices; least squares
# through the origin; 2026-12-01): t = c * m * n * min(m, n) for torch.linalg.svd and .qr, c * m * n * r * (2 q + 2)
# for torch.svd_lowrank, and c * m * n for bitsandbytes' NF4 quantize + dequantize (LoftQ, once per iteration).
# Kernel time only (peft's per-layer Python overhead is not in it: small models take longer than the rule),
# extrapolated beyond 2752 x 1024, and a CPU's: a GPU's cuSOLVER is faster by a factor memplan has not measured.
SVD_SECONDS_PER_MNK = 1.34e-10
QR_SECONDS_PER_MNK = 3.16e-11
LOWRANK_SECONDS_PER_MNR = 2.9e-11
QUANT_SECONDS_PER_VALUE = 1.48e-8


@dataclass(frozen=True)
class InitPhase:
    """The initialisation phase of one setup along one path: its device (GPU) and host peaks."""

    init: str
    path_id: str  # one of PATHS
    path: str  # in words
    gpu_components: dict[str, int]  # what is alive on the device at its peak (bytes by name)
    host_components: dict[str, int]
    largest_layer: str  # the layer whose decomposition peaks highest, with its (out, in) shape
    seconds_estimate: float  # CPU seconds, from the rule below (extrapolated for large models)
    seconds_rule: str
    loftq_bits: int = 4
    loftq_iter: int = 1
    semantics: str = "cuda"
    notes: tuple[str, ...] = ()
    layers_decomposed: int = 0
    solver_components: tuple[str, ...] = field(default=())  # names in gpu_components no tensor shows

    @property
    def gpu_peak_bytes(self) -> int:
        return sum(self.gpu_components.values())

    @property
    def host_peak_bytes(self) -> int:
        return sum(self.host_components.values())

    @property
    def tensor_peak_bytes(self) -> int:
        """The device peak without what only exists inside a solver kernel (what a storage tracker sees)."""
        return self.gpu_peak_bytes - sum(self.gpu_components.get(k, 0) for k in self.solver_components)

    def to_dict(self) -> dict:
        return {"init": self.init, "path_id": self.path_id, "path": self.path,
                "gpu_peak_bytes": self.gpu_peak_bytes, "gpu_components": dict(self.gpu_components),
                "host_peak_bytes": self.host_peak_bytes, "host_components": dict(self.host_components),
                "tensor_peak_bytes": self.tensor_peak_bytes, "largest_layer": self.largest_layer,
                "seconds_estimate": self.seconds_estimate, "seconds_rule": self.seconds_rule,
                "loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter, "semantics": self.semantics,
                "layers_decomposed": self.layers_decomposed, "notes": list(self.notes)}

    def describe(self) -> str:
        return (f"init {self.init} ({self.path}): GPU peak {format_bytes(self.gpu_peak_bytes)}, host peak "
                f"{format_bytes(self.host_peak_bytes)}, ~{self.seconds_estimate:.0f} s on CPU")


def _paths_for(init: str, bits: int) -> tuple[str, ...]:
    if init.startswith("pissa"):
        return ("full_precision",)
    if init == "olora":
        return ("kbit_model", "full_precision") if bits in (4, 8) else ("full_precision",)
    return ("kbit_model", "full_precision") if bits == 4 else ("full_precision",)  # loftq


def init_paths(spec: ModelSpec, setup: TrainSetup, *, loftq_iter: int = 1,
               semantics: str = "cuda") -> list[InitPhase]:
    """Every way to run ``setup.init`` for this setup, the planned one (``init_phase_for``'s) first."""
    if setup.init == "default":
        return []
    return [init_phase_for(spec, setup, path=p, loftq_iter=loftq_iter, semantics=semantics)
            for p in _paths_for(setup.init, setup.bits)]


def init_path_within(spec: ModelSpec, setup: TrainSetup, budget_bytes: int, *, loftq_iter: int = 1) -> InitPhase | None:
    """The path whose GPU peak is lowest among those that fit ``budget_bytes`` (None: none fits, or init default).
    For ``fit``: it names this path when the planned one does not fit the card."""
    fitting = [p for p in init_paths(spec, setup, loftq_iter=loftq_iter) if p.gpu_peak_bytes <= budget_bytes]
    return min(fitting, key=lambda p: p.gpu_peak_bytes, default=None)


def init_phase_for(spec: ModelSpec, setup: TrainSetup, *, path: str | None = None, loftq_iter: int = 1,
                   semantics: str = "cuda") -> InitPhase | None:
    """The initialisation phase of a resolved setup (None for ``init="default"``: nothing is decomposed).

    ``path``: ``"kbit_model"`` (on the 4/8-bit model: OLoRA, replace_lora_weights_loftq) or ``"full_precision"``
    (on a float load: PiSSA, OLoRA, LoftQConfig); default: the quantized model where peft offers it.
    ``loftq_iter``: LoftQConfig.loftq_iter (peft's default 1). ``semantics="cpu"``: what a CPU run allocates."""
    check_init_name(setup.init)
    if setup.init == "default":
        return None
    if semantics not in ("cuda", "cpu"):
        raise InvalidSetupError(f"invalid semantics {semantics!r}; allowed: cuda, cpu")
    if loftq_iter < 1:
        raise InvalidSetupError(f"invalid loftq_iter {loftq_iter}; allowed: 1 or more (LoftQConfig.loftq_iter)")
    allowed = _paths_for(setup.init, setup.bits)
    path = path or allowed[0]
    if path not in allowed:
        raise InvalidSetupError(f"invalid path {path!r} for --init {setup.init} at {setup.bits} bits; allowed: "
                                f"{', '.join(allowed)}")
    kind = "loftq" if setup.init == "loftq" else ("olora" if setup.init == "olora" else "pissa")
    loftq_bits = setup.bits if setup.bits in (4, 8) else 4
    cuda, rnd = semantics == "cuda", CUDA_BLOCK_BYTES  # a CPU measurement counts storages in 512-byte blocks too
    lins = adapted_linears(spec, setup.targets)
    if not lins:
        raise InvalidSetupError(f"--init {setup.init}: the targets {setup.targets!r} adapt no layer")
    float_dtype = "fp32" if setup.bits == 32 else setup.dtype
    notes: list[str] = []
    if path == "full_precision":
        main = f"base weights, other layers ({float_dtype}, full-precision load)"
        resident = {main: _float_model_bytes(spec, float_dtype)}
        loop_lora = DTYPE_BYTES[float_dtype]  # peft's _move_adapter_to_device_of_base_layer casts to W's dtype
        if setup.bits in (4, 8):
            notes.append(f"a {setup.bits}-bit setup: the init runs on a {float_dtype} load; save the result and reload "
                         f"it quantized for training")
    else:
        st = static_terms(spec, setup)
        main = f"base weights, other layers ({setup.bits}-bit + quantization constants)"
        resident = {"base weights (float rest)": st.weights, main: st.quantized + st.quant_constants}
        loop_lora = DTYPE_BYTES[setup.dtype] if setup.bits == 4 else 4  # Linear4bit.compute_dtype; int8: no cast
    if kind == "loftq" and path == "kbit_model":
        loop_lora = DTYPE_BYTES[setup.adapter_dtype]  # the QLoRA model's adapters, created before
    if kind == "loftq" and setup.bits not in (4, 8):
        notes.append("LoftQ on a 16/32-bit LoRA setup: the weights become their dequantized NF4 values, which only "
                     "helps if training then loads them quantized")
    # one adapter pair per module; per-expert nn.Linear modules (transformers 4.x MoE) are one module per expert
    copies = {lin: spec.instances(lin) * lin.num_experts for lin in lins}
    total_pairs = sum(copies.values())

    def pair_bytes(lin) -> int:
        r = setup.rank * lin.lora_rank_multiplier
        return round_up(r * lin.in_features * loop_lora, rnd) + round_up(lin.out_features * r * loop_lora, rnd)

    all_lora = sum(copies[lin] * pair_bytes(lin) for lin in lins)
    best = None
    for lin in lins:
        m, n = (lin.in_features, lin.out_features) if (lin.conv1d and kind == "olora") else \
            (lin.out_features, lin.in_features)
        r = setup.rank * lin.lora_rank_multiplier
        comps, host = layer_replay(kind, path, m=m, n=n, r=r, wb=DTYPE_BYTES[float_dtype],
                                   compute_b=DTYPE_BYTES[setup.dtype], bits=setup.bits, loftq_bits=loftq_bits,
                                   loftq_iter=loftq_iter, niter=_niter(setup.init), double_quant=setup.double_quant,
                                   adapter_b=loop_lora, cuda=cuda, rnd=rnd)
        others = all_lora - pair_bytes(lin)
        own = own_weight_bytes(path, m, n, DTYPE_BYTES[float_dtype], setup.bits, setup.double_quant, rnd)
        level = sum(comps.values()) + others - own
        if best is None or level > best[0]:
            best = (level, lin, m, n, comps, host, others, own)
    _, lin, m, n, comps, host, others, own = best
    gpu = dict(resident)
    gpu[main] -= own  # the replay holds this layer's own weight
    gpu["LoRA A/B of the other layers"] = others
    gpu.update(comps)
    solver = tuple(k for k in gpu if k.startswith("solver"))
    seconds, rule = _seconds(kind, setup, lins, spec, loftq_iter, path)
    if kind == "loftq":
        notes.append("peft's LoftQ needs scipy (LoraConfig checks for it) and a CUDA device (loftq_utils hard-codes "
                     "compute_device='cuda')")
    if kind == "loftq" and path == "kbit_model":
        notes.append("replace_lora_weights_loftq reads each layer's float weight from the model's safetensors files "
                     "(host), one layer at a time")
    notes.append("every other layer's adapter is counted as already created (true once the last layer is reached)")
    if solver:
        notes.append("the solver input copy is cuSOLVER's (torch clones the matrix it factorizes); its workspace "
                     "(lwork) is not counted")
    return InitPhase(setup.init, path, _PATH_TEXT[(kind, path)], gpu, host,
                     f"{lin.name} ({m} x {n})", seconds, rule, loftq_bits, loftq_iter if kind == "loftq" else 1,
                     semantics, tuple(notes), total_pairs, solver)


def _niter(init: str) -> int:
    m = NITER.match(init)
    return int(m.group(1)) if m else 0


def _float_model_bytes(spec: ModelSpec, dtype: str) -> int:
    b = DTYPE_BYTES[dtype]
    total = 0
    for lin, mult in all_linears(spec):
        total += mult * (round_up(lin.weight_numel * b, CUDA_BLOCK_BYTES)
                         + (round_up(lin.bias_numel * b, CUDA_BLOCK_BYTES) if lin.bias else 0))
    for p in spec.params:
        total += (spec.num_layers if p.per_layer else 1) * round_up(p.numel * b, CUDA_BLOCK_BYTES)
    return total


def _seconds(kind, setup, lins, spec, loftq_iter, path) -> tuple[float, str]:
    total = 0.0
    for lin in lins:
        m, n, r = lin.out_features, lin.in_features, setup.rank * lin.lora_rank_multiplier
        k = min(m, n)
        if kind == "pissa" and _niter(setup.init):
            t = LOWRANK_SECONDS_PER_MNR * m * n * r * (2 * _niter(setup.init) + 2)
        elif kind == "pissa":
            t = SVD_SECONDS_PER_MNK * m * n * k
        elif kind == "olora":
            t = QR_SECONDS_PER_MNK * m * n * k
        else:
            its = 1 if path == "kbit_model" else loftq_iter
            t = its * (SVD_SECONDS_PER_MNK * m * n * k + QUANT_SECONDS_PER_VALUE * m * n)
        total += t * spec.instances(lin) * lin.num_experts
    rules = {"pissa": f"sum over layers of {SVD_SECONDS_PER_MNK:g} s * m*n*min(m,n) (torch.linalg.svd)",
             "olora": f"sum over layers of {QR_SECONDS_PER_MNK:g} s * m*n*min(m,n) (torch.linalg.qr)",
             "loftq": f"loftq_iter x sum over layers of ({SVD_SECONDS_PER_MNK:g} s * m*n*min(m,n) + "
                      f"{QUANT_SECONDS_PER_VALUE:g} s * m*n) (svd + NF4 quantize/dequantize)"}
    if kind == "pissa" and _niter(setup.init):
        rule = f"sum over layers of {LOWRANK_SECONDS_PER_MNR:g} s * m*n*r*(2q+2) (torch.svd_lowrank)"
    else:
        rule = rules[kind]
    return total, rule + "; fitted on a 2-core CPU by benchmarks/init_phase.py, extrapolated for large layers"
