"""Tiny configs of any model type the installed transformers knows: the config class's defaults, shrunk.

Used by the derivation tests and ``benchmarks/derive_model_types.py`` (every decoder-only text model type):
hidden 128, 2 layers, 4 heads (2 key/value heads), a 512-token vocabulary, 4 experts of which 2 per token,
and per-layer lists cut to 2 layers; everything else keeps the class default.
"""

from __future__ import annotations

__all__ = ["tiny_config"]

_SIZES = {
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 512, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 64,
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 4096,
}


def tiny_config(model_type: str, **overrides) -> dict:
    """A config.json dict for ``model_type``: its configuration class's defaults with small sizes."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type).to_dict()
    old_layers = cfg.get("num_hidden_layers")
    out = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",
                                                                                  "architectures", "dtype")}
    for k, v in _SIZES.items():
        if k in out and (out[k] is None or isinstance(out[k], int)):
            out[k] = v
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # special tokens inside the small vocabulary
        if isinstance(out.get(k), int) and out[k] >= _SIZES["vocab_size"]:
            out[k] = _SIZES["vocab_size"] - 1
    for k, v in list(out.items()):  # per-layer lists (layer_types, mlp_only_layers ...) for 2 layers
        if isinstance(v, list) and old_layers and len(v) == old_layers:
            out[k] = v[:2]
    out["model_type"] = model_type
    out.update(overrides)
    return out
