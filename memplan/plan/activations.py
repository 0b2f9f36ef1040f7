"""Activations, logits and transients: the memory that grows with the batch and the sequence.

Per token (and, for materialised attention scores, per token x position), what one decoder layer saves for
backward, what the model saves outside its layers, the logits and loss tensors, and the temporaries of the
backward pass. The reference numbers are the per-op byte attribution of a real OPT-13B LoRA step (32 bytes per
token per hidden unit per layer, plus the logits terms: docs/memory-model.md, "Activations"); the other
architectures follow the same rules applied to their transformers 5.23 modeling code (cited inline), and
``memplan simulate`` checks every one (reports/validation.md).

One owner of two choices: the residual stream's dtype (``memplan.plan.weights.float_weight_bytes``: fp32 after
``prepare_model_for_kbit_training`` or at 32 bits) and the CUDA attention kernel (``attention_kernel``); every
term here takes both from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.units import ceil_div

from .adapters import adapter_saved_per_token
from .attention import KV_BROADCAST, model_mask_bytes, repeats_kv, sdpa_kernel, sdpa_mask_materialised
from .dtypes import DTYPE_BYTES
from .precision import autocast_bytes
from .trainable import adapted_linears
from .weights import all_linears, float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["LayerActivations", "attention_kernel", "residual_bytes", "sdpa_mask_materialised", "model_mask_bytes",
           "layer_activations", "zero3_linear", "frozen_linears_save_inputs", "checkpoint_input_per_token",
           "checkpoint_input_shared_per_token",
           "model_extras_per_token", "full_backward_end", "logits_bytes", "backward_transient_per_token",
           "backward_transient_per_token_seq", "dequant_transient_bytes"]


# Activation functions and how many ffn-sized tensors they save for backward (transformers/activations.py):
# relu saves its output; F.gelu / silu / gelu_pytorch_tanh save their input; NewGELUActivation ("gelu_new")
# is written in Python and saves input, tanh output, 0.5*input and 1+tanh: four tensors; FastGELUActivation
# ("gelu_fast", 0.5*x*(1+tanh(x*0.7978845608*(1+0.044715*x*x)))) saves seven: x, 0.044715*x, 0.79788*x,
# 1+0.044715*x*x, the tanh output, 0.5*x and 1+tanh (each tensor-tensor mul saves both operands).
_ACT_SAVED = {"relu": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "gelu_new": 4,
              "gelu_fast": 7, "quick_gelu": 2, "bloom_gelu": 1}



@dataclass(frozen=True)
class LayerActivations:
    per_token: int  # bytes saved per token per layer
    per_token_seq: int  # bytes saved per token per layer per sequence position (eager attention: s^2 terms)


def _norms_per_layer(spec: ModelSpec) -> int:
    n = sum(1 for p in spec.params if p.per_layer and p.kind == "norm" and p.name.endswith("weight"))
    return n or 2


def _norm_saved_per_token(spec: ModelSpec, hb: int, width: int, trainable: bool, ac: int = 0) -> int:
    if spec.norm_kind == "rmsnorm":
        # LlamaRMSNorm & co. (modeling_llama.py): x.to(float32); pow(2) saves the fp32 copy; rsqrt saves
        # one fp32 per token; the final ``weight * x`` saves x only when the weight trains.
        saved = 4 * width + 4
    else:
        # aten.native_layer_norm saves its input and fp32 mean and rstd per token; under autocast layer_norm
        # is on the fp32 list, so a 16-bit input is saved as its fp32 copy (memplan.plan.precision).
        saved = (4 if ac else hb) * width + 8
    if trainable:
        saved += hb * width
    return saved


# Eager attention that takes the softmax in the input dtype instead of fp32 + cast back: GPT-2
# (``softmax(attn_weights, dim=-1)`` then ``.type(value.dtype)``), BERT and Falcon (modeling_<type>.py).
_EAGER_SOFTMAX_IN_INPUT_DTYPE = frozenset({"gpt2", "bert", "falcon"})


def attention_kernel(spec: ModelSpec, setup: TrainSetup) -> str:
    """The kernel that saves the attention activations of ``setup`` on CUDA (``memplan.plan.attention.sdpa_kernel``),
    for the residual stream's dtype: the one place the activation and the backward terms take it from."""
    return sdpa_kernel(spec, setup.attn, autocast_bytes(setup) or residual_bytes(spec, setup),
                       sdpa_mask_materialised(spec, setup), repeats_kv(spec, setup))


def residual_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per value of the residual stream, which the activations inside a layer follow: the float weights'
    dtype (``weights.float_weight_bytes``), except under autocast with 4/8-bit linears in a LayerNorm model:
    layer_norm is on autocast's fp32 list, bitsandbytes casts each projection's output back to its (fp32) input's
    dtype, and the MLP's fp32 output turns the residual sum fp32 (``memplan simulate``: OPT and GPT-2 QLoRA
    without the upcast, under bf16 autocast)."""
    if autocast_bytes(setup) and spec.norm_kind != "rmsnorm" and (_bnb_layers(spec, setup.bits) or not _pre_norm(spec)):
        return 4  # post-norm layers (BERT, opt-350m) output their LayerNorm's fp32 result itself
    return float_weight_bytes(setup)


def _bnb_layers(spec: ModelSpec, bits: int) -> bool:
    """Whether the layers' projections are bitsandbytes modules (not at 16/32 bits; not Falcon's FalconLinear,
    which bitsandbytes leaves in float)."""
    return bits in (4, 8) and any(lin.quantized_by_bnb for lin in spec.layer_linears)


# Models whose projections do not call torch.nn.functional.linear: GPT-2's Conv1D (torch.addmm, transformers 5.24.0
# pytorch_utils.py:119) and Falcon's FalconLinear (``input @ self.weight.T``, models/falcon/modeling_falcon.py:62).
_OWN_MATMUL = ("gpt2", "falcon")


def zero3_linear(setup: TrainSetup) -> bool:
    """Whether DeepSpeed ZeRO-3's linear runs the frozen ``nn.Linear`` layers: ZeRO-3 installs its
    ``LinearFunctionForZeroStage3`` as ``torch.nn.functional.linear`` (``zero.Init`` and the engine's own
    partitioning; ``memory_efficient_linear`` defaults to true: deepspeed 0.19.8
    runtime/zero/partition_parameters.py:412 ``_enable_mem_efficient_linear``), and its ``setup_context`` saves
    input, weight and bias whatever needs a gradient (runtime/zero/linear.py:100)."""
    return setup.strategy == "zero3" and setup.method != "full"


def frozen_linears_save_inputs(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether the layers' frozen projections save their inputs for backward although no weight gradient needs
    them: LLM.int8's MatMul8bitLt always does; so does ZeRO-3's linear over 16/32-bit ``nn.Linear`` weights
    (``zero3_linear``; bitsandbytes' 4-bit layers, GPT-2's Conv1D and Falcon's FalconLinear do not call it)."""
    return setup.bits == 8 or (zero3_linear(setup) and setup.bits >= 16 and spec.model_type not in _OWN_MATMUL)


def layer_activations(spec: ModelSpec, setup: TrainSetup) -> LayerActivations:
    """Bytes one decoder layer keeps for backward, per token (and per token x seq for eager attention)."""
    return _layer_activations_cached(spec, setup.attn, setup.lora_dropout, setup.adapter_dtype, setup.rank,
                                     setup.targets or "", setup.method, setup.bits, setup.dtype,
                                     residual_bytes(spec, setup), sdpa_mask_materialised(spec, setup),
                                     autocast_bytes(setup), repeats_kv(spec, setup), setup.adapter,
                                     frozen_linears_save_inputs(spec, setup))


def checkpoint_input_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """What gradient checkpointing keeps of each layer: its input, one hidden state per token."""
    return spec.hidden_size * residual_bytes(spec, setup)


def checkpoint_input_shared_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """The part of a checkpointed input that its layer, recomputed in backward, saves again as the same tensor
    (counted in ``layer_activations`` already): the whole input in pre-norm layers whose first norm saves it
    as it is, i.e. a LayerNorm (``native_layer_norm`` saves its input), or an RMSNorm whose ``x.to(float32)``
    is a no-op because the residual stream is fp32. Non-reentrant checkpointing (torch.utils.checkpoint,
    use_reentrant=False, as transformers 5 calls it) recomputes the layer on the very input tensor it kept, so
    both are one storage (``memplan simulate``: docs/memory-model.md, "Phases"). 0 for post-norm layers (BERT,
    OPT with do_layer_norm_before=False: the first norm reads the residual sum, not the input) and for 16-bit
    RMSNorm, which saves an fp32 copy."""
    if not _pre_norm(spec):
        return 0
    hb = residual_bytes(spec, setup)
    if hb < 4 and (spec.norm_kind == "rmsnorm" or autocast_bytes(setup)):
        return 0  # (under autocast a LayerNorm saves the fp32 cast of a 16-bit input, not the input)
    return spec.hidden_size * hb


def _pre_norm(spec: ModelSpec) -> bool:
    """Every catalog architecture normalises the layer input first, except BERT and post-LN OPT (opt-350m)."""
    if spec.model_type == "bert":
        return False
    return not (spec.model_type == "opt" and spec.config.get("do_layer_norm_before", True) is False)


@lru_cache(maxsize=4096)
def _layer_activations_cached(spec: ModelSpec, attn: str, lora_dropout: float, adapter_dtype: str, rank: int,
                              targets: str, method: str, bits: int, dtype: str, hb: int,
                              masked: bool = False, ac: int = 0, kv_repeated: bool = False,
                              adapter: str = "lora", frozen_save_inputs: bool = False) -> LayerActivations:
    h = spec.hidden_size
    d = spec.head_dim
    q_dim = spec.num_attention_heads * d
    kv_dim = spec.num_key_value_heads * d
    heads = spec.num_attention_heads
    ffn = spec.intermediate_size
    a = hb  # activations inside the layer follow the residual stream's dtype (float_weight_bytes)
    # Under autocast (ac: its bytes; memplan.plan.precision) matmuls return the autocast dtype: the outputs of
    # plain nn.Linear layers (bitsandbytes casts its own back to the input dtype) and what SDPA saves.
    lin = ac if ac and not _bnb_layers(spec, bits) else a  # (bnb layers: the residual dtype, see residual_bytes)
    att = ac or a
    full = method == "full"
    per_tok = 0
    per_tok_seq = 0

    # Norms: each saves its input (+ per-token statistics).
    per_tok += _norms_per_layer(spec) * _norm_saved_per_token(spec, a, h, trainable=full, ac=ac)

    # Attention: which kernel saves what (memplan.plan.attention.sdpa_kernel).
    kernel = sdpa_kernel(spec, attn, att, masked, kv_repeated)
    if kernel == "flash":
        # flash / memory-efficient kernels (and flash_attention_2) save q, k, v, the output and an fp32
        # logsumexp per head and token (aten._scaled_dot_product_flash_attention's saved outputs,
        # docs/memory-model.md). GQA runs natively without repeat_kv when there is no mask
        # (transformers/integrations/sdpa_attention.py use_gqa_in_sdpa).
        # (k/v repeated by transformers -- with a mask, or on a stack without native GQA -- are head-sized)
        kv_saved = q_dim if (masked or kv_repeated) and spec.model_type not in KV_BROADCAST else kv_dim
        per_tok += att * (q_dim + 2 * kv_saved + q_dim) + 4 * heads
        if masked:
            # SDPA turns the bool mask into an additive one in the query dtype (torch/nn/functional.py
            # _canonical_mask: zeros_like(mask, dtype).masked_fill_): a new (B, 1, S, S) tensor per call, which
            # the memory-efficient kernel saves as attn_bias for backward.
            per_tok_seq += att
    else:
        # eager_attention_forward and SDPA's math kernel: k and v repeated to every head; the q @ k^T matmul
        # saves q and k.
        kv_saved = kv_dim if spec.model_type in KV_BROADCAST else q_dim
        per_tok += att * (q_dim + 2 * kv_saved)
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
        if kernel == "eager" and ac:
            # softmax runs in fp32 (set_opt_dtype); the matmul with v saves an autocast-dtype cast of it
            probs_bytes, copy_bytes, matmul_dtype_bytes = 4, ac, ac
        elif kernel == "eager" and spec.model_type in _EAGER_SOFTMAX_IN_INPUT_DTYPE:
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
    if spec.model_type == "phi3" and not (ac and lin != att):
        # Phi3Attention slices q, k, v out of one qkv_proj output; q and k are replaced by their rotary
        # copies but v stays a view, so saving v keeps the whole fused buffer alive (modeling_phi3.py). Under
        # autocast with a bitsandbytes qkv_proj (fp32 output) SDPA saves a bf16 cast of v instead.
        per_tok += lin * (q_dim + kv_dim)
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
        per_tok += k * lin * (3 * ffn + h) + 4 * spec.num_experts
    elif spec.mlp_kind == "gated":
        # act(gate) saves gate; act(gate) * up saves both operands (modeling_llama.py LlamaMLP).
        per_tok += lin * (n_saved * ffn + 2 * ffn)
    elif ac and spec.hidden_act == "gelu_new":
        # NewGELU under autocast: pow is on the fp32 list and saves the fp32 cast of its input; tanh's output and
        # 1 + tanh are fp32 too; only 0.5 * input keeps the fc1 output's dtype (memplan simulate, gpt2-medium).
        per_tok += (3 * 4 + lin) * ffn
    else:
        # fc1 -> act -> fc2 with frozen fc1/fc2: only the activation's saved tensors stay.
        per_tok += lin * n_saved * ffn
        if spec.activation_dropout > 0:
            per_tok += ffn  # mask
    if full:
        # Trainable weights make every linear save its input: the normed input (shared by q/k/v), the
        # attention output, the MLP input and the MLP hidden activation.
        per_tok += (ac or a) * (h + q_dim + h + ffn * max(1, spec.num_experts_per_tok if spec.num_experts > 1 else 1))

    # LoRA: per adapted module, lora_A's input (x cast to the adapter dtype, or the dropout output) is saved,
    # plus the dropout's bool mask and lora_A's output, saved by lora_B (peft/tuners/lora/layer.py Linear).
    if method != "full" and targets:
        # under autocast lora_A saves an autocast-dtype cast of its input, and lora_B lora_A's output
        ab = ac or DTYPE_BYTES[adapter_dtype]
        layer_names = {x.name for x in spec.layer_linears}
        # the adapter variants' own terms (DoRA, LoRA-FA, IA3): memplan.plan.adapters
        lora_tok = adapter_saved_per_token(spec, targets, adapter, rank=rank, dropout=lora_dropout > 0, ab=ab,
                                           base_b=lin, adapter_b=DTYPE_BYTES[adapter_dtype], layer_names=layer_names)
        per_tok += ceil_div(lora_tok, spec.num_layers)

    # Frozen projections that save their input anyway (frozen_linears_save_inputs: LLM.int8's MatMul8bitLt,
    # DeepSpeed ZeRO-3's linear) keep it once per distinct input that no other op saves already: the normed
    # inputs of attention and MLP, and the MLP hidden activation when the activation function saved its input
    # rather than its output (ZeRO-3, Llama-2-7B: 2 x hidden + intermediate per token and layer, memplan simulate).
    if frozen_save_inputs and not full:
        distinct = h if spec.parallel_attn_mlp else 2 * h
        if attn == "eager":
            distinct += q_dim
        if spec.hidden_act != "relu":
            distinct += ffn
        per_tok += a * distinct
    return LayerActivations(per_tok, per_tok_seq)


def model_extras_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Per-token bytes saved outside the layer stack: ids/labels, embedding dropout, final norm."""
    hb = residual_bytes(spec, setup)
    per_tok = 2 * 8  # input_ids and labels, int64
    if spec.embedding_dropout > 0:
        per_tok += spec.hidden_size  # bool mask
    per_tok += _norm_saved_per_token(spec, hb, spec.hidden_size, trainable=setup.method == "full",
                                      ac=autocast_bytes(setup))
    if zero3_linear(setup) and spec.is_causal_lm:
        per_tok += hb * spec.hidden_size  # ZeRO-3's linear saves the (frozen nn.Linear) lm_head's input
    if not spec.is_causal_lm:
        # BERT MLM head transform: gelu saves its input, LayerNorm saves its input (modeling_bert.py).
        per_tok += 2 * hb * spec.hidden_size + 8
    if setup.method != "full" and setup.targets:
        top = {x.name for x in spec.top_linears + spec.tied_linears}  # adapters on lm_head save its input too
        ab = autocast_bytes(setup) or DTYPE_BYTES[setup.adapter_dtype]
        for lin in adapted_linears(spec, setup.targets):
            if lin.name in top:  # same terms as a per-layer adapter (see _layer_activations_cached)
                mask = lin.in_features if setup.lora_dropout > 0 else 0
                per_tok += lin.in_features * ab + mask + setup.rank * lin.lora_rank_multiplier * ab
    return per_tok


def full_backward_end(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int, int]:
    """Full fine-tuning at backward_end, when the last gradient -- the input embedding's -- is made: (activations
    per token, transient bytes, transient bytes per token). Every layer's saved tensors are gone by then, with
    or without checkpointing; input_ids and labels remain (2 x 8 B per token). A tied lm_head's gradient waits
    in autograd's input buffer until the embedding's own arrives and the two are summed into ``.grad``: both
    addends are alive as that sum is made (2 x its weight's size); untied, what is alive is the gradient of the
    embedding output, one hidden state per token. ``memplan simulate`` matches these to the byte (opt-350m,
    bert-large, gemma-2-2b, tinyllama-1.1b; docs/memory-model.md, "Phases")."""
    b = float_weight_bytes(setup)
    tied = sum(lin.in_features * lin.out_features for lin in spec.tied_linears)
    if tied:
        return 16, 2 * tied * b, 0
    return 16, 0, spec.hidden_size * b


def logits_bytes(spec: ModelSpec, setup: TrainSetup, tokens: int) -> tuple[int, int]:
    """(forward_end, backward_start) bytes of the logits and loss tensors.

    transformers ForCausalLMLoss (loss/loss_utils.py) upcasts the logits to fp32 and calls cross_entropy:
    log_softmax saves its fp32 output. At the start of backward, nll_loss's gradient (fp32) and
    log_softmax's gradient (fp32) join the saved log-softmax: tokens x vocab x 12 (for OPT-13B at 512
    tokens 3 x 98 MiB, docs/memory-model.md). The lm_head's own output is gone by then when the training loop
    keeps only the loss (the HF Trainer's compute_loss does; a loop that holds the model output also keeps
    the 16-bit logits, 49 MiB there) — ``memplan simulate`` agrees to the byte.
    """
    lb = autocast_bytes(setup) or float_weight_bytes(setup)  # the lm_head computes in its weight's (autocast) dtype
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


def backward_transient_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Gradient temporaries while backpropagating one layer: incoming and outgoing hidden-state gradients
    plus the MLP's intermediate gradients (gated: three ffn-wide, plain: two)."""
    h, ffn = spec.hidden_size, spec.intermediate_size
    if spec.num_experts > 1:
        mlp = spec.num_experts_per_tok * 3 * ffn
        if any(lin.num_experts > 1 and lin.peft_target == "module" for lin in spec.layer_linears):
            mlp = ceil_div(mlp, spec.num_experts)  # transformers 4.x's experts loop: one expert's tokens at a time
    else:
        mlp = (3 if spec.mlp_kind == "gated" else 2) * ffn
    return residual_bytes(spec, setup) * (2 * h + mlp)


def backward_transient_per_token_seq(spec: ModelSpec, setup: TrainSetup) -> int:
    """Materialised attention (eager, SDPA's math kernel) makes fp32 gradients of the probabilities and the
    scores in backward."""
    if attention_kernel(spec, setup) == "flash":
        return 0
    return 2 * 4 * spec.num_attention_heads


def dequant_transient_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """bnb dequantizes a 4-bit weight to the compute dtype for the matmul in forward (training path) and
    backward (bitsandbytes/autograd/_functions.py MatMul4Bit), and int8 backward multiplies by the
    dequantized CB * SCB / 127: one weight of the largest quantized layer is alive at a time."""
    if setup.bits not in (4, 8):
        return 0
    largest = max((lin.weight_numel // lin.num_experts for lin, _ in all_linears(spec) if lin.quantized_by_bnb),
                  default=0)
    return largest * DTYPE_BYTES[setup.dtype]
