"""config.json -> ``ModelSpec``: the registry of architecture builders (one per ``model_type``)."""

from __future__ import annotations

from memplan.errors import ConfigError

from . import gpt_like, llama_like
from .config_values import ConfigValues
from .spec import ModelSpec

__all__ = ["BUILDERS", "SUPPORTED_MODEL_TYPES", "spec_from_config"]

# model_type -> builder (ConfigValues -> the ModelSpec fields it sets).
BUILDERS = {
    "opt": gpt_like.opt,
    "llama": llama_like.llama_like,
    "mistral": llama_like.llama_like,
    "mixtral": llama_like.llama_like,
    "qwen2": llama_like.llama_like,
    "gemma2": llama_like.llama_like,
    "phi": llama_like.phi,
    "phi3": llama_like.phi3,
    "falcon": gpt_like.falcon,
    "gpt2": gpt_like.gpt2,
    "bloom": gpt_like.bloom,
    "stablelm": llama_like.stablelm,
    "bert": gpt_like.bert,
    "gpt_bigcode": gpt_like.gpt2,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(BUILDERS)


def spec_from_config(config: dict, *, name: str, hf_id: str | None = None, source: str | None = None) -> ModelSpec:
    """The ModelSpec of the model transformers 5.23 builds from these config.json values
    (``AutoModelForCausalLM``; ``AutoModelForMaskedLM`` for bert)."""
    where = source or name
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a config must be a JSON object, got {type(config).__name__}")
    mt = config.get("model_type")
    if not mt:
        raise ConfigError(f"{where}: config.json lacks 'model_type' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    builder = BUILDERS.get(mt)
    if builder is None:
        # no hand-written family: derive the spec from transformers' own module tree (cached; derive.py)
        from .derive import derive_spec

        if not isinstance(mt, str):
            raise ConfigError(f"{where}: model_type must be a string, got {mt!r}")
        return derive_spec(config, name=name, hf_id=hf_id, source=source)
    # What most architectures share; a builder returns only the fields it sets itself or that differ.
    fields = dict(num_experts=1, num_experts_per_tok=1, attn_logit_softcapping=None, final_logit_softcapping=None,
                  sliding_window=None, is_causal_lm=True)
    fields.update(builder(ConfigValues(config, mt, where)))
    h, heads = fields["hidden_size"], fields["num_attention_heads"]
    if mt not in ("gemma2", "llama", "mistral", "mixtral", "qwen2", "phi", "phi3") and h % heads:
        raise ConfigError(f"{where}: hidden size {h} is not a multiple of the {heads} attention heads")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise ConfigError(f"{where}: {heads} attention heads are not a multiple of the "
                          f"{fields['num_key_value_heads']} key/value heads")
    return ModelSpec(name=name, model_type=mt, hf_id=hf_id, source=source, config=dict(config), **fields)

