"""The torch side of ``derive``: build a model from its config on the meta device and read its spec off the
module tree (every parameter with its HF name and size, every ``nn.Linear`` / ``Conv1D`` with its shape, what
bitsandbytes would quantize, what peft would adapt by default). Imported only when a spec is derived.

Never ``trust_remote_code``: only the model types the installed transformers ships are built.
"""

from __future__ import annotations

import copy
import warnings

from memplan.errors import ConfigError

from memplan.catalog.models.spec import LinearSpec, ParamSpec

__all__ = ["derive_fields", "NOT_ARCHITECTURE"]

# config.json keys about a checkpoint, not the architecture (as memplan.measure.build drops them)
NOT_ARCHITECTURE = ("quantization_config", "auto_map", "_name_or_path", "transformers_version", "architectures")

_ROLES = (("qkv", "attn_qkv"), ("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
          ("o_proj", "attn_out"), ("out_proj", "attn_out"), ("gate_up", "mlp_gate_up"), ("gate_proj", "mlp_gate"),
          ("up_proj", "mlp_up"), ("down_proj", "mlp_down"), ("fc1", "mlp_up"), ("fc2", "mlp_down"),
          ("c_fc", "mlp_up"), ("router", "router"), ("lm_head", "lm_head"))


def _role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    for key, role in _ROLES:
        if key in leaf:
            return role
    if leaf == "gate":
        return "router"
    return "other"


def hf_config(config: dict, where: str):
    """The transformers config of ``config`` (a config.json dict), or ConfigError with the one-line reason."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # a deep copy: transformers normalises nested values (rope_scaling -> rope_parameters) in place, which changed
    # the caller's config and so its cache key (gpt-oss, Llama-4)
    values = copy.deepcopy({k: v for k, v in config.items() if k not in NOT_ARCHITECTURE})
    mt = values.pop("model_type")
    version = transformers.__version__
    if mt not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{where}: unsupported model_type {mt!r}: transformers {version} does not know it (memplan "
                          f"never runs remote code, so trust_remote_code models cannot be planned)")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: unsupported model_type {mt!r}: no causal-LM class in transformers {version} "
                          f"(encoder-only, encoder-decoder and non-text models are not planned)")
    try:
        cfg = transformers.AutoConfig.for_model(mt, **values)
    except Exception as exc:  # noqa: BLE001 - any config error is the user's config
        raise ConfigError(f"{where}: transformers {version} refuses this {mt} config: {_one_line(exc)}") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(f"{where}: unsupported model_type {mt!r}: an encoder-decoder model; memplan plans "
                          f"decoder-only models")
    sub = [k for k in ("vision_config", "audio_config", "speech_config", "vision_tower_config")
           if getattr(cfg, k, None) is not None]
    if sub:
        text = getattr(getattr(cfg, "text_config", None), "model_type", None)
        hint = f"; plan its text model (a config with model_type {text!r})" if text else ""
        raise ConfigError(f"{where}: unsupported model_type {mt!r}: multimodal ({', '.join(sub)}); memplan plans "
                          f"text decoders{hint}")
    cfg.use_cache = False
    return cfg


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def build_meta_model(cfg, where: str):
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - a model transformers cannot build from this config
        raise ConfigError(f"{where}: transformers cannot build {cfg.model_type} from this config: "
                          f"{_one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _not_converted(model) -> list[str]:
    """transformers' bitsandbytes quantizer: ``get_keys_to_not_convert`` (tied weights, the last module, the output
    embedding) plus the model's ``_keep_in_fp32_modules`` (quantizers/base.py get_modules_to_not_convert)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keys = list(get_keys_to_not_convert(model))
    keys += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return keys


def _quantized(name: str, module, skip: list[str]) -> bool:
    """transformers/integrations/bitsandbytes.py replace_with_bnb_linear: exact nn.Linear or Conv1D, not skipped."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    return (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)


def _layer_stack(model, n_layers: int):
    from torch import nn

    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not stacks:
        raise ConfigError(f"found no decoder-layer list of {n_layers} layers in {type(model).__name__}")
    return max(stacks, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _linears(model, prefix: str, skip: list[str], tied_head):
    """(relative name, LinearSpec) of every nn.Linear / Conv1D under ``model`` (names relative to it)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, Conv1D)) or m is tied_head:
            continue
        full = f"{prefix}.{name}" if prefix else name
        conv = isinstance(m, Conv1D)
        in_f, out_f = (m.weight.shape[0], m.weight.shape[1]) if conv else (m.in_features, m.out_features)
        out.append((name, LinearSpec(name=name, in_features=int(in_f), out_features=int(out_f),
                                     bias=m.bias is not None, quantized_by_bnb=_quantized(full, m, skip),
                                     role=_role(full), conv1d=conv)))
    return out


def _param_kind(name: str, param, module_types: dict[str, str]) -> str:
    owner = module_types.get(name.rpartition(".")[0], "")
    if "Embedding" in owner:
        return "position_embedding" if "position" in name or "pos" in owner.lower() else "embedding"
    if "Norm" in owner or "norm" in name:
        return "norm"
    if param.dim() == 3 and "expert" in name:
        return "experts"
    return "bias" if name.endswith("bias") else "other"


def _layer_signature(layer, prefix, skip):
    lins = tuple((n, lin) for n, lin in _linears(layer, prefix, skip, None))
    lin_params = {f"{n}.{p}" for n, _ in lins for p in ("weight", "bias")}
    types = {n: type(m).__name__ for n, m in layer.named_modules()}
    params = tuple((n, p.numel(), _param_kind(n, p, types)) for n, p in layer.named_parameters() if n not in lin_params)
    return tuple(lin for _, lin in lins), params


def derive_fields(config: dict, where: str, announce=None) -> dict:
    """The ModelSpec fields of the model transformers builds from ``config`` (no name/source fields);
    ``announce()`` is called once the config is accepted, before the (slower) build."""
    cfg = hf_config(config, where)
    if announce is not None:
        announce()
    model = build_meta_model(cfg, where)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = int(text.num_hidden_layers)
    prefix, stack = _layer_stack(model, n_layers)
    skip = _not_converted(model)
    head = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    tied = head is not None and inp is not None and head.weight is inp.weight
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head") if head is not None else None

    sigs = [_layer_signature(layer, f"{prefix}.{i}", skip) for i, layer in enumerate(stack)]
    uniform = all(s == sigs[0] for s in sigs)
    layer_linears: list[LinearSpec] = []
    top_linears: list[LinearSpec] = []
    params: list[ParamSpec] = []
    if uniform:
        layer_linears = list(sigs[0][0])
        params += [ParamSpec(n, k, kind, per_layer=True) for n, k, kind in sigs[0][1]]
    else:  # layers differ (hybrid attention, dense-then-MoE ...): every layer's modules by their full names
        for i, (lins, ps) in enumerate(sigs):
            top_linears += [_renamed(lin, f"{prefix}.{i}.{lin.name}") for lin in lins]
            params += [ParamSpec(f"{prefix}.{i}.{n}", k, kind) for n, k, kind in ps]

    in_stack = {id(p) for p in stack.parameters()}
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    lin_param_names = set()
    tied_linears: list[LinearSpec] = []
    for name, lin in _linears(model, "", skip, head if tied else None):
        if name == prefix or name.startswith(prefix + "."):
            continue
        top_linears.append(lin)
        lin_param_names |= {f"{name}.weight", f"{name}.bias"}
    counted = set()  # named_parameters lists a shared parameter once, under its first name
    for name, p in model.named_parameters():
        if id(p) in in_stack or name in lin_param_names:
            continue
        counted.add(id(p))
        params.append(ParamSpec(name, p.numel(), _param_kind(name, p, types)))
    if tied and head_name:
        tied_linears.append(LinearSpec(head_name, int(head.in_features), int(head.out_features),
                                       head.bias is not None, quantized_by_bnb=False, role="lm_head"))
        # a head bias shared with another parameter (BERT-style heads: lm_head.decoder.bias is lm_head.bias) is
        # already counted above; the sweep's 18 count mismatches were this, by exactly the vocabulary size
        if head.bias is not None and id(head.bias) not in counted:
            params.append(ParamSpec(f"{head_name}.bias", head.bias.numel(), "bias"))
    moe = _peft_moe(cfg.model_type)
    if moe:
        layer_linears, top_linears, params = _moe_parameters(moe, layer_linears, top_linears, params, model, prefix)
    total = sum(p.numel() for p in model.parameters())
    fields = _scalars(text, n_layers, tied, layer_linears + top_linears, stack)
    # transformers.integrations.moe.use_experts_implementation sets _is_expert_parallel on the experts module
    fields["experts_grouped_mm"] = any(hasattr(m, "_is_expert_parallel") for m in model.modules()) and \
        getattr(model.config, "_experts_implementation", None) in (None, "grouped_mm")
    cls = type(model)
    fields["attention_implementations"] = ("eager",) + (("sdpa",) if getattr(cls, "_supports_sdpa", False) else ()) \
        + (("flash_attention_2",) if getattr(cls, "_supports_flash_attn", False) else ())
    fields.update(layer_prefix=prefix, layer_linears=tuple(layer_linears), top_linears=tuple(top_linears),
                  tied_linears=tuple(tied_linears), params=tuple(params), derived=True,
                  lora_defaults=_peft_defaults(cfg.model_type, layer_linears + top_linears),
                  moe_targets=tuple(moe[0].items()) if moe else (),
                  moe_fused=tuple((k, tuple(v)) for k, v in moe[1].items()) if moe else ())
    fields["_total"] = total
    return fields


def _renamed(lin: LinearSpec, name: str) -> LinearSpec:
    from dataclasses import replace

    return replace(lin, name=name)


def _scalars(text, n_layers: int, tied: bool, linears: list[LinearSpec], stack) -> dict:
    def get(*names, default=None):
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        return default

    h = int(get("hidden_size", "d_model", "n_embd"))
    heads = int(get("num_attention_heads", "n_head", default=1))
    kv = int(get("num_key_value_heads", "num_kv_heads", default=heads) or heads)
    hd = int(get("head_dim", default=0) or h // max(heads, 1))
    inter = int(get("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size", default=4 * h) or 4 * h)
    experts = int(get("num_experts", "num_local_experts", "n_routed_experts", default=1) or 1)
    per_tok = int(get("num_experts_per_tok", "moe_topk", "top_k", default=1) or 1)
    window = get("sliding_window")
    if getattr(text, "use_sliding_window", True) is False or not isinstance(window, int):
        window = None
    norm = "rmsnorm" if any("RMS" in type(m).__name__ for m in stack.modules()) else "layernorm"
    act = get("hidden_act", "hidden_activation", "activation_function", default="silu")
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=int(text.vocab_size),
        max_position_embeddings=get("max_position_embeddings", "n_positions"), tie_word_embeddings=tied,
        mlp_kind="gated" if any(lin.role in ("mlp_gate", "mlp_gate_up") for lin in linears) else "plain",
        hidden_act=act if isinstance(act, str) else "silu", norm_kind=norm, parallel_attn_mlp=False,
        position_embedding="rotary", attention_dropout=float(get("attention_dropout", default=0.0) or 0.0),
        residual_dropout=0.0, embedding_dropout=0.0, activation_dropout=0.0,
        num_experts=experts if experts > 1 else 1, num_experts_per_tok=per_tok if experts > 1 else 1,
        attn_logit_softcapping=get("attn_logit_softcapping"), final_logit_softcapping=get("final_logit_softcapping"),
        sliding_window=window, is_causal_lm=True,
    )


def _peft_defaults(model_type: str, linears: list[LinearSpec]) -> tuple[str, ...]:
    """peft's default target_modules for ``model_type`` (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); where
    peft has none (it raises "Please specify target_modules"), q_proj,v_proj when the model has both, else
    all-linear."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        mapping = {}
    names = {lin.name.rsplit(".", 1)[-1] for lin in linears}
    found = tuple(t for t in mapping.get(model_type, ()) if t in names)
    if found:
        return found
    if {"q_proj", "v_proj"} <= names:
        return ("q_proj", "v_proj")
    return ("all-linear",)


def _peft_moe(model_type: str):
    """peft's transformers-v5 MoE conversion for ``model_type`` (utils/transformers_weight_conversion.py): the v4
    target names and the v5 parameters peft adapts instead, and the fused ones; None where peft converts nothing."""
    try:
        from peft.utils import transformers_weight_conversion as conv
    except ImportError:
        return None
    base = getattr(conv, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    mapping = getattr(conv, "_MOE_TARGET_MODULE_MAPPING", {}).get(base)
    fused = getattr(conv, "_MOE_FUSED_TARGETS", {}).get(base, {})
    if not mapping or not fused:
        return None
    return dict(mapping), {k: list(v) for k, v in fused.items()}


def _moe_parameters(moe, layer_linears, top_linears, params, model, prefix):
    """The router weight and fused 3-D expert tensors that peft adapts as target_parameters, as parameter
    LinearSpecs (counted exactly as before; bitsandbytes leaves them float: they are no nn.Linear)."""
    mapping, fused = moe
    targets = set(mapping.values())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    kept, lin_out = [], {"layer": list(layer_linears), "top": list(top_linears)}
    for ps in params:
        leaf = ps.name
        hit = next((t for t in targets if leaf == t or leaf.endswith("." + t)), None)
        full = f"{prefix}.0.{ps.name}" if ps.per_layer else ps.name
        shape = shapes.get(full)
        if hit is None or shape is None:
            kept.append(ps)
            continue
        if len(shape) == 3:
            e, out_f, in_f = shape
            lin = LinearSpec(ps.name, int(in_f), int(out_f), False, num_experts=int(e), quantized_by_bnb=False,
                             role="experts_gate_up" if "gate_up" in hit else "experts_down", peft_target="parameter",
                             lora_rank_multiplier=len(fused.get(hit, ())) or 1)
        elif len(shape) == 2:
            out_f, in_f = shape
            lin = LinearSpec(ps.name, int(in_f), int(out_f), False, quantized_by_bnb=False, role="router",
                             peft_target="parameter")
        else:
            kept.append(ps)
            continue
        lin_out["layer" if ps.per_layer else "top"].append(lin)
    return lin_out["layer"], lin_out["top"], kept
