"""Reading ``config.json`` values for the architecture builders, and the small constructors they share.

``ConfigValues`` knows the key spellings (``n_embd`` / ``hidden_size`` ...) and treats JSON null the way
transformers' config classes do; the helpers build the ``LinearSpec`` / ``ParamSpec`` entries of one layer.
"""

from __future__ import annotations

from typing import Any

from memplan.errors import ConfigError

from .spec import LinearSpec, ParamSpec

__all__ = ["ConfigValues", "MAX_CONFIG_INT", "linear", "layernorm", "rmsnorm", "lm_head", "tied", "standard_sizes",
           "opt_float",
           "dropout_fields"]


# No released model comes near 2**24 (16.8M) in any dimension (the largest vocabularies are ~262k, the longest
# trained contexts 10M positions): a larger value is a typo or a broken file, and would plan terabytes.
MAX_CONFIG_INT = 2**24


class ConfigValues:
    """config.json values with the architecture's key spellings; ``where`` names the model/file in errors."""

    def __init__(self, values: dict, model_type: str, where: str):
        self.values = values
        self.model_type = model_type
        self.where = where

    def get(self, key: str, default: Any = None, *aliases: str) -> Any:
        """The value under ``key`` (or an alias) as written, JSON null included; ``default`` when absent."""
        for k in (key, *aliases):
            if k in self.values:
                return self.values[k]
        return default

    def num(self, key: str, default: float = 0.0, *aliases: str) -> float:
        """A float, with JSON null read as ``default`` (transformers treats a None dropout as no dropout)."""
        v = self.get(key, default, *aliases)
        if v is None:
            return float(default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"{self.where}: config value '{key}' must be a dropout probability in [0, 1), got {v!r}")
        return float(v)

    def req(self, key: str, *aliases: str) -> int:
        """A required positive integer (a core dimension: transformers' default would be a different model)."""
        for k in (key, *aliases):
            v = self.values.get(k)
            if v is not None:
                return self._checked_int(k, v)
        spelled = " or ".join(repr(k) for k in (key, *aliases))
        raise ConfigError(f"{self.where}: config.json lacks {spelled}, required for a {self.model_type} model")

    def opt_int(self, key: str, default: int | None, *aliases: str) -> int | None:
        v = self.get(key, default, *aliases)
        if v is None:
            return None
        return self._checked_int(key, v)

    def _checked_int(self, key: str, v) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{self.where}: config value '{key}' must be a positive integer, got {v!r}")
        if v > MAX_CONFIG_INT:
            raise ConfigError(f"{self.where}: config value '{key}' {v:,} is beyond any released model "
                              f"(at most {MAX_CONFIG_INT:,})")
        return v

    def rope_fraction(self, default: float) -> float:
        """partial_rotary_factor: top-level (older configs) or inside rope_parameters / rope_scaling."""
        for holder in (self.values.get("rope_parameters"), self.values.get("rope_scaling")):
            if isinstance(holder, dict) and holder.get("partial_rotary_factor") is not None:
                return float(holder["partial_rotary_factor"])
        v = self.values.get("partial_rotary_factor")
        return default if v is None else float(v)



def linear(name, i, o, bias=False, role="other", **kw) -> LinearSpec:
    return LinearSpec(name=name, in_features=i, out_features=o, bias=bool(bias), role=role, **kw)


def layernorm(name: str, dim: int, *, per_layer: bool = True, bias: bool = True, affine: bool = True):
    """nn.LayerNorm(dim): weight and bias (no parameters with elementwise_affine=False)."""
    if not affine:
        return []
    out = [ParamSpec(f"{name}.weight", dim, "norm", per_layer)]
    if bias:
        out.append(ParamSpec(f"{name}.bias", dim, "norm", per_layer))
    return out


def rmsnorm(name: str, dim: int, *, per_layer: bool = True):
    return [ParamSpec(f"{name}.weight", dim, "norm", per_layer)]


def lm_head(in_dim: int, vocab: int, is_tied: bool, *, bias: bool = False):
    """(top_linears, tied_linears, extra params) for ``lm_head``.

    The lm_head is the output embedding: bnb never quantizes it and all-linear never adapts it. Tied, its
    weight is the input embedding (``_tied_weights_keys``), so only a separate bias (phi) adds parameters.
    """
    head = linear("lm_head", in_dim, vocab, bias, "lm_head", quantized_by_bnb=False)
    if not is_tied:
        return (head,), (), []
    extra = [ParamSpec("lm_head.bias", vocab, "bias")] if bias else []
    return (), (head,), extra


def tied(c: ConfigValues, default: bool) -> bool:
    v = c.get("tie_word_embeddings", default)
    return default if v is None else bool(v)



def standard_sizes(c: ConfigValues) -> tuple[int, int, int, int, int]:
    """hidden, layers, heads, vocab and MLP sizes under their standard HF key names (llama-style configs)."""
    return (c.req("hidden_size"), c.req("num_hidden_layers"), c.req("num_attention_heads"), c.req("vocab_size"),
            c.req("intermediate_size"))


def opt_float(v) -> float | None:
    return None if v is None else float(v)


def dropout_fields(attn: float, resid_sites: list[float], embed: float = 0.0, act: float = 0.0) -> dict:
    live = [p for p in resid_sites if p > 0]
    return dict(attention_dropout=attn, residual_dropout=max(live, default=0.0), residual_dropout_sites=len(live),
                embedding_dropout=embed, activation_dropout=act)

