"""The loss over the logits (``--loss``): transformers' cross-entropy, Liger's fused linear cross-entropy, or a
chunked cross-entropy.

- ``default``: transformers' ``ForCausalLMLoss`` on the full logits (``memplan.plan.activations.logits_bytes`` and
  ``memplan.plan.stack_effects.logits_bytes`` for older stacks).
- ``liger``: ``TrainingArguments(use_liger_kernel=True)`` (liger-kernel 0.8.5). ``apply_liger_kernel_to_<model>``
  swaps the model's forward for ``lce_forward`` (transformers/model/llama.py): in training with labels
  (``skip_logits = self.training and labels is not None``) the logits are never materialised;
  ``LigerForCausalLMLoss`` (transformers/model/loss_utils.py) hands the final hidden states and the lm_head weight to
  ``LigerFusedLinearCrossEntropyFunction`` (ops/fused_linear_cross_entropy.py,
  ``fused_linear_cross_entropy_forward``), which computes the loss *and the gradients* in forward, chunk by chunk:
  ``grad_input`` (BT x H, the hidden states' dtype) and, when the lm_head trains, ``grad_weight`` (V x H) exist for
  the whole loss; one chunk of logits (``chunk_size`` x V, same dtype, the Triton kernel upcasts to fp32 in
  registers and writes the logits' gradient over them in place); ``loss_1d`` (BT fp32) and ``target_mask`` (BT
  bool). Only ``grad_input`` (and ``grad_weight``) are saved for backward (``ctx.save_for_backward``); backward
  returns them as they are when the loss' gradient is 1 (``fused_linear_cross_entropy_backward``).
- ``chunked``: torchtune's ``CEWithChunkedOutputLoss`` (torchtune 0.6.1 modules/loss/ce_chunked_output_loss.py,
  ``num_output_chunks=8``) on ``TransformerDecoder.chunked_output`` (modules/transformer.py): the lm_head runs on
  8 chunks of the sequence, each chunk is upcast (``logits.float()``) and its cross-entropy summed
  (``reduction="sum"``), divided by the number of labelled tokens. All 8 chunks of 16-bit logits and all 8 saved
  fp32 log-softmaxes are alive at the end of the forward; only one chunk's fp32 copy is. Backward then handles one
  chunk at a time (its nll and log-softmax gradients), freeing its log-softmax.

``memplan simulate`` runs the chunked loss (``memplan.measure.loss_sim``); Liger's kernel needs Triton (a GPU), so
its bytes come from the source above only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .precision import autocast_bytes
from .weights import float_weight_bytes

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["LOSSES", "LIGER_MODEL_TYPES", "CHUNKED_OUTPUT_CHUNKS", "resolve_loss", "loss_bytes",
           "liger_chunk_size", "loss_notes"]

LOSSES = ("default", "liger", "chunked")

# liger-kernel 0.8.5 transformers/monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN: the model types
# ``use_liger_kernel`` patches (text models and the multimodal wrappers whose language model it patches).
LIGER_MODEL_TYPES = frozenset((
    "deepseek_v2", "deepseek_v3", "deepseek_v4", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4",
    "glm4", "glm4v", "glm4v_moe", "gpt_oss", "internvl", "llama", "llama4_text", "llama4", "llava", "granite",
    "mllama", "mllama_text_model", "ministral", "mistral", "mixtral", "muse_glimmer", "nemotron", "olmo2", "pixtral",
    "olmo3", "qwen2", "qwen3", "qwen3_moe", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text",
    "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl", "qwen3_vl_text",
    "qwen3_vl_moe", "qwen3_vl_moe_text", "smollm3", "phi3", "paligemma", "falcon_h1", "smolvlm", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "exaone4"))

# torchtune 0.6.1 modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss.__init__(num_output_chunks=8),
# the value its recipes' model builders pass to TransformerDecoder(num_output_chunks=...) too.
CHUNKED_OUTPUT_CHUNKS = 8


def resolve_loss(setup: TrainSetup, spec: ModelSpec, *, method: str) -> dict:
    """Fill None with ``default``; refuse a loss the model cannot run (one line: the value and what is allowed)."""
    value = setup.loss or "default"
    if value not in LOSSES:
        raise InvalidSetupError(f"invalid loss {value!r}; allowed: {', '.join(LOSSES)}")
    if value != "default" and not spec.is_causal_lm:
        raise InvalidSetupError(f"loss {value!r} needs a causal language model; {spec.name} ({spec.model_type}) is "
                                f"not one: allowed: default")
    if value == "liger" and spec.model_type not in LIGER_MODEL_TYPES:
        raise InvalidSetupError(f"loss 'liger': liger-kernel 0.8.5 has no patch for model_type {spec.model_type!r} "
                                f"(monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN); allowed for {spec.name}: "
                                f"default, chunked")
    return {"loss": value}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def liger_chunk_size(bt: int, vocab: int, hidden: int, chunk_mem_const: int = 1) -> int:
    """Rows of logits Liger materialises at once: liger-kernel 0.8.5 ops/fused_linear_cross_entropy.py,
    ``fused_linear_cross_entropy_forward``::

        inc_factor = triton.cdiv(V, chunk_mem_const * H)
        chunk_size = triton.next_power_of_2(triton.cdiv(BT, inc_factor))
        chunk_size = min(chunk_size, BT)

    (``_CHUNK_MEM_CONST = 1``): a logits chunk of about BT x H values, the size of the hidden states."""
    inc_factor = _cdiv(vocab, chunk_mem_const * hidden)
    return min(_next_power_of_2(_cdiv(bt, inc_factor)), bt)


def _head_trains(step: TrainSetup) -> bool:
    return step.method == "full"


def loss_bytes(spec: ModelSpec, step: TrainSetup, default_fwd: int, default_bwd: int) -> tuple[int, int]:
    """The logits + loss bytes at forward end and at the start of backward for ``step`` (a resolved setup at the
    step's batch rows and row length); ``default_*``: transformers' own cross-entropy's."""
    loss = step.loss or "default"
    if loss == "default":
        return default_fwd, default_bwd
    lb = autocast_bytes(step) or float_weight_bytes(step)  # the lm_head's output (and the hidden states') dtype
    v, h = spec.vocab_size, spec.hidden_size
    tokens = step.batch_size * step.seq_len
    if loss == "liger":
        chunk = liger_chunk_size(tokens, v, h)
        # grad_input + one logits chunk + loss_1d (fp32) + target_mask (bool); grad_weight when the lm_head trains
        # (its gradient: counted by estimate_for as ``gradients`` from backward on, here while forward makes it)
        head = v * h * lb if _head_trains(step) else 0
        fwd = tokens * h * lb + chunk * v * lb + tokens * (4 + 1) + head
        return fwd, tokens * h * lb  # backward starts with the saved grad_input only
    # chunked: the largest chunk has ceil(seq / 8) positions of every row (torch.chunk along the sequence)
    chunk_tokens = step.batch_size * _cdiv(step.seq_len, CHUNKED_OUTPUT_CHUNKS)
    tv, cv = tokens * v, chunk_tokens * v
    softcap = tv * lb if spec.final_logit_softcapping else 0  # gemma-2: every chunk's tanh output is saved
    upcast = cv * 4 if lb < 4 else 0  # one chunk's .float() copy (none when the logits are fp32)
    # Under autocast a frozen float lm_head weight in another dtype (QLoRA's fp32 upcast) is cast for every call:
    # autocast caches casts of leaves that require grad only (torch autocast_mode.cpp ``cached_cast``), so each
    # chunk's linear saves its own cast copy for the input gradient (the default loss' one copy is in the extras)
    ac = autocast_bytes(step)
    casts = (CHUNKED_OUTPUT_CHUNKS - 1) * v * h * ac if ac and float_weight_bytes(step) != ac else 0
    fwd = tv * lb + upcast + tv * 4 + softcap + casts  # all 16-bit chunks, one fp32 copy, all log-softmaxes
    bwd = tv * 4 + 2 * cv * 4 + softcap + casts  # all log-softmaxes + the last chunk's nll and softmax gradients
    return fwd, bwd


def loss_notes(spec: ModelSpec, step: TrainSetup) -> tuple[str, ...]:
    """What the estimate of a saver loss does not model, and in which direction it is off (for ``estimate_for``)."""
    loss = step.loss or "default"
    if loss == "liger":
        return ("liger: memplan models only the fused linear cross-entropy; use_liger_kernel also swaps RMSNorm, "
                "SwiGLU and RoPE by default (liger-kernel 0.8.5 apply_liger_kernel_to_llama: rope, rms_norm, swiglu "
                "= True), whose kernels save fewer tensors (LigerRMSNorm: its input and an fp32 rstd per row; "
                "LigerSiLUMulFunction: gate and up only, SiLU recomputed in backward), so the real activations are "
                "lower: this estimate is an upper bound. Liger needs Triton: memplan simulate cannot run it",)
    ac = autocast_bytes(step)
    if loss == "chunked" and ac and float_weight_bytes(step) != ac:
        return (f"chunked loss under autocast: the lm_head's weight is cast to the autocast dtype once per chunk "
                f"({CHUNKED_OUTPUT_CHUNKS} copies saved for backward, autocast caches casts of trainable leaves "
                f"only)",)
    return ()
