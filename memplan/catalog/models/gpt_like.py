"""Decoders with learned or ALiBi positions and the encoder: opt, gpt2 / gpt_bigcode, bloom, falcon, bert.

Each builder reads one architecture's config.json values and returns the ``ModelSpec`` fields of the model
transformers 5.23 builds (``AutoModelForCausalLM``; ``AutoModelForMaskedLM`` for bert); the docstrings cite
the modeling files read.
"""

from __future__ import annotations

from memplan.errors import ConfigError

from .config_values import ConfigValues, dropout_fields, layernorm, linear, lm_head, standard_sizes, tied
from .spec import LinearSpec, ParamSpec

__all__ = ["opt", "gpt2", "bloom", "falcon", "bert"]


def opt(c: ConfigValues) -> dict:
    """transformers/models/opt/modeling_opt.py.

    OPTDecoderLayer: q/k/v/out_proj and fc1/fc2 (bias = enable_bias), self_attn_layer_norm and
    final_layer_norm (no parameters when layer_norm_elementwise_affine is False). ``dropout`` is applied to
    the attention output and to fc2's output before each residual add; ``attention_dropout`` to the
    probabilities; 5.23 has no activation dropout and no embedding dropout.
    OPTDecoder: embed_tokens (vocab x word_embed_proj_dim), OPTLearnedPositionalEmbedding with 2 extra rows
    (offset 2), project_out / project_in (no bias) when word_embed_proj_dim != hidden_size (opt-350m),
    final_layer_norm only when do_layer_norm_before (opt-350m is post-LN and has none).
    """
    h = c.req("hidden_size")
    n_layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    vocab = c.req("vocab_size")
    ffn = c.req("ffn_dim")
    proj = c.opt_int("word_embed_proj_dim", None) or h  # OPTConfig.__post_init__: None -> hidden_size
    max_pos = c.opt_int("max_position_embeddings", 2048)
    bias = bool(c.get("enable_bias", True))
    affine = bool(c.get("layer_norm_elementwise_affine", True))
    pre_ln = bool(c.get("do_layer_norm_before", True))
    lin = (
        linear("self_attn.k_proj", h, h, bias, "attn_k"),
        linear("self_attn.v_proj", h, h, bias, "attn_v"),
        linear("self_attn.q_proj", h, h, bias, "attn_q"),
        linear("self_attn.out_proj", h, h, bias, "attn_out"),
        linear("fc1", h, ffn, bias, "mlp_up"),
        linear("fc2", ffn, h, bias, "mlp_down"),
    )
    params = [*layernorm("self_attn_layer_norm", h, affine=affine), *layernorm("final_layer_norm", h, affine=affine)]
    params += [
        ParamSpec("model.decoder.embed_tokens.weight", vocab * proj, "embedding"),
        ParamSpec("model.decoder.embed_positions.weight", (max_pos + 2) * h, "position_embedding"),
    ]
    top: list[LinearSpec] = []
    if proj != h:
        top += [linear("model.decoder.project_out", h, proj, False), linear("model.decoder.project_in", proj, h, False)]
    if pre_ln and not c.get("_remove_final_layer_norm", False):
        params += layernorm("model.decoder.final_layer_norm", h, per_layer=False, affine=affine)
    is_tied = tied(c, True)
    head_top, tied_l, extra = lm_head(proj, vocab, is_tied)
    drop = c.num("dropout", 0.1)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=max_pos,
        tie_word_embeddings=is_tied, mlp_kind="plain", hidden_act=c.get("activation_function", "relu") or "relu",
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="learned",
        **dropout_fields(c.num("attention_dropout", 0.0), [drop, drop]),
        layer_prefix="model.decoder.layers", layer_linears=lin,
        top_linears=tuple(top) + head_top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def gpt2(c: ConfigValues) -> dict:
    """transformers/models/gpt2/modeling_gpt2.py (GPT2LMHeadModel) and gpt_bigcode/modeling_gpt_bigcode.py.

    GPT-2: attn.c_attn (h -> 3h), attn.c_proj, mlp.c_fc (h -> n_inner or 4h), mlp.c_proj, all transformers
    ``Conv1D`` with bias (weight stored (in, out); bnb quantizes Conv1D too). GPTBigCode: the same names as
    nn.Linear, c_attn h -> h + 2 * kv_heads * head_dim (kv_heads 1 with multi_query). ln_1, ln_2; wte, wpe,
    ln_f. Dropout: attn_pdrop on probabilities, resid_pdrop after attn.c_proj and after mlp.c_proj, embd_pdrop
    on the embeddings.
    """
    mt = c.model_type
    if c.get("add_cross_attention", False):
        raise ConfigError(f"{c.where}: {mt} with add_cross_attention (an encoder-decoder setup) is not supported")
    h = c.req("n_embd", "hidden_size")
    n_layers = c.req("n_layer", "num_hidden_layers")
    heads = c.req("n_head", "num_attention_heads")
    vocab = c.req("vocab_size")
    inner = c.opt_int("n_inner", None) or 4 * h
    n_pos = c.opt_int("n_positions", 1024, "max_position_embeddings")
    hd = h // heads
    conv = mt == "gpt2"
    kv = (1 if c.get("multi_query", True) else heads) if mt == "gpt_bigcode" else heads
    qkv_out = 3 * h if mt == "gpt2" else h + 2 * kv * hd
    lin = (
        linear("attn.c_attn", h, qkv_out, True, "attn_qkv", conv1d=conv),
        linear("attn.c_proj", h, h, True, "attn_out", conv1d=conv),
        linear("mlp.c_fc", h, inner, True, "mlp_up", conv1d=conv),
        linear("mlp.c_proj", inner, h, True, "mlp_down", conv1d=conv),
    )
    params = [*layernorm("ln_1", h), *layernorm("ln_2", h)]
    params += [
        ParamSpec("transformer.wte.weight", vocab * h, "embedding"),
        ParamSpec("transformer.wpe.weight", n_pos * h, "position_embedding"),
        *layernorm("transformer.ln_f", h, per_layer=False),
    ]
    is_tied = tied(c, True)
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    resid = c.num("resid_pdrop", 0.1)
    act_default = "gelu_new" if mt == "gpt2" else "gelu_pytorch_tanh"
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inner, vocab_size=vocab, max_position_embeddings=n_pos, tie_word_embeddings=is_tied,
        mlp_kind="plain", hidden_act=c.get("activation_function", act_default) or act_default,
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="learned",
        **dropout_fields(c.num("attn_pdrop", 0.1), [resid, resid], embed=c.num("embd_pdrop", 0.1)),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def bloom(c: ConfigValues) -> dict:
    """transformers/models/bloom/modeling_bloom.py.

    BloomBlock: self_attention.query_key_value (h -> 3h) and .dense, mlp.dense_h_to_4h (h -> 4h, fixed) and
    .dense_4h_to_h, all with bias; input_layernorm, post_attention_layernorm. BloomModel: word_embeddings,
    word_embeddings_layernorm, ln_f; ALiBi (no position parameters). hidden_dropout goes through dropout_add
    after attention and after the MLP; attention_dropout on the probabilities. BloomGelu (tanh approximation).
    """
    h = c.req("hidden_size", "n_embed")
    if c.get("n_embed") is not None:  # BloomConfig.__post_init__: n_embed (older configs) wins
        h = c.req("n_embed")
    n_layers = c.req("n_layer", "num_hidden_layers")
    heads = c.req("n_head", "num_attention_heads")
    vocab = c.req("vocab_size")
    lin = (
        linear("self_attention.query_key_value", h, 3 * h, True, "attn_qkv"),
        linear("self_attention.dense", h, h, True, "attn_out"),
        linear("mlp.dense_h_to_4h", h, 4 * h, True, "mlp_up"),
        linear("mlp.dense_4h_to_h", 4 * h, h, True, "mlp_down"),
    )
    params = [*layernorm("input_layernorm", h), *layernorm("post_attention_layernorm", h)]
    params += [
        ParamSpec("transformer.word_embeddings.weight", vocab * h, "embedding"),
        *layernorm("transformer.word_embeddings_layernorm", h, per_layer=False),
        *layernorm("transformer.ln_f", h, per_layer=False),
    ]
    is_tied = tied(c, True)
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    hid = c.num("hidden_dropout", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=4 * h, vocab_size=vocab, max_position_embeddings=None,
        tie_word_embeddings=is_tied, mlp_kind="plain", hidden_act="bloom_gelu", norm_kind="layernorm",
        parallel_attn_mlp=False, position_embedding="alibi",
        **dropout_fields(c.num("attention_dropout", 0.0), [hid, hid]),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def falcon(c: ConfigValues) -> dict:
    """transformers/models/falcon/modeling_falcon.py.

    FalconAttention: fused query_key_value, out dim (2 * num_kv_heads + heads) * head_dim with
    new_decoder_architecture, hidden + 2 * head_dim with multi_query (one shared K/V head, falcon-7b),
    3 * hidden otherwise; dense. FalconMLP: dense_h_to_4h (h -> ffn_hidden_size, default 4h), dense_4h_to_h.
    All are ``FalconLinear`` (an nn.Linear subclass): peft adapts them, but bitsandbytes does NOT quantize
    them -- replace_with_bnb_linear checks ``type(module) is nn.Linear`` -- so a "4-bit" Falcon stays 16-bit.
    Norms: parallel_attn with num_ln_in_parallel_attn == 2 (default under new_decoder_architecture):
    ln_attn + ln_mlp; parallel_attn otherwise: input_layernorm; sequential: input_ + post_attention_layernorm.
    Dropout: hidden_dropout on (attn + mlp) in parallel blocks; sequential blocks add attention_dropout on
    the attention output and hidden_dropout on the MLP output; attention_dropout on the probabilities with
    ALiBi only.
    """
    h = c.req("hidden_size", "n_embed")
    if c.get("n_embed") is not None:  # FalconConfig.__post_init__: n_embed wins
        h = c.req("n_embed")
    n_layers = c.req("num_hidden_layers")
    heads = c.req("num_attention_heads")
    vocab = c.req("vocab_size")
    hd = h // heads
    new_arch = bool(c.get("new_decoder_architecture", False))
    multi_query = bool(c.get("multi_query", True))
    parallel = bool(c.get("parallel_attn", True))
    kv_cfg = c.opt_int("num_kv_heads", None) or heads
    if new_arch:
        kv, qkv_out = kv_cfg, (2 * kv_cfg + heads) * hd
    elif multi_query:
        kv, qkv_out = 1, h + 2 * hd
    else:
        kv, qkv_out = heads, 3 * h
    ffn = c.opt_int("ffn_hidden_size", None) or 4 * h
    bias = bool(c.get("bias", False))
    lin = (
        linear("self_attention.query_key_value", h, qkv_out, bias, "attn_qkv", quantized_by_bnb=False),
        linear("self_attention.dense", h, h, bias, "attn_out", quantized_by_bnb=False),
        linear("mlp.dense_h_to_4h", h, ffn, bias, "mlp_up", quantized_by_bnb=False),
        linear("mlp.dense_4h_to_h", ffn, h, bias, "mlp_down", quantized_by_bnb=False),
    )
    n_ln = c.opt_int("num_ln_in_parallel_attn", None)
    if n_ln is None and new_arch:
        n_ln = 2
    if not parallel:
        norms = ["post_attention_layernorm", "input_layernorm"]
    elif n_ln == 2:
        norms = ["ln_attn", "ln_mlp"]
    else:
        norms = ["input_layernorm"]
    params = [p for n in norms for p in layernorm(n, h)]
    params += [
        ParamSpec("transformer.word_embeddings.weight", vocab * h, "embedding"),
        *layernorm("transformer.ln_f", h, per_layer=False),
    ]
    is_tied = tied(c, True)
    top, tied_l, extra = lm_head(h, vocab, is_tied)
    alibi = bool(c.get("alibi", False))
    attn_p, hid_p = c.num("attention_dropout", 0.0), c.num("hidden_dropout", 0.0)
    is_parallel = parallel or new_arch
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=None if alibi else c.opt_int(
            "max_position_embeddings", 2048),
        tie_word_embeddings=is_tied, mlp_kind="plain", hidden_act=c.get("activation", "gelu") or "gelu",
        norm_kind="layernorm", parallel_attn_mlp=is_parallel,
        position_embedding="alibi" if alibi else "rotary",
        # FalconAttention applies attention_dropout to the probabilities on the ALiBi path only ("It is unclear
        # why dropout is not applied here" on the rotary path, eager and sdpa alike).
        **dropout_fields(attn_p if alibi else 0.0, [hid_p] if is_parallel else [attn_p, hid_p]),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None if alibi else hd,
    )



def bert(c: ConfigValues) -> dict:
    """transformers/models/bert/modeling_bert.py, BertForMaskedLM (what memplan fine-tunes for BERT).

    BertModel(add_pooling_layer=False): embeddings (word, position, token_type, LayerNorm), per layer
    attention.self.query/key/value, attention.output.dense + LayerNorm, intermediate.dense, output.dense +
    LayerNorm, all Linear with bias (post-LN). BertOnlyMLMHead: cls.predictions.transform.dense + LayerNorm,
    cls.predictions.decoder (weight is_tied to word_embeddings, bias is_tied to cls.predictions.bias).
    hidden_dropout_prob: after the embeddings and after both output denses; attention_probs_dropout_prob on
    the probabilities.
    """
    h, n_layers, heads, vocab, inter = standard_sizes(c)
    max_pos = c.opt_int("max_position_embeddings", 512)
    types = c.opt_int("type_vocab_size", 2)
    lin = (
        linear("attention.self.query", h, h, True, "attn_q"),
        linear("attention.self.key", h, h, True, "attn_k"),
        linear("attention.self.value", h, h, True, "attn_v"),
        linear("attention.output.dense", h, h, True, "attn_out"),
        linear("intermediate.dense", h, inter, True, "mlp_up"),
        linear("output.dense", inter, h, True, "mlp_down"),
    )
    params = layernorm("attention.output.LayerNorm", h) + layernorm("output.LayerNorm", h)
    params += [
        ParamSpec("bert.embeddings.word_embeddings.weight", vocab * h, "embedding"),
        ParamSpec("bert.embeddings.position_embeddings.weight", max_pos * h, "position_embedding"),
        ParamSpec("bert.embeddings.token_type_embeddings.weight", types * h, "position_embedding"),
        *layernorm("bert.embeddings.LayerNorm", h, per_layer=False),
        *layernorm("cls.predictions.transform.LayerNorm", h, per_layer=False),
        ParamSpec("cls.predictions.bias", vocab, "bias"),
    ]
    top = [linear("cls.predictions.transform.dense", h, h, True, "other")]
    is_tied = tied(c, True)
    # Tied, the decoder's weight is word_embeddings and its bias is cls.predictions.bias (_tied_weights_keys);
    # untied, transformers 5.23 ties neither, so the decoder holds its own weight and bias.
    decoder = linear("cls.predictions.decoder", h, vocab, not is_tied, "lm_head", quantized_by_bnb=False)
    tied_l: tuple[LinearSpec, ...] = ()
    if is_tied:
        tied_l = (decoder,)
    else:
        top.append(decoder)
    hid = c.num("hidden_dropout_prob", 0.1)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max_pos,
        tie_word_embeddings=is_tied, mlp_kind="plain", hidden_act=c.get("hidden_act", "gelu") or "gelu",
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="absolute+type",
        **dropout_fields(c.num("attention_probs_dropout_prob", 0.1), [hid, hid], embed=hid),
        sliding_window=None, is_causal_lm=False, layer_prefix="bert.encoder.layer", layer_linears=lin,
        top_linears=tuple(top), tied_linears=tied_l, params=tuple(params), rotary_dim=None,
    )

