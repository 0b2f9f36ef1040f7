"""Rotary pre-norm decoders: the Llama family (llama, mistral, mixtral, qwen2, gemma2), phi, phi3, stablelm.

Each builder reads one architecture's config.json values and returns the ``ModelSpec`` fields of the model
transformers 5.23 builds (``AutoModelForCausalLM``); the docstrings cite the modeling files read.
"""

from __future__ import annotations

from .config_values import (ConfigValues, dropout_fields, layernorm, linear, lm_head, opt_float, rmsnorm,
                            standard_sizes, tied)
from .spec import ParamSpec

__all__ = ["llama_like", "phi", "phi3", "stablelm"]


def llama_like(c: ConfigValues) -> dict:
    """llama, mistral, mixtral, qwen2, gemma2: pre-norm decoder, RMSNorm, rotary, SwiGLU/GeGLU MLP.

    transformers/models/{llama,mistral,mixtral,qwen2,gemma2}/modeling_*.py: q/k/v/o_proj, gate/up/down_proj
    (Mixtral: router + fused experts), input_layernorm + post_attention_layernorm (+ gemma2's
    pre/post_feedforward_layernorm), model.norm, lm_head. Only attention-probability dropout exists.
    """
    mt = c.model_type
    h, n_layers, heads, vocab, inter = standard_sizes(c)
    # configuration_*.py defaults for num_key_value_heads: llama None, mistral/mixtral 8, qwen2 32, gemma2 4;
    # None (absent for llama, or JSON null) means multi-head attention.
    kv = c.opt_int("num_key_value_heads", {"llama": None, "mistral": 8, "mixtral": 8, "qwen2": 32, "gemma2": 4}[mt])
    kv = heads if kv is None else kv
    # head_dim: gemma2 has a field defaulting to 256 (not derived); the others fall back to hidden/heads
    # (LlamaAttention: getattr(config, "head_dim", ...), MistralAttention: `head_dim or hidden // heads`).
    hd = c.opt_int("head_dim", 256 if mt == "gemma2" else None) or h // heads
    q_out, kv_out = heads * hd, kv * hd
    if mt == "llama":
        attn_bias = o_bias = bool(c.get("attention_bias", False))
        mlp_bias = bool(c.get("mlp_bias", False))
    elif mt == "gemma2":
        attn_bias = o_bias = bool(c.get("attention_bias", False))
        mlp_bias = False
    elif mt == "qwen2":  # Qwen2Attention: q/k/v bias=True, o_proj bias=False
        attn_bias, o_bias, mlp_bias = True, False, False
    else:
        attn_bias = o_bias = mlp_bias = False
    lin = [
        linear("self_attn.q_proj", h, q_out, attn_bias, "attn_q"),
        linear("self_attn.k_proj", h, kv_out, attn_bias, "attn_k"),
        linear("self_attn.v_proj", h, kv_out, attn_bias, "attn_v"),
        linear("self_attn.o_proj", q_out, h, o_bias, "attn_out"),
    ]
    experts, per_tok = 1, 1
    if mt == "mixtral":
        # MixtralSparseMoeBlock: gate = MixtralTopKRouter (weight (E, h), not an nn.Linear), experts =
        # MixtralExperts with 3-D gate_up_proj (E, 2*inter, h) and down_proj (E, h, inter). bnb leaves all of
        # them 16-bit (only exact nn.Linear modules are replaced); peft adapts them as parameters.
        experts = c.opt_int("num_local_experts", 8, "num_experts")  # attribute_map: num_experts
        per_tok = c.opt_int("num_experts_per_tok", 2)
        lin += [
            linear("mlp.gate.weight", h, experts, False, "router", quantized_by_bnb=False, peft_target="parameter"),
            linear("mlp.experts.gate_up_proj", h, 2 * inter, False, "experts_gate_up", num_experts=experts,
                 quantized_by_bnb=False, peft_target="parameter", lora_rank_multiplier=2),
            linear("mlp.experts.down_proj", inter, h, False, "experts_down", num_experts=experts,
                 quantized_by_bnb=False, peft_target="parameter"),
        ]
    else:
        lin += [
            linear("mlp.gate_proj", h, inter, mlp_bias, "mlp_gate"),
            linear("mlp.up_proj", h, inter, mlp_bias, "mlp_up"),
            linear("mlp.down_proj", inter, h, mlp_bias, "mlp_down"),
        ]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if mt == "gemma2":  # Gemma2DecoderLayer: 4 RMSNorms (sandwich norm around attention and MLP)
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    params = [p for n in norms for p in rmsnorm(n, h)]
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"), *rmsnorm("model.norm", h,
                                                                                         per_layer=False)]
    is_tied = tied(c, mt == "gemma2")  # only Gemma2Config defaults to is_tied embeddings
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    defaults_pos = {"llama": 2048, "mistral": 4096 * 32, "mixtral": 4096 * 32, "qwen2": 32768, "gemma2": 8192}
    if mt == "qwen2":  # Qwen2Config.__post_init__: sliding_window only when use_sliding_window
        window = c.opt_int("sliding_window", 4096) if c.get("use_sliding_window", False) else None
    else:
        window = c.opt_int("sliding_window", {"mistral": 4096, "gemma2": 4096}.get(mt))
    act = c.get("hidden_activation", "gelu_pytorch_tanh") if mt == "gemma2" else c.get("hidden_act", "silu")
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab,
        max_position_embeddings=c.opt_int("max_position_embeddings", defaults_pos[mt]),
        tie_word_embeddings=is_tied, mlp_kind="gated", hidden_act=act or "silu", norm_kind="rmsnorm",
        parallel_attn_mlp=False, position_embedding="rotary",
        attention_dropout=c.num("attention_dropout"), residual_dropout=0.0, embedding_dropout=0.0,
        activation_dropout=0.0, num_experts=experts, num_experts_per_tok=per_tok,
        attn_logit_softcapping=opt_float(c.get("attn_logit_softcapping", 50.0)) if mt == "gemma2" else None,
        final_logit_softcapping=opt_float(c.get("final_logit_softcapping", 30.0)) if mt == "gemma2" else None,
        sliding_window=window, is_causal_lm=True, layer_prefix="model.layers",
        layer_linears=tuple(lin), top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        residual_dropout_sites=0, rotary_dim=hd,
    )



def phi(c: ConfigValues) -> dict:
    """transformers/models/phi/modeling_phi.py (phi-1, phi-1.5, phi-2).

    PhiDecoderLayer is a parallel block: one input_layernorm feeds both self_attn and mlp; resid_dropout is
    applied to each output separately. PhiAttention: q/k/v_proj and dense with bias; optional q_layernorm /
    k_layernorm over head_dim. PhiMLP: fc1, fc2 with bias. PhiModel: embed_tokens, embed_dropout (embd_pdrop),
    final_layernorm. lm_head HAS a bias. Partial rotary (partial_rotary_factor, default 0.5).
    """
    h, n_layers, heads, vocab, inter = standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", None) or heads
    hd = c.opt_int("head_dim", None) or h // heads
    lin = (
        linear("self_attn.q_proj", h, heads * hd, True, "attn_q"),
        linear("self_attn.k_proj", h, kv * hd, True, "attn_k"),
        linear("self_attn.v_proj", h, kv * hd, True, "attn_v"),
        linear("self_attn.dense", heads * hd, h, True, "attn_out"),
        linear("mlp.fc1", h, inter, True, "mlp_up"),
        linear("mlp.fc2", inter, h, True, "mlp_down"),
    )
    params = layernorm("input_layernorm", h)
    if c.get("qk_layernorm", False):  # nn.LayerNorm(hidden // heads) on q and on k
        params += layernorm("self_attn.q_layernorm", h // heads) + layernorm("self_attn.k_layernorm", h // heads)
    params += [
        ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
        *layernorm("model.final_layernorm", h, per_layer=False),
    ]
    is_tied = tied(c, False)
    top, tied_l, extra = lm_head(h, vocab, is_tied, bias=True)
    resid = c.num("resid_pdrop", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 2048),
        tie_word_embeddings=is_tied, mlp_kind="plain", hidden_act=c.get("hidden_act", "gelu_new") or "gelu_new",
        norm_kind="layernorm", parallel_attn_mlp=True, position_embedding="rotary",
        **dropout_fields(c.num("attention_dropout", 0.0), [resid, resid], embed=c.num("embd_pdrop", 0.0)),
        layer_prefix="model.layers", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(0.5)),
    )


def phi3(c: ConfigValues) -> dict:
    """transformers/models/phi3/modeling_phi3.py.

    Phi3Attention: fused qkv_proj (h -> (heads + 2 * kv) * head_dim) and o_proj, no bias. Phi3MLP: fused
    gate_up_proj (h -> 2 * inter) and down_proj (SwiGLU). RMSNorm input/post_attention_layernorm, model.norm.
    resid_pdrop is applied to the attention and the MLP output (resid_attn_dropout / resid_mlp_dropout);
    5.23's Phi3Model applies no embedding dropout (embd_pdrop is unused).
    """
    h, n_layers, heads, vocab, inter = standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", None) or heads
    hd = c.opt_int("head_dim", None) or h // heads
    lin = (
        linear("self_attn.o_proj", heads * hd, h, False, "attn_out"),
        linear("self_attn.qkv_proj", h, (heads + 2 * kv) * hd, False, "attn_qkv"),
        linear("mlp.gate_up_proj", h, 2 * inter, False, "mlp_gate_up"),
        linear("mlp.down_proj", inter, h, False, "mlp_down"),
    )
    params = rmsnorm("input_layernorm", h) + rmsnorm("post_attention_layernorm", h)
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
               *rmsnorm("model.norm", h, per_layer=False)]
    is_tied = tied(c, False)
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    resid = c.num("resid_pdrop", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 4096),
        tie_word_embeddings=is_tied, mlp_kind="gated", hidden_act=c.get("hidden_act", "silu") or "silu",
        norm_kind="rmsnorm", parallel_attn_mlp=False, position_embedding="rotary",
        **dropout_fields(c.num("attention_dropout", 0.0), [resid, resid]),
        sliding_window=c.opt_int("sliding_window", None), is_causal_lm=True, layer_prefix="model.layers",
        layer_linears=lin, top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(1.0)),
    )


def stablelm(c: ConfigValues) -> dict:
    """transformers/models/stablelm/modeling_stablelm.py.

    StableLmAttention: q/k/v_proj (bias = use_qkv_bias), o_proj (h -> h, no bias), head_dim = hidden / heads;
    qk_layernorm adds per-head LayerNorms without bias (heads * head_dim and kv * head_dim values).
    StableLmMLP: gate/up/down_proj, no bias. LayerNorm (with bias) input_layernorm, post_attention_layernorm
    (absent with use_parallel_residual), model.norm. hidden_dropout is applied to the MLP output only.
    Partial rotary (partial_rotary_factor, default 0.25).
    """
    h, n_layers, heads, vocab, inter = standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", 32) or heads
    hd = h // heads
    qkv_bias = bool(c.get("use_qkv_bias", False))
    parallel = bool(c.get("use_parallel_residual", False))
    lin = (
        linear("self_attn.q_proj", h, heads * hd, qkv_bias, "attn_q"),
        linear("self_attn.k_proj", h, kv * hd, qkv_bias, "attn_k"),
        linear("self_attn.v_proj", h, kv * hd, qkv_bias, "attn_v"),
        linear("self_attn.o_proj", h, h, False, "attn_out"),
        linear("mlp.gate_proj", h, inter, False, "mlp_gate"),
        linear("mlp.up_proj", h, inter, False, "mlp_up"),
        linear("mlp.down_proj", inter, h, False, "mlp_down"),
    )
    params = layernorm("input_layernorm", h)
    if not parallel:
        params += layernorm("post_attention_layernorm", h)
    if c.get("qk_layernorm", False):  # StableLmLayerNormPerHead: one bias-free LayerNorm(head_dim) per head
        params += [ParamSpec("self_attn.q_layernorm.weight", heads * hd, "norm", True),
                   ParamSpec("self_attn.k_layernorm.weight", kv * hd, "norm", True)]
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
               *layernorm("model.norm", h, per_layer=False)]
    is_tied = tied(c, False)
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 4096),
        tie_word_embeddings=is_tied, mlp_kind="gated", hidden_act=c.get("hidden_act", "silu") or "silu",
        norm_kind="layernorm", parallel_attn_mlp=parallel, position_embedding="rotary",
        **dropout_fields(c.num("attention_dropout", 0.0), [c.num("hidden_dropout", 0.0)]),
        layer_prefix="model.layers", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(0.25)),
    )

