"""The analytic memory model: a ``TrainSetup`` in, a named breakdown of peak device memory out.

Pure arithmetic on the architecture spec (no torch). Peak memory is the sum of what is alive at the worst
moment of one steady-state training step (step >= 2, so optimizer state exists). The step is modelled as
phases, and the breakdown of the phase with the largest total is reported, so components always sum to it:

- ``forward_end``:     weights + optimizer state + saved activations + logits and log-softmax
- ``backward_start``:  the loss gradient: fp32 grads of log-softmax and of the logits appear while the
                       saved log-softmax and all layer activations are still alive (the usual LoRA peak,
                       measured so for OPT-13B in ``shared/notes/feasibility.md`` §4)
- ``backward``:        backpropagating through the last layer: all saved activations + gradient
                       temporaries of one layer + the dequantized weight of a 4/8-bit matmul
- ``backward_end``:    all gradients, one layer's activations (the full fine-tuning peak candidate)
- ``optimizer_step``:  all gradients + the optimizer's step temporaries

Where a constant comes from is said next to it. The reference numbers for the activation terms are the
per-op byte attribution of a real OPT-13B LoRA step in ``shared/notes/feasibility.md`` §4 (32 bytes per
token per hidden unit per layer, plus the logits terms); the other architectures follow the same rules
applied to their transformers 5.23 modeling code (cited inline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from .optimizers import OptimizerSpec, resolve_optimizer
from .setups import DTYPE_BYTES, TrainSetup, resolve_setup
from .units import ceil_div, round_up

if TYPE_CHECKING:
    from .gpus import GPUSpec
    from .models import LinearSpec, ModelSpec

__all__ = ["Estimate", "ParamCounts", "estimate", "estimate_for", "COMPONENTS", "PHASES"]

# Component names, in display order. JSON output uses exactly these keys.
COMPONENTS = (
    "weights",  # frozen base weights kept in float (all of them at 16/32 bits; the non-quantized rest at 4/8)
    "quantized_weights",  # bitsandbytes packed 4-bit / int8 values
    "quant_constants",  # 4-bit absmax + codes (+ double-quant state), int8 row scales
    "lora_params",
    "gradients",
    "optimizer_state",
    "activations",  # tensors saved for backward by the layers (+ checkpoint inputs, embeddings, ids)
    "logits_loss",  # lm_head output, its fp32 upcast, log-softmax and their gradients
    "transients",  # backward temporaries, dequantized weights, optimizer step temporaries, cuBLAS workspace
    "cuda_context",  # driver context + kernels: visible to nvidia-smi, not to torch
    "allocator_overhead",  # caching-allocator rounding and fragmentation (reserved - allocated)
)
PHASES = ("forward_end", "backward_start", "backward", "backward_end", "optimizer_step")

# --- runtime constants (uncalibrated defaults until GPU runs in profiles/runs/ replace them) -------------
# CUDA caching allocator: every block is a multiple of 512 bytes (c10/cuda/CUDACachingAllocator.cpp,
# kMinBlockSize = 512); applied to the many small quantization-state tensors, where it matters.
CUDA_BLOCK_BYTES = 512
# cuBLAS workspace that torch allocates through the caching allocator on the first matmul and keeps:
# default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB
# (aten/src/ATen/cuda/CublasHandlePool.cpp, getChunkWorkspaceSize). Hopper may use more.
CUBLAS_WORKSPACE_BYTES = 2 * 4096 * 1024 + 8 * 16 * 1024
# Reserved-minus-allocated share of the memory that changes during the step (activations, logits,
# gradients, temporaries). The allocator rounds large blocks up to 2 MiB and cannot always reuse freed
# blocks for larger requests; 5% is a documented default, not a measurement (issue: GPU calibration).
ALLOCATOR_OVERHEAD_FRACTION = 0.05
# Used when no card is given: a typical PyTorch 2.x + CUDA 12 context with lazy module loading.
DEFAULT_CUDA_CONTEXT_BYTES = 500 * 1024**2
# bitsandbytes 4-bit (bitsandbytes/functional.py quantize_4bit): blocks of 64 values, one absmax per block
# (fp32; with double quant: uint8 plus one fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32
# offset), and a 16-entry fp32 code per layer. Measured 0.5625 B/param without and 0.5161 B/param with double
# quant on CPU (feasibility.md §2).
NF4_BLOCK = 64
DQ_BLOCK = 256
# bnb 8-bit optimizers: 256-value blocks with an fp32 absmax; tensors below 4096 values stay 32-bit
# (bitsandbytes/optim/optimizer.py: min_8bit_size=4096, blockwise, block size 256).
BNB_OPT_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
# bnb paged optimizers page only state of parameters with at least 1e5 values
# (bitsandbytes/optim/optimizer.py get_state_buffer: ``if not self.is_paged or A.numel() < 1e5``).
BNB_MIN_PAGED_SIZE = 100_000

# Activation functions and how many ffn-sized tensors they save for backward (transformers/activations.py):
# relu saves its output; F.gelu / silu / gelu_pytorch_tanh save their input; NewGELUActivation ("gelu_new")
# is written in Python and saves input, tanh output, 0.5*input and 1+tanh: four tensors; FastGELUActivation
# ("gelu_fast", 0.5*x*(1+tanh(x*0.7978845608*(1+0.044715*x*x)))) saves seven: x, 0.044715*x, 0.79788*x,
# 1+0.044715*x*x, the tanh output, 0.5*x and 1+tanh (each tensor-tensor mul saves both operands).
_ACT_SAVED = {"relu": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "gelu_new": 4,
              "gelu_fast": 7, "quick_gelu": 2, "bloom_gelu": 1}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    quantized: int  # values stored by bitsandbytes in 4/8 bits (0 at 16/32 bits)

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "quantized": self.quantized}


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training step: a breakdown whose components sum to ``total_bytes``."""

    setup: TrainSetup
    total_bytes: int
    components: dict[str, int]
    peak_phase: str
    phases: dict[str, dict[str, int]] = field(repr=False)
    params: ParamCounts
    paged_bytes: int  # part of optimizer_state in CUDA managed memory (bnb paged optimizers)
    notes: tuple[str, ...] = ()

    @property
    def dominant(self) -> str:
        """The largest component."""
        return max(self.components, key=self.components.__getitem__)

    @property
    def allocatable_bytes(self) -> int:
        """What the process asks of torch's allocator: the total minus the CUDA context."""
        return self.total_bytes - self.components["cuda_context"]

    def to_dict(self) -> dict:
        return {
            "model": self.setup.model,
            "total_bytes": self.total_bytes,
            "components": dict(self.components),
            "peak_phase": self.peak_phase,
            "phases": {p: sum(c.values()) for p, c in self.phases.items()},
            "params": self.params.to_dict(),
            "paged_bytes": self.paged_bytes,
            "dominant": self.dominant,
            "setup": self.setup.to_dict(),
            "notes": list(self.notes),
        }


def estimate(setup: TrainSetup, *, gpu: GPUSpec | str | None = None, profiles_dir=None) -> Estimate:
    """Resolve the setup's model (catalog name or local config) and card, then estimate."""
    from .gpus import load_gpu
    from .models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_name = gpu if gpu is not None else setup.gpu
    gpu_spec = load_gpu(gpu_name, profiles_dir=profiles_dir) if isinstance(gpu_name, str) else gpu_name
    return estimate_for(spec, resolve_setup(setup, spec, gpu_spec), gpu_spec)


def estimate_for(spec: ModelSpec, setup: TrainSetup, gpu: GPUSpec | None = None, *,
                 include_runtime: bool = True) -> Estimate:
    """Estimate an already resolved setup (see ``resolve_setup``). The search calls this in its loop.

    ``include_runtime=False`` leaves out what no tensor tracker sees (CUDA context, allocator overhead,
    cuBLAS workspace): the tensor-level peak that ``memplan simulate`` and the profiler's tracker measure.
    """
    opt = resolve_optimizer(setup.optimizer)
    a = DTYPE_BYTES[setup.dtype]  # compute dtype
    tokens = setup.batch_size * setup.seq_len
    notes: list[str] = []

    # ---- static memory: weights, adapter, optimizer state --------------------------------------------
    static = _static_terms(spec, setup.bits, setup.dtype, setup.quant_type, setup.double_quant,
                           setup.upcast_non_quantized, setup.method)
    trainable_tensors = _trainable_tensors(spec, setup)
    trainable, grad_bytes = _trainable_totals(trainable_tensors)
    lora_param_bytes = trainable * DTYPE_BYTES[setup.adapter_dtype] if setup.trains_lora else 0
    opt_state_bytes = _optimizer_state_bytes(opt, trainable_tensors)
    opt_temp_bytes = opt.foreach_temp_states * grad_bytes  # same size and dtype as one state (= the grads)
    paged_bytes = _optimizer_state_bytes(opt, _pageable(trainable_tensors)) if opt.paged else 0

    # ---- activations ---------------------------------------------------------------------------------
    # The residual stream's dtype: prepare_model_for_kbit_training upcasts embeddings and norms to fp32, so
    # hidden states become fp32 and bnb layers cast their output back to the input dtype
    # (bitsandbytes/nn/modules.py Linear4bit.forward: ``.to(inp_dtype)``); fp32 weights compute in fp32.
    hb = 4 if (setup.upcast_non_quantized or setup.bits == 32) else a
    act = _layer_activations(spec, setup, hb)
    layer_bytes = act.per_token * tokens + act.per_token_seq * tokens * setup.seq_len
    extras = _model_activation_extras(spec, setup, hb) * tokens
    ckpt_input_bytes = spec.hidden_size * hb * tokens  # what checkpointing keeps per layer: its input
    logits_fwd, logits_bwd = _logits_bytes(spec, setup, hb, tokens)
    bwd_transient = _backward_transient_per_token(spec, setup, hb) * tokens
    bwd_transient += _backward_transient_per_token_seq(spec, setup) * tokens * setup.seq_len
    dequant = _dequant_transient_bytes(spec, setup)
    L = spec.num_layers
    if setup.grad_ckpt:
        saved_all = L * ckpt_input_bytes + extras
        saved_in_backward = saved_all + layer_bytes  # the layer being recomputed
    else:
        saved_all = L * layer_bytes + extras
        saved_in_backward = saved_all
    # At the end of backward only the first layer's tensors remain (its checkpointed input, if any).
    one_layer = (ckpt_input_bytes if setup.grad_ckpt else 0) + layer_bytes + extras

    # Full fine-tuning: the lm_head / tied-embedding gradient is produced with the logits gradient.
    head_grad = 0
    if setup.method == "full":
        head_grad = spec.vocab_size * spec.hidden_size * DTYPE_BYTES[_param_dtype(setup)]

    workspace = CUBLAS_WORKSPACE_BYTES if include_runtime else 0
    base = {
        "weights": static.weights,
        "quantized_weights": static.quantized,
        "quant_constants": static.quant_constants,
        "lora_params": lora_param_bytes,
        "optimizer_state": opt_state_bytes,
        "cuda_context": 0 if not include_runtime else (
            gpu.cuda_context_bytes if gpu is not None else DEFAULT_CUDA_CONTEXT_BYTES),
    }
    phase_dynamic = {
        "forward_end": dict(activations=saved_all, logits_loss=logits_fwd, gradients=0,
                            transients=workspace),
        "backward_start": dict(activations=saved_all, logits_loss=logits_bwd, gradients=head_grad,
                               transients=workspace),
        "backward": dict(activations=saved_in_backward, logits_loss=0, gradients=head_grad,
                         transients=bwd_transient + dequant + workspace),
        "backward_end": dict(activations=one_layer, logits_loss=0, gradients=grad_bytes,
                             transients=bwd_transient + dequant + workspace),
        "optimizer_step": dict(activations=0, logits_loss=0, gradients=grad_bytes,
                               transients=opt_temp_bytes + workspace),
    }
    phases: dict[str, dict[str, int]] = {}
    for name, dyn in phase_dynamic.items():
        dynamic = sum(dyn.values())
        overhead = int(ALLOCATOR_OVERHEAD_FRACTION * dynamic) if include_runtime else 0
        comps = dict(base, **dyn, allocator_overhead=overhead)
        phases[name] = {c: int(comps[c]) for c in COMPONENTS}
    peak_phase = max(PHASES, key=lambda p: sum(phases[p].values()))
    components = phases[peak_phase]

    if setup.bits == 8:
        notes.append("int8 (LLM.int8) memory follows bitsandbytes' CUDA MatMul8bitLt path, not yet calibrated on a GPU")
    if opt.paged:
        notes.append(f"{opt.name} keeps {paged_bytes} bytes of state in CUDA managed memory (counted as resident)")
    if setup.attn == "eager" and setup.seq_len >= 1024:
        notes.append("eager attention keeps batch x heads x seq^2 score matrices per layer; sdpa does not")

    params = ParamCounts(total=spec.total_params(), trainable=trainable,
                         quantized=static.quantized_values)
    return Estimate(setup=setup, total_bytes=sum(components.values()), components=components,
                    peak_phase=peak_phase, phases=phases, params=params, paged_bytes=paged_bytes,
                    notes=tuple(notes))


# ---- static terms ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Static:
    weights: int
    quantized: int
    quant_constants: int
    quantized_values: int


def _param_dtype(setup: TrainSetup) -> str:
    """dtype of the base weights held in float."""
    return "fp32" if setup.bits == 32 else setup.dtype


@lru_cache(maxsize=4096)
def _static_terms(spec: ModelSpec, bits: int, dtype: str, quant_type: str, double_quant: bool,
                  upcast: bool, method: str) -> _Static:
    if bits in (16, 32):
        wb = 4 if bits == 32 else DTYPE_BYTES[dtype]
        return _Static(spec.total_params() * wb, 0, 0, 0)

    quantized_linears = [(lin, mult) for lin, mult in _all_linears(spec) if lin.quantized_by_bnb]
    quantized_values = sum(lin.weight_numel * mult for lin, mult in quantized_linears)
    # Everything bitsandbytes leaves in float (embeddings, lm_head, norms, biases, routers) is fp32 after
    # prepare_model_for_kbit_training (peft/utils/other.py casts every fp16/bf16 non-Params4bit parameter),
    # else it stays in the compute dtype (transformers loads it with ``dtype=``).
    float_bytes = 4 if upcast else DTYPE_BYTES[dtype]
    weights = (spec.total_params() - quantized_values) * float_bytes

    packed = consts = 0
    for lin, mult in quantized_linears:
        n = lin.weight_numel
        if bits == 4:
            packed += mult * round_up(ceil_div(n, 2), CUDA_BLOCK_BYTES)  # two 4-bit codes per byte
            blocks = ceil_div(n, NF4_BLOCK)
            per_layer = round_up(16 * 4, CUDA_BLOCK_BYTES)  # the 16-entry fp32 code (nf4 or fp4)
            if double_quant:
                per_layer += round_up(blocks, CUDA_BLOCK_BYTES)  # uint8 absmax
                per_layer += round_up(ceil_div(blocks, DQ_BLOCK) * 4, CUDA_BLOCK_BYTES)  # fp32 absmax of absmax
                per_layer += round_up(256 * 4, CUDA_BLOCK_BYTES)  # fp32 code of the 8-bit absmax
                per_layer += CUDA_BLOCK_BYTES  # fp32 offset (a scalar, one block)
            else:
                per_layer += round_up(blocks * 4, CUDA_BLOCK_BYTES)  # fp32 absmax
            consts += mult * per_layer
        else:  # LLM.int8: int8 weight (CB) + one fp32 scale per output row (SCB), bnb Int8Params
            packed += mult * round_up(n, CUDA_BLOCK_BYTES)
            consts += mult * round_up(lin.num_experts * lin.out_features * 4, CUDA_BLOCK_BYTES)
    return _Static(weights, packed, consts, quantized_values)


@lru_cache(maxsize=1024)
def _targets(spec: ModelSpec, targets: str) -> tuple[LinearSpec, ...]:
    """``spec.resolve_targets`` memoized: the search asks for the same few target sets hundreds of times."""
    return tuple(spec.resolve_targets(targets))


def _all_linears(spec: ModelSpec) -> list[tuple[LinearSpec, int]]:
    """Every linear with its multiplicity in the model (per-layer ones count once per layer)."""
    return [(lin, spec.num_layers) for lin in spec.layer_linears] + [(lin, 1) for lin in spec.top_linears]


@dataclass(frozen=True)
class _Tensor:
    numel: int
    bytes_per_value: int
    factored_numel: int  # rows + cols for a matrix, numel for a vector (Adafactor's second moment)


def _matrix(rows: int, cols: int, b: int) -> _Tensor:
    return _Tensor(rows * cols, b, rows + cols)


def _vector(n: int, b: int) -> _Tensor:
    return _Tensor(n, b, n)


def _trainable_tensors(spec: ModelSpec, setup: TrainSetup) -> tuple[_Tensor, ...]:
    """Every trainable tensor, which sizes gradients and optimizer state."""
    if setup.method == "full":
        return _full_tensors(spec, DTYPE_BYTES[_param_dtype(setup)])
    return _lora_tensors(spec, setup.targets, setup.rank, DTYPE_BYTES[setup.adapter_dtype])


@lru_cache(maxsize=256)
def _full_tensors(spec: ModelSpec, b: int) -> tuple[_Tensor, ...]:
    tensors: list[_Tensor] = []
    for lin, mult in _all_linears(spec):
        if lin.num_experts > 1:  # a 3-D expert weight: Adafactor factors the last two dims per expert
            w = _Tensor(lin.weight_numel, b, lin.num_experts * (lin.in_features + lin.out_features))
        else:
            w = _matrix(lin.out_features, lin.in_features, b)
        tensors += [w] * mult
        if lin.bias:
            tensors += [_vector(lin.bias_numel, b)] * mult
    for p in spec.params:
        mult = spec.num_layers if p.per_layer else 1
        if p.kind in ("embedding", "position_embedding") and p.numel % spec.hidden_size == 0:
            t = _matrix(p.numel // spec.hidden_size, spec.hidden_size, b)
        else:
            t = _vector(p.numel, b)
        tensors += [t] * mult
    return tuple(tensors)


@lru_cache(maxsize=4096)
def _lora_tensors(spec: ModelSpec, targets: str, rank: int, b: int) -> tuple[_Tensor, ...]:
    tensors: list[_Tensor] = []
    for lin in _targets(spec, targets):
        mult = spec.instances(lin)  # layer-restricted targets adapt only some layers
        if lin.num_experts == 1:
            pair = [_matrix(rank, lin.in_features, b), _matrix(lin.out_features, rank, b)]  # lora_A, lora_B
        else:  # fused experts: peft's parameter wrapper; one tensor of peft's exact count
            n = lin.lora_params(rank)
            pair = [_Tensor(n, b, n)]
        tensors += pair * mult
    return tuple(tensors)


@lru_cache(maxsize=1024)
def _pageable(tensors: tuple[_Tensor, ...]) -> tuple[_Tensor, ...]:
    return tuple(t for t in tensors if t.numel >= BNB_MIN_PAGED_SIZE)


@lru_cache(maxsize=1024)
def _trainable_totals(tensors: tuple[_Tensor, ...]) -> tuple[int, int]:
    """(values, gradient bytes) of the trainable tensors."""
    return sum(t.numel for t in tensors), sum(t.numel * t.bytes_per_value for t in tensors)


@lru_cache(maxsize=4096)
def _optimizer_state_bytes(opt: OptimizerSpec, tensors: tuple[_Tensor, ...]) -> int:
    total = 0
    for t in tensors:
        n = t.numel
        if opt.factored:
            per_state = t.factored_numel * t.bytes_per_value
        elif opt.state_bits == 8 and n >= BNB_MIN_8BIT_SIZE:
            per_state = n + ceil_div(n, BNB_OPT_BLOCK) * 4  # uint8 state + fp32 absmax per block
        elif opt.state_in_param_dtype:
            per_state = n * t.bytes_per_value
        else:
            per_state = n * 4  # bnb 32-bit state is fp32
        total += opt.states * per_state
    return total


# ---- activations -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LayerAct:
    per_token: int  # bytes saved per token per layer
    per_token_seq: int  # bytes saved per token per layer per sequence position (eager attention: s^2 terms)


def _norms_per_layer(spec: ModelSpec) -> int:
    n = sum(1 for p in spec.params if p.per_layer and p.kind == "norm" and p.name.endswith("weight"))
    return n or 2


def _norm_saved_per_token(spec: ModelSpec, hb: int, width: int, trainable: bool) -> int:
    if spec.norm_kind == "rmsnorm":
        # LlamaRMSNorm & co. (modeling_llama.py): x.to(float32); pow(2) saves the fp32 copy; rsqrt saves
        # one fp32 per token; the final ``weight * x`` saves x only when the weight trains.
        saved = 4 * width + 4
    else:
        # aten.native_layer_norm saves its input and fp32 mean and rstd per token.
        saved = hb * width + 8
    if trainable:
        saved += hb * width
    return saved


# Falcon broadcasts its shared k/v head to every head with ``expand`` (a view, modeling_falcon.py) and calls
# SDPA without enable_gqa: no GQA kernel constraint and no k/v copies, in SDPA and eager alike.
_KV_BROADCAST = frozenset({"falcon"})
# Eager attention that takes the softmax in the input dtype instead of fp32 + cast back: GPT-2
# (``softmax(attn_weights, dim=-1)`` then ``.type(value.dtype)``), BERT and Falcon (modeling_<type>.py).
_EAGER_SOFTMAX_IN_INPUT_DTYPE = frozenset({"gpt2", "bert", "falcon"})


def _attention_kernel(spec: ModelSpec, attn: str, a: int) -> str:
    """What saves the attention activations on CUDA: "flash" (flash or memory-efficient SDPA kernels and
    flash_attention_2 save the same tensors), "math" (SDPA's math fallback) or "eager".

    torch 2.13 SDPA selection (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): flash needs fp16/bf16,
    head_dim <= 256 and no explicit mask, and supports GQA; memory-efficient also takes fp32 and masks but not
    GQA; otherwise math. transformers passes enable_gqa only without a mask (integrations/sdpa_attention.py
    use_gqa_in_sdpa); with a mask it repeats k/v itself.
    """
    if attn != "sdpa":
        return "flash" if attn == "flash_attention_2" else "eager"
    gqa = spec.num_key_value_heads < spec.num_attention_heads and spec.model_type not in _KV_BROADCAST
    # gpt_bigcode too: in transformers 5.23 it builds its mask with masking_utils.create_causal_mask (None for an
    # unpadded batch) and calls integrations/sdpa_attention.py, so multi-query attention is GQA with enable_gqa.
    if a < 4 and spec.head_dim <= 256:
        return "flash"
    return "math" if gqa and spec.head_dim <= 256 else "flash"


def _layer_activations(spec: ModelSpec, setup: TrainSetup, hb: int) -> _LayerAct:
    """Bytes one decoder layer keeps for backward, per token (and per token x seq for eager attention)."""
    return _layer_activations_cached(spec, setup.attn, setup.lora_dropout, setup.adapter_dtype, setup.rank,
                                     setup.targets or "", setup.method, setup.bits, setup.dtype, hb)


@lru_cache(maxsize=4096)
def _layer_activations_cached(spec: ModelSpec, attn: str, lora_dropout: float, adapter_dtype: str, rank: int,
                              targets: str, method: str, bits: int, dtype: str, hb: int) -> _LayerAct:
    h = spec.hidden_size
    d = spec.head_dim
    q_dim = spec.num_attention_heads * d
    kv_dim = spec.num_key_value_heads * d
    heads = spec.num_attention_heads
    ffn = spec.intermediate_size
    a = hb  # activations inside the layer follow the residual stream's dtype (see ``estimate_for``)
    full = method == "full"
    per_tok = 0
    per_tok_seq = 0

    # Norms: each saves its input (+ per-token statistics).
    per_tok += _norms_per_layer(spec) * _norm_saved_per_token(spec, a, h, trainable=full)

    # Attention. SDPA (flash / memory-efficient kernels on CUDA) and flash_attention_2 save q, k, v, the
    # output and an fp32 logsumexp per head and token (aten._scaled_dot_product_flash_attention's saved
    # outputs; feasibility.md §4). GQA runs natively without repeat_kv when there is no mask
    # (transformers/integrations/sdpa_attention.py use_gqa_in_sdpa).
    kernel = _attention_kernel(spec, attn, a)
    if kernel == "flash":
        # flash / memory-efficient kernels (and flash_attention_2) save q, k, v, the output and an fp32
        # logsumexp per head and token (aten._scaled_dot_product_flash_attention's saved outputs,
        # feasibility.md §4). GQA runs natively without repeat_kv.
        per_tok += a * (q_dim + 2 * kv_dim + q_dim) + 4 * heads
    else:
        # eager_attention_forward and SDPA's math kernel: k and v repeated to every head; the q @ k^T matmul
        # saves q and k.
        kv_saved = kv_dim if spec.model_type in _KV_BROADCAST else q_dim
        per_tok += a * (q_dim + 2 * kv_saved)
        # The probabilities, per head and (token x position):
        # - eager, softmax in the input dtype (gpt2, bert, falcon): softmax saves its output;
        # - eager, softmax(dtype=float32).to(dtype) (the rest): softmax saves its fp32 output, and in half
        #   precision the .to(dtype) copy is what the matmul with v saves;
        # - SDPA's math kernel (attention.cpp _scaled_dot_product_attention_math): fp32 throughout; the
        #   matmul with v saves the softmax output itself and the half weights copy it returns is dropped.
        # With attention dropout the matmul saves the dropped-out probabilities instead (dropout keeps only a
        # bool mask, so a half .to(dtype) copy is freed once dropped out): eager's F.dropout, and the math
        # kernel's at::dropout, are native_dropout for CUDA tensors (aten/src/ATen/native/Dropout.cpp
        # is_fused_kernel_acceptable). tests/test_trace.py checks the math kernel op for op.
        if kernel == "eager" and spec.model_type in _EAGER_SOFTMAX_IN_INPUT_DTYPE:
            probs_bytes, copy_bytes, matmul_dtype_bytes = a, 0, a
        elif kernel == "eager":
            probs_bytes, copy_bytes, matmul_dtype_bytes = 4, (a if a < 4 else 0), a
        else:
            probs_bytes, copy_bytes, matmul_dtype_bytes = 4, 0, 4
        if spec.attention_dropout > 0:
            per_tok_seq += heads * (probs_bytes + 1 + matmul_dtype_bytes)
        else:
            per_tok_seq += heads * (probs_bytes + copy_bytes)
        if spec.attn_logit_softcapping and kernel == "eager":
            per_tok_seq += heads * a  # tanh output saved (gemma-2 softcapping)
    if spec.model_type == "phi3":
        # Phi3Attention slices q, k, v out of one qkv_proj output; q and k are replaced by their rotary
        # copies but v stays a view, so saving v keeps the whole fused buffer alive (modeling_phi3.py).
        per_tok += a * (q_dim + kv_dim)
    if spec.residual_dropout > 0:
        # CUDA native_dropout saves a bool mask per residual dropout (after attention and/or after the MLP;
        # the spec counts the sites transformers 5.23 really applies).
        per_tok += spec.residual_dropout_sites * h

    # MLP.
    n_saved = _ACT_SAVED.get(spec.hidden_act, 1)
    if spec.num_experts > 1:
        k = spec.num_experts_per_tok
        # transformers 5 MoE experts loop: per routed token, gate_up output (2 ffn, saved by act and mul),
        # act output (ffn, saved by mul), down output (h, saved by the routing-weight mul); the router saves
        # its fp32 softmax over experts.
        per_tok += k * a * (3 * ffn + h) + 4 * spec.num_experts
    elif spec.mlp_kind == "gated":
        # act(gate) saves gate; act(gate) * up saves both operands (modeling_llama.py LlamaMLP).
        per_tok += a * (n_saved * ffn + 2 * ffn)
    else:
        # fc1 -> act -> fc2 with frozen fc1/fc2: only the activation's saved tensors stay.
        per_tok += a * n_saved * ffn
        if spec.activation_dropout > 0:
            per_tok += ffn  # mask
    if full:
        # Trainable weights make every linear save its input: the normed input (shared by q/k/v), the
        # attention output, the MLP input and the MLP hidden activation.
        per_tok += a * (h + q_dim + h + ffn * max(1, spec.num_experts_per_tok if spec.num_experts > 1 else 1))

    # LoRA: per adapted module, lora_A's input (x cast to the adapter dtype, or the dropout output) is saved,
    # plus the dropout's bool mask and lora_A's output, saved by lora_B (peft/tuners/lora/layer.py Linear).
    if method != "full" and targets:
        ab = DTYPE_BYTES[adapter_dtype]
        layer_names = {x.name for x in spec.layer_linears}
        lora_tok = 0
        for lin in _targets(spec, targets):
            if lin.name not in layer_names:
                continue  # top-level modules are handled with the model extras
            width = lin.in_features
            routed = spec.num_experts_per_tok if lin.num_experts > 1 else 1
            r = rank * lin.lora_rank_multiplier
            # Targets restricted to some layers: spread their bytes over the stack (a per-layer average).
            lora_tok += spec.instances(lin) * routed * (width * ab + (width if lora_dropout > 0 else 0) + r * ab)
        per_tok += ceil_div(lora_tok, spec.num_layers)

    # LLM.int8 (bnb MatMul8bitLt) saves its input A for the input gradient, once per distinct input that
    # no other op saves already: the normed inputs of attention and MLP, and the MLP hidden activation when
    # the activation function saved its input rather than its output.
    if bits == 8:
        distinct = h if spec.parallel_attn_mlp else 2 * h
        if attn == "eager":
            distinct += q_dim
        if spec.hidden_act != "relu":
            distinct += ffn
        per_tok += a * distinct
    return _LayerAct(per_tok, per_tok_seq)


def _model_activation_extras(spec: ModelSpec, setup: TrainSetup, hb: int) -> int:
    """Per-token bytes saved outside the layer stack: ids/labels, embedding dropout, final norm."""
    per_tok = 2 * 8  # input_ids and labels, int64
    if spec.embedding_dropout > 0:
        per_tok += spec.hidden_size  # bool mask
    per_tok += _norm_saved_per_token(spec, hb, spec.hidden_size, trainable=setup.method == "full")
    if not spec.is_causal_lm:
        # BERT MLM head transform: gelu saves its input, LayerNorm saves its input (modeling_bert.py).
        per_tok += 2 * hb * spec.hidden_size + 8
    if setup.method != "full" and setup.targets:
        top = {x.name for x in spec.top_linears + spec.tied_linears}  # adapters on lm_head save its input too
        ab = DTYPE_BYTES[setup.adapter_dtype]
        for lin in _targets(spec, setup.targets):
            if lin.name in top:  # same terms as a per-layer adapter (see _layer_activations_cached)
                mask = lin.in_features if setup.lora_dropout > 0 else 0
                per_tok += lin.in_features * ab + mask + setup.rank * lin.lora_rank_multiplier * ab
    return per_tok


def _logits_bytes(spec: ModelSpec, setup: TrainSetup, hb: int, tokens: int) -> tuple[int, int]:
    """(forward_end, backward_start) bytes of the logits and loss tensors.

    transformers ForCausalLMLoss (loss/loss_utils.py) upcasts the logits to fp32 and calls cross_entropy:
    log_softmax saves its fp32 output. At the start of backward, nll_loss's gradient (fp32) and
    log_softmax's gradient (fp32) join the saved log-softmax: tokens x vocab x 12 (for OPT-13B at 512
    tokens 3 x 98 MiB, feasibility.md §4). The lm_head's own output is gone by then when the training loop
    keeps only the loss (the HF Trainer's compute_loss does; the feasibility script held the model output and
    so also saw the 49 MiB of fp16 logits) — ``memplan simulate`` agrees to the byte.
    """
    # The lm_head computes in its weight's dtype: fp32 after the kbit upcast or at 32 bits.
    lb = 4 if (setup.upcast_non_quantized or setup.bits == 32) else DTYPE_BYTES[setup.dtype]
    tv = tokens * spec.vocab_size
    if not spec.is_causal_lm:
        # BertForMaskedLM calls CrossEntropyLoss on the scores as they are (no fp32 upcast): log-softmax and
        # both gradients in the logits' dtype (modeling_bert.py).
        return tv * 2 * lb, tv * 3 * lb
    softcap = tv * lb if spec.final_logit_softcapping else 0  # gemma-2: tanh output saved
    upcast_copy = tv * 4 if lb < 4 else 0
    fwd = tv * lb + upcast_copy + tv * 4 + softcap  # the fp32 copy is alive while log_softmax runs
    bwd = tv * 12 + softcap
    return fwd, bwd


def _backward_transient_per_token(spec: ModelSpec, setup: TrainSetup, hb: int) -> int:
    """Gradient temporaries while backpropagating one layer: incoming and outgoing hidden-state gradients
    plus the MLP's intermediate gradients (gated: three ffn-wide, plain: two)."""
    h, ffn = spec.hidden_size, spec.intermediate_size
    if spec.num_experts > 1:
        mlp = spec.num_experts_per_tok * 3 * ffn
    else:
        mlp = (3 if spec.mlp_kind == "gated" else 2) * ffn
    return hb * (2 * h + mlp)


def _backward_transient_per_token_seq(spec: ModelSpec, setup: TrainSetup) -> int:
    """Eager attention's backward makes fp32 gradients of the probabilities and the scores."""
    if _attention_kernel(spec, setup.attn, 4 if setup.upcast_non_quantized else DTYPE_BYTES[setup.dtype]) == "flash":
        return 0
    return 2 * 4 * spec.num_attention_heads


def _dequant_transient_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """bnb dequantizes a 4-bit weight to the compute dtype for the matmul in forward (training path) and
    backward (bitsandbytes/autograd/_functions.py MatMul4Bit), and int8 backward multiplies by the
    dequantized CB * SCB / 127: one weight of the largest quantized layer is alive at a time."""
    if setup.bits not in (4, 8):
        return 0
    largest = max((lin.weight_numel // lin.num_experts for lin, _ in _all_linears(spec) if lin.quantized_by_bnb),
                  default=0)
    return largest * DTYPE_BYTES[setup.dtype]
