"""Which CUDA attention kernel saves a layer's attention activations, and what transformers hands it.

One owner of three decisions ``memplan.plan.activations`` builds on: whether transformers gives SDPA an explicit
mask (``sdpa_mask_materialised``), whether it repeats grouped-query k/v to every head itself (``repeats_kv``:
the library stack, ``memplan.plan.versions``), and the kernel torch then picks (``sdpa_kernel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .seq_shapes import mask_rows, masked_batch
from .versions import Stack, applies, parse_version, stack_of

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["KV_BROADCAST", "SDPA_RELEASES", "sdpa_supported", "sdpa_mask_materialised", "model_mask_bytes",
           "repeats_kv", "sdpa_kernel"]

# Falcon broadcasts its shared k/v head to every head with ``expand`` (a view, modeling_falcon.py) and calls
# SDPA without enable_gqa: no GQA kernel constraint and no k/v copies, in SDPA and eager alike.
KV_BROADCAST = frozenset({"falcon"})


# The first release whose model class sets ``_supports_sdpa = True`` (the release before it, read too, does not),
# and the release that drops it again: transformers 4.45.2 / 4.46.3 models/opt/modeling_opt.py:604; 4.41.2 / 4.42.4
# models/gpt2/modeling_gpt2.py:783; 4.40.2 / 4.41.2 models/bert/modeling_bert.py:829; 4.38.2 / 4.39.3
# models/phi and models/stablelm; 4.44.2 / 4.45.2 models/phi3/modeling_phi3.py:846; 4.36.2 / 4.37.2 models/mistral,
# models/mixtral; 5.20.0 / 5.21.0 models/gemma2/modeling_gemma2.py:352 ("sdpa does not support softcapping").
# BLOOM never has it; the others (llama, qwen2, falcon, gpt_bigcode) have it in every modelled release.
SDPA_RELEASES: dict[str, tuple[str | None, str | None]] = {
    "opt": ("4.46.0", None), "gpt2": ("4.42.0", None), "bert": ("4.41.0", None), "phi": ("4.39.0", None),
    "stablelm": ("4.39.0", None), "phi3": ("4.45.0", None), "mistral": ("4.37.0", None), "mixtral": ("4.37.0", None),
    "gemma2": ("4.42.0", "5.21.0"), "bloom": ("99.0.0", None),
}


def sdpa_supported(model_type: str, stack: Stack) -> bool:
    """Whether the stack's transformers runs ``model_type`` with SDPA (rule "sdpa-support", memplan.plan.versions)."""
    since, until = SDPA_RELEASES.get(model_type, (None, None))
    v = stack.release("transformers")
    return (since is None or v >= parse_version(since)) and (until is None or v < parse_version(until))


def sdpa_mask_materialised(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether transformers hands SDPA an explicit mask for an unpadded batch: with a sliding window, once the
    sequence reaches the window. ``masking_utils._ignore_causal_mask_sdpa`` refuses the ``is_causal`` shortcut
    when ``kv_length >= local_attention_size`` (transformers 5.24 masking_utils.py:286-287), so
    ``create_sliding_window_causal_mask`` builds a (1, 1, S, S) bool mask, expanded (a view) to the batch
    (masking_utils.py ``sdpa_mask``), even where it is plain causal. Mistral (window 4096), Phi-3 (2047) and
    Qwen2 with ``use_sliding_window``; Gemma-2 runs eager attention only."""
    if setup.attn != "sdpa":
        return False
    # a packed row or padded rows: a block-diagonal / padding mask (memplan.plan.seq_shapes.masked_batch)
    return (spec.sliding_window is not None and setup.seq_len >= spec.sliding_window) or masked_batch(setup)


def model_mask_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """The model-level bool attention mask, when transformers builds one (``sdpa_mask_materialised``): one byte
    per (query, key) position, (1, 1, S, S) expanded to the batch as a view, so independent of the batch. Every
    layer's call reads it (and checkpointing keeps it as an input), so it lives through forward and backward."""
    if not sdpa_mask_materialised(spec, setup):
        return 0
    return mask_rows(setup) * setup.seq_len * setup.seq_len  # a packed or padding mask differs per row


def repeats_kv(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether transformers repeats a grouped-query model's k/v to every head before calling SDPA (a copy that
    SDPA saves, and a call without GQA): always before transformers 4.54 (rule "sdpa-repeats-kv"), and with
    torch < 2.5, which has no ``enable_gqa`` (rule "sdpa-native-gqa"). The masked case (``sdpa_mask_materialised``)
    repeats them on every stack and is handled there."""
    if setup.attn != "sdpa" or spec.num_key_value_heads >= spec.num_attention_heads or spec.model_type in KV_BROADCAST:
        return False
    stack = stack_of(setup.versions)
    return applies("sdpa-repeats-kv", stack) or not applies("sdpa-native-gqa", stack)


def sdpa_kernel(spec: ModelSpec, attn: str, a: int, masked: bool = False, kv_repeated: bool = False) -> str:
    """What saves the attention activations on CUDA: "flash" (flash or memory-efficient SDPA kernels and
    flash_attention_2 save the same tensors), "math" (SDPA's math fallback) or "eager"; ``a`` is the bytes per
    value of q/k/v.

    torch 2.13 SDPA selection (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): flash needs fp16/bf16,
    head_dim <= 256 and no explicit mask, and supports GQA; memory-efficient also takes fp32 and masks but not
    GQA; otherwise math. transformers passes enable_gqa only without a mask (integrations/sdpa_attention.py
    use_gqa_in_sdpa, lines 42-51); with a mask (``masked``, see ``sdpa_mask_materialised``) or on a stack that
    repeats k/v (``kv_repeated``, see ``repeats_kv``) it repeats k/v to every head itself, so the call is not
    grouped-query and a fused kernel takes it whatever the dtype: "flash"-class, with repeated k/v saved
    (``memplan.plan.activations``).
    """
    if attn != "sdpa":
        return "flash" if attn == "flash_attention_2" else "eager"
    if masked or kv_repeated:
        return "flash"
    gqa = spec.num_key_value_heads < spec.num_attention_heads and spec.model_type not in KV_BROADCAST
    # gpt_bigcode too: in transformers 5.23 it builds its mask with masking_utils.create_causal_mask (None for an
    # unpadded batch) and calls integrations/sdpa_attention.py, so multi-query attention is GQA with enable_gqa.
    if a < 4 and spec.head_dim <= 256:
        return "flash"
    return "math" if gqa and spec.head_dim <= 256 else "flash"
