"""Architecture specs from Hugging Face ``config.json`` values: every weight-bearing module with its shape and
HF module name, exact parameter counts, and peft target-module resolution.

Pure Python: no torch, no transformers. ``tests/test_models.py`` holds the spec to a meta-device model built
by transformers (exact total and LoRA-trainable counts) and to the counts published for each model.

INTERFACE CONTRACT (the estimator, the search and the CLI rely on these names; keep them):

- ``load_model(name_or_path, *, profiles_dir=None) -> ModelSpec``: a catalog name (case-insensitive, with or
  without the org prefix: ``opt-13b``, ``facebook/opt-13b``), a path to a ``config.json``, or a local model
  folder holding one. Unknown names raise ``UnknownModelError`` with close-match suggestions; unreadable or
  unsupported configs raise ``ConfigError``.
- ``list_models(*, profiles_dir=None) -> list[CatalogModel]``
- ``spec_from_config(config: dict, *, name: str, hf_id=None, source: str | None = None) -> ModelSpec``
- ``ModelSpec`` / ``LinearSpec`` / ``ParamSpec`` below.

Versions this module reproduces (the behaviour was read from their source and checked by loading tiny models):
transformers 5.23 (module structure, config defaults, bitsandbytes replacement) and peft 0.21 (target
matching, ``all-linear``, the transformers-v5 MoE target conversion).

LoRA targets (``ModelSpec.resolve_targets`` and friends) follow peft's ``LoraConfig.target_modules`` rules:

- a list (or a comma-separated string ``"q_proj,v_proj"``): a module matches a name ``t`` when its full name
  equals ``t`` or ends with ``"." + t`` (peft/tuners/tuners_utils.py ``check_target_module_exists``);
- a single string other than ``"all-linear"``: a regex ``re.fullmatch``-ed against the full module name --
  except that a bare name which fully matches no module (``"c_attn"``; peft would raise) is read as the
  one-name list ``["c_attn"]``, since memplan's CLI and setups pass target lists as comma-separated strings;
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output embedding (lm_head)
  (tuners_utils.py ``_maybe_include_all_linear_layers``).

memplan is stricter than peft in one way: every name in a list must match something (peft silently ignores
a list entry that matches nothing as long as another one matches), so a typo is reported, not ignored.
Only linear layers (and Mixtral's router / fused experts, see below) are modelled as targets: a regex that
peft would also match against a non-linear module (peft then refuses it) is checked against linears only.

A per-layer ``LinearSpec`` returned by ``resolve_targets`` carries ``layers=None`` when every layer has it
adapted (the normal case) and the tuple of layer indices when the targets pick some layers only;
``ModelSpec.instances(spec)`` gives the number of adapted copies either way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memplan import catalog as _catalog
from memplan.errors import ConfigError, InvalidSetupError, UnknownModelError, suggestion_suffix

__all__ = [
    "LinearSpec",
    "ParamSpec",
    "ModelSpec",
    "CatalogModel",
    "SUPPORTED_MODEL_TYPES",
    "ALL_LINEAR",
    "spec_from_config",
    "load_model",
    "list_models",
]

ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND


@dataclass(frozen=True)
class LinearSpec:
    """A weight matrix peft can put a LoRA adapter on.

    ``name`` is the HF module path relative to one decoder layer (``self_attn.q_proj``) for per-layer
    modules, or the full path (``lm_head``) for modules outside the layer stack. For weights peft adapts as
    parameters (``peft_target == "parameter"``: Mixtral's router and fused experts) it is the parameter path
    (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    # >1 for fused MoE expert weights (transformers 5 stores them as one 3-D parameter
    # (num_experts, out, in)); the weight holds num_experts * in * out values.
    num_experts: int = 1
    # True when bitsandbytes (load_in_4bit / load_in_8bit through transformers) replaces this module's
    # weight with a quantized one; False for lm_head and modules bnb leaves in 16-bit.
    quantized_by_bnb: bool = True
    # What the module does, for the activation model:
    # attn_q, attn_k, attn_v, attn_qkv, attn_kv, attn_out, mlp_up, mlp_gate, mlp_gate_up, mlp_down, router,
    # experts_gate_up, experts_down, lm_head, other.
    role: str = "other"
    # --- additions to the contract ---
    # "module": an nn.Linear / Conv1D peft wraps through target_modules; "parameter": a bare nn.Parameter peft
    # wraps with lora.ParamWrapper through target_parameters (Mixtral's router weight and 3-D experts).
    # peft 0.21's ParamWrapper refuses lora_dropout != 0, DoRA and lora_bias (peft/tuners/lora/layer.py).
    peft_target: str = "module"
    # transformers' Conv1D (GPT-2): the weight is stored (in, out); in/out_features are still in/out.
    conv1d: bool = False
    # peft's transformers-v5 conversion gives Mixtral's fused gate_up_proj rank 2r (w1 and w3 were two r-rank
    # adapters in v4): peft/utils/transformers_weight_conversion.py, _convert_peft_config_moe rank_pattern.
    lora_rank_multiplier: int = 1
    # Only on specs returned by ModelSpec.resolve_targets: the layer indices adapted when not all of them.
    layers: tuple[int, ...] | None = None

    @property
    def weight_numel(self) -> int:
        return self.num_experts * self.in_features * self.out_features

    @property
    def bias_numel(self) -> int:
        return self.num_experts * self.out_features if self.bias else 0

    def lora_params(self, rank: int) -> int:
        """LoRA A + B values peft creates for this module at ``rank`` (exactly as peft does).

        lora.Linear: A is (r, in), B is (out, r), no bias (lora_bias=False). lora.ParamWrapper on a 3-D
        expert weight: A is (r * E, in), B is (out, r * E) (peft/tuners/lora/layer.py ParamWrapper.update_layer).
        """
        r = rank * self.lora_rank_multiplier
        return r * self.num_experts * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter that is not a LoRA-targetable weight: embeddings, position embeddings, norms, stray biases."""

    name: str  # relative to a layer when per_layer, else the full path
    numel: int
    kind: str  # "embedding" | "position_embedding" | "norm" | "bias" | "other"
    per_layer: bool = False


@dataclass(frozen=True)
class _Candidate:
    """One module (or parameter) instance in the model that a LoRA target can pick."""

    full_name: str
    spec: LinearSpec
    layer: int | None  # None for modules outside the layer stack


@dataclass(frozen=True)
class ModelSpec:
    """Everything memplan knows about one architecture, derived from its config.json values."""

    name: str  # catalog id (``opt-13b``) or the path it came from
    model_type: str  # HF ``model_type`` (``opt``, ``llama``, ``gpt2`` ...)
    hf_id: str | None  # ``facebook/opt-13b`` when known
    source: str | None  # where the config values come from (URL or path)

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool

    # Structure the activation model needs.
    mlp_kind: str  # "gated" (gate/up/down, SwiGLU/GeGLU) | "plain" (up, act, down)
    hidden_act: str
    norm_kind: str  # "layernorm" | "rmsnorm"
    parallel_attn_mlp: bool  # attention and MLP read the same normed input (phi-2, falcon, gpt-j style)
    position_embedding: str  # "learned" | "rotary" | "alibi" | "absolute+type" (bert)
    attention_dropout: float
    residual_dropout: float  # dropout on attention / MLP outputs before the residual add
    embedding_dropout: float
    activation_dropout: float  # dropout after the MLP activation (OPT's activation_dropout)
    num_experts: int  # 1 for dense models
    num_experts_per_tok: int
    attn_logit_softcapping: float | None  # gemma-2: forces eager-style full score matrices
    final_logit_softcapping: float | None
    sliding_window: int | None
    is_causal_lm: bool  # False for encoder-only models (bert): masked-LM head

    layer_prefix: str  # ``model.decoder.layers`` / ``model.layers`` / ``transformer.h`` ...
    layer_linears: tuple[LinearSpec, ...]  # per decoder layer, identical in every layer
    top_linears: tuple[LinearSpec, ...]  # outside the layer stack (untied lm_head, OPT project_in/out ...)
    params: tuple[ParamSpec, ...]  # everything else (embeddings, norms, stray biases)
    config: dict = field(repr=False, compare=False, default_factory=dict)  # the raw config.json values

    # --- additions to the contract ---
    # Output layers whose weight IS the input embedding (tied lm_head, BERT's MLM decoder): peft can adapt
    # them, but their weight is stored once, in the embedding ParamSpec, so they count no parameters here.
    tied_linears: tuple[LinearSpec, ...] = ()
    # How many dropouts with p > 0 each layer applies to hidden-size tensors on the residual path (attention
    # output, MLP output); residual_dropout is their (largest) probability. 2 for OPT / GPT-2 / BERT,
    # 1 for StableLM (MLP only) and parallel Falcon (one dropout on attn + mlp).
    residual_dropout_sites: int = 0
    rotary_dim: int | None = None  # dims per head that get rotary embeddings (partial rotary: phi, stablelm)

    # ------------------------------------------------------------------ counts

    @property
    def max_seq_len(self) -> int | None:
        """The hard sequence limit of learned position embeddings (OPT, GPT-2, BERT); None for rotary/ALiBi."""
        if self.position_embedding in ("learned", "absolute+type"):
            return self.max_position_embeddings
        return None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def total_params(self) -> int:
        """Exact parameter count of the model transformers builds (tied weights counted once)."""
        per_layer = sum(lin.weight_numel + lin.bias_numel for lin in self.layer_linears)
        per_layer += sum(p.numel for p in self.params if p.per_layer)
        top = sum(lin.weight_numel + lin.bias_numel for lin in self.top_linears)
        top += sum(p.numel for p in self.params if not p.per_layer)
        return self.num_layers * per_layer + top

    def embedding_params(self) -> int:
        """Token, position and token-type embedding values (a tied lm_head shares these)."""
        return sum(
            p.numel * (self.num_layers if p.per_layer else 1)
            for p in self.params
            if p.kind in ("embedding", "position_embedding")
        )

    def quantized_params_by_bnb(self) -> int:
        """Weight values bitsandbytes stores in 4/8 bits under load_in_4bit / load_in_8bit via transformers.

        transformers/integrations/bitsandbytes.py ``replace_with_bnb_linear`` swaps modules whose type is
        exactly ``nn.Linear`` or ``Conv1D`` (not subclasses: Falcon's FalconLinear stays 16-bit), except the
        output embedding and tied weights (quantizers/base.py ``get_keys_to_not_convert``). Biases stay 16-bit.
        """
        n = self.num_layers * sum(lin.weight_numel for lin in self.layer_linears if lin.quantized_by_bnb)
        return n + sum(lin.weight_numel for lin in self.top_linears if lin.quantized_by_bnb)

    def non_quantized_params(self) -> int:
        """Values that stay 16-bit under bnb: embeddings, lm_head, norms, biases, routers, fused MoE experts."""
        return self.total_params() - self.quantized_params_by_bnb()

    # ------------------------------------------------------------------ module names

    @functools.cached_property
    def _candidate_list(self) -> tuple[_Candidate, ...]:
        out = [
            _Candidate(f"{self.layer_prefix}.{i}.{lin.name}", lin, i)
            for i in range(self.num_layers)
            for lin in self.layer_linears
        ]
        out += [_Candidate(lin.name, lin, None) for lin in self.top_linears + self.tied_linears]
        return tuple(out)

    def _candidates(self) -> list[_Candidate]:
        """Every targetable module / parameter instance, in model order (layers first)."""
        return list(self._candidate_list)

    def linear_module_names(self) -> list[str]:
        """Full names (as ``model.named_modules()`` gives them) of every nn.Linear / Conv1D, all layers."""
        return [c.full_name for c in self._candidates() if c.spec.peft_target == "module"]

    def targetable_names(self) -> list[str]:
        """Short names a LoRA target list can use (``q_proj``, ``v_proj`` ...), in model order."""
        names = [lin.name.rsplit(".", 1)[-1] for lin in self.layer_linears + self.top_linears + self.tied_linears
                 if lin.peft_target == "module"]
        names += list(_PEFT_V5_MOE_TARGETS.get(self.model_type, {}))
        return list(dict.fromkeys(names))

    def instances(self, lin: LinearSpec) -> int:
        """How many copies of ``lin`` the model holds (or, for a resolved target, how many peft adapts)."""
        if lin.layers is not None:
            return len(lin.layers)
        if any(lin.name == x.name for x in self.layer_linears):
            return self.num_layers
        return 1

    def default_lora_targets(self) -> tuple[str, ...]:
        """peft's default ``target_modules`` for this model_type (LoraConfig without target_modules)."""
        return _DEFAULT_LORA_TARGETS[self.model_type]

    # ------------------------------------------------------------------ LoRA targets

    def _resolve(self, targets: str | Sequence[str] | None) -> list[_Candidate]:
        """Every module / parameter instance peft adapts for ``targets``, in model order."""
        norm = _normalize_targets(self.default_lora_targets() if targets is None else targets)
        cands = self._candidates()
        if isinstance(norm, str) and norm != ALL_LINEAR and _PLAIN_NAME.fullmatch(norm):
            # A bare module name ("c_attn") as a peft regex matches nothing and peft raises; memplan's CLI and
            # setups pass target lists as comma-separated strings, so read it as the one-name list it means.
            if not any(c.full_name == norm or re.fullmatch(norm, c.full_name) for c in cands):
                norm = [norm]
        moe_map = _PEFT_V5_MOE_TARGETS.get(self.model_type) or {}
        strict = True  # every name of a user's list must match (see the module docstring)
        if moe_map and isinstance(norm, str):
            resolved = self._moe_resolve_string(norm, cands, moe_map)
            if resolved is not None:
                norm, strict = resolved, False
        if isinstance(norm, str):
            hits = self._match_string(norm, cands)
        else:
            hits = self._match_list(norm, cands, moe_map, strict=strict)
        chosen = {c.full_name for c in hits}
        return [c for c in cands if c.full_name in chosen]

    def _match_string(self, pattern: str, cands: list[_Candidate]) -> list[_Candidate]:
        modules = [c for c in cands if c.spec.peft_target == "module"]
        if pattern == ALL_LINEAR:
            # every nn.Linear / Conv1D except the output embedding (model.get_output_embeddings())
            return [c for c in modules if c.spec.role != "lm_head"]
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSetupError(f"LoRA target regex {pattern!r} is not a valid regular expression: {e}") from None
        hits = [c for c in modules if rx.fullmatch(c.full_name)]
        if not hits:
            raise self._bad_target(pattern, regex=True)
        return hits

    def _match_list(self, targets: list[str], cands: list[_Candidate], moe_map: dict[str, str],
                    strict: bool = True) -> list[_Candidate]:
        modules = [c for c in cands if c.spec.peft_target == "module"]
        params = [c for c in cands if c.spec.peft_target == "parameter"]
        # peft's transformers-v5 MoE conversion (transformers_weight_conversion.py _convert_peft_config_moe):
        # v4 names (gate, w1, w3, w2) become target_parameters on the v5 router / fused expert tensors.
        param_targets: dict[str, str] = {}  # user target -> v5 parameter name
        v4_names: set[str] = set()
        for t in targets:
            for old, new in moe_map.items():
                if t == old or t.endswith("." + old):
                    param_targets[t] = new
                    v4_names.add(old)
                    break
        for new, olds in _PEFT_V5_MOE_FUSED.get(self.model_type, {}).items():
            present = v4_names & set(olds)
            if 0 < len(present) < len(olds):
                raise InvalidSetupError(
                    f"LoRA target(s) {', '.join(sorted(present))} cannot be used without "
                    f"{', '.join(sorted(set(olds) - present))}: transformers 5 fuses them into one {new} tensor "
                    f"(peft raises the same error)"
                )
        hits: list[_Candidate] = []
        for t in targets:
            if t in param_targets:
                p = param_targets[t]
                found = [c for c in params if c.full_name == p or c.full_name.endswith("." + p)]
            else:
                found = [c for c in modules if c.full_name == t or c.full_name.endswith("." + t)]
            if not found and strict:
                raise self._bad_target(t)
            hits += found
        if not hits:
            raise self._bad_target(",".join(targets))
        return hits

    def _moe_resolve_string(self, pattern: str, cands: list[_Candidate], moe_map: dict[str, str]) -> list[str] | None:
        """peft's ``_resolve_string_target_modules``: on a converted MoE model a string target (regex or
        all-linear) is turned into the set of LEAF names it matches, then handled as a list (so a regex that
        picks one layer ends up adapting that leaf name in every layer, as peft 0.21 does)."""
        if pattern == ALL_LINEAR:
            linear = self._match_string(ALL_LINEAR, cands)
            return list(dict.fromkeys([c.full_name.rsplit(".", 1)[-1] for c in linear] + list(moe_map)))
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSetupError(f"LoRA target regex {pattern!r} is not a valid regular expression: {e}") from None
        keys: list[str] = []  # the module and parameter names memplan knows of
        containers: dict[str, set[str]] = {}
        for c in cands:
            if c.spec.peft_target == "module":
                keys += [c.full_name, c.full_name + ".weight"] + ([c.full_name + ".bias"] if c.spec.bias else [])
            else:
                keys.append(c.full_name)
                container, _, leaf = c.full_name.rpartition(".")
                if leaf == "weight":  # the router: a module holding .weight
                    keys.append(container)
                containers.setdefault(leaf, set()).add(container)
        matched = {k.rsplit(".", 1)[-1] for k in keys if rx.fullmatch(k)}
        # the v4 expert names live inside a fused tensor: probe "<container>.w1" etc. against the regex
        for old, new in moe_map.items():
            if old not in matched and any(rx.fullmatch(f"{ct}.{old}") for ct in containers.get(new, ())):
                matched.add(old)
        if not matched:
            return None  # peft leaves it as a regex -> the usual "matches nothing" error
        return sorted(matched)

    def _bad_target(self, target: str, regex: bool = False) -> InvalidSetupError:
        embeddings = {p.name.rsplit(".", 2)[-2] for p in self.params
                      if p.kind in ("embedding", "position_embedding") and "." in p.name}
        if target in embeddings:
            why = f"LoRA target {target!r} is an embedding of {self.name}; memplan models LoRA on linear layers only"
        elif regex:
            why = (f"LoRA target regex {target!r} fully matches no module name of {self.name} (as in peft, a "
                   f"single string is a regex matched against the full name, e.g. "
                   f"'{self.linear_module_names()[0]}'; to name modules use a comma-separated list)")
        else:
            why = f"LoRA target {target!r} matches no module of {self.name}"
        return InvalidSetupError(f"{why}; targetable modules: {', '.join(self.targetable_names())} (or 'all-linear')")

    def resolve_targets(self, targets: str | Sequence[str] | None = None) -> tuple[LinearSpec, ...]:
        """The per-layer and top-level specs peft adapts for ``targets`` (None: peft's default).

        Per-layer specs adapted in only some layers come back with ``layers`` set (see ``instances``).
        """
        hits = self._resolve(targets)
        out: list[LinearSpec] = []
        for lin in self.layer_linears:
            idx = tuple(c.layer for c in hits if c.spec is lin)
            if idx:
                out.append(lin if len(idx) == self.num_layers else replace(lin, layers=idx))
        out += [lin for lin in self.top_linears + self.tied_linears if any(c.spec is lin for c in hits)]
        return tuple(out)

    def adapted_names(self, targets: str | Sequence[str] | None = None) -> list[str]:
        """Full names peft reports as adapted: ``targeted_module_names`` + ``targeted_parameter_names``."""
        return [c.full_name for c in self._resolve(targets)]

    def lora_trainable_params(self, rank: int, targets: str | Sequence[str] | None = None) -> int:
        """What peft's ``print_trainable_parameters`` reports as trainable for LoRA at ``rank``."""
        if rank <= 0:
            raise InvalidSetupError(f"LoRA rank must be a positive integer, got {rank}")
        return sum(c.spec.lora_params(rank) for c in self._resolve(targets))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a module name: no regex syntax but the dot


def _normalize_targets(targets: str | Sequence[str]) -> str | list[str]:
    """peft's forms: "all-linear", a regex string, or a list of names. A comma-separated string is a list."""
    if isinstance(targets, str):
        s = targets.strip()
        if s.lower() == ALL_LINEAR:  # peft compares case-insensitively
            return ALL_LINEAR
        if "," in s:
            names = [t.strip() for t in s.split(",") if t.strip()]
            if not names:
                raise InvalidSetupError(f"empty LoRA target list {targets!r}")
            return names
        if not s:
            raise InvalidSetupError("empty LoRA target string")
        return s
    names = [str(t).strip() for t in targets]
    if not names or not all(names):
        raise InvalidSetupError(f"empty LoRA target in {list(targets)!r}")
    return names


# peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21.2), the entries for the
# supported model types. phi3 has no entry: peft raises "Please specify `target_modules`"; memplan then uses the
# fused qkv_proj, the analogue of the q_proj+v_proj default the other decoders get.
_DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),  # not peft's: see above
    "falcon": ("query_key_value",),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "stablelm": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "gpt_bigcode": ("c_attn",),
}

# peft/utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING / _MOE_FUSED_TARGETS: for model types
# transformers 5 converts (conversion_mapping.get_checkpoint_conversion_mapping), the v4 target names and the
# v5 parameter peft adapts instead. Order matters (peft takes the first match).
_PEFT_V5_MOE_TARGETS: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
}
_PEFT_V5_MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {"mixtral": {"gate_up_proj": ("w1", "w3")}}


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelSpec


class _Config:
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
        return float(default if v is None else v)

    def req(self, key: str, *aliases: str) -> int:
        """A required positive integer (a core dimension: transformers' default would be a different model)."""
        for k in (key, *aliases):
            v = self.values.get(k)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ConfigError(f"{self.where}: config value '{k}' must be a positive integer, got {v!r}")
                return v
        spelled = " or ".join(repr(k) for k in (key, *aliases))
        raise ConfigError(f"{self.where}: config.json lacks {spelled}, required for a {self.model_type} model")

    def opt_int(self, key: str, default: int | None, *aliases: str) -> int | None:
        v = self.get(key, default, *aliases)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: config value '{key}' must be an integer, got {v!r}")
        return v

    def rope_fraction(self, default: float) -> float:
        """partial_rotary_factor: top-level (older configs) or inside rope_parameters / rope_scaling."""
        for holder in (self.values.get("rope_parameters"), self.values.get("rope_scaling")):
            if isinstance(holder, dict) and holder.get("partial_rotary_factor") is not None:
                return float(holder["partial_rotary_factor"])
        v = self.values.get("partial_rotary_factor")
        return default if v is None else float(v)


def _lin(name, i, o, bias=False, role="other", **kw) -> LinearSpec:
    return LinearSpec(name=name, in_features=i, out_features=o, bias=bool(bias), role=role, **kw)


def _layernorm(name: str, dim: int, *, per_layer: bool = True, bias: bool = True, affine: bool = True):
    """nn.LayerNorm(dim): weight and bias (no parameters with elementwise_affine=False)."""
    if not affine:
        return []
    out = [ParamSpec(f"{name}.weight", dim, "norm", per_layer)]
    if bias:
        out.append(ParamSpec(f"{name}.bias", dim, "norm", per_layer))
    return out


def _rmsnorm(name: str, dim: int, *, per_layer: bool = True):
    return [ParamSpec(f"{name}.weight", dim, "norm", per_layer)]


def _lm_head(in_dim: int, vocab: int, tied: bool, *, bias: bool = False):
    """(top_linears, tied_linears, extra params) for ``lm_head``.

    The lm_head is the output embedding: bnb never quantizes it and all-linear never adapts it. Tied, its
    weight is the input embedding (``_tied_weights_keys``), so only a separate bias (phi) adds parameters.
    """
    head = _lin("lm_head", in_dim, vocab, bias, "lm_head", quantized_by_bnb=False)
    if not tied:
        return (head,), (), []
    extra = [ParamSpec("lm_head.bias", vocab, "bias")] if bias else []
    return (), (head,), extra


def _tied(c: _Config, default: bool) -> bool:
    v = c.get("tie_word_embeddings", default)
    return default if v is None else bool(v)



def _standard_sizes(c: _Config) -> tuple[int, int, int, int, int]:
    """hidden, layers, heads, vocab and MLP sizes under their standard HF key names (llama-style configs)."""
    return (c.req("hidden_size"), c.req("num_hidden_layers"), c.req("num_attention_heads"), c.req("vocab_size"),
            c.req("intermediate_size"))

def _llama_like(c: _Config) -> dict:
    """llama, mistral, mixtral, qwen2, gemma2: pre-norm decoder, RMSNorm, rotary, SwiGLU/GeGLU MLP.

    transformers/models/{llama,mistral,mixtral,qwen2,gemma2}/modeling_*.py: q/k/v/o_proj, gate/up/down_proj
    (Mixtral: router + fused experts), input_layernorm + post_attention_layernorm (+ gemma2's
    pre/post_feedforward_layernorm), model.norm, lm_head. Only attention-probability dropout exists.
    """
    mt = c.model_type
    h, n_layers, heads, vocab, inter = _standard_sizes(c)
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
        _lin("self_attn.q_proj", h, q_out, attn_bias, "attn_q"),
        _lin("self_attn.k_proj", h, kv_out, attn_bias, "attn_k"),
        _lin("self_attn.v_proj", h, kv_out, attn_bias, "attn_v"),
        _lin("self_attn.o_proj", q_out, h, o_bias, "attn_out"),
    ]
    experts, per_tok = 1, 1
    if mt == "mixtral":
        # MixtralSparseMoeBlock: gate = MixtralTopKRouter (weight (E, h), not an nn.Linear), experts =
        # MixtralExperts with 3-D gate_up_proj (E, 2*inter, h) and down_proj (E, h, inter). bnb leaves all of
        # them 16-bit (only exact nn.Linear modules are replaced); peft adapts them as parameters.
        experts = c.opt_int("num_local_experts", 8, "num_experts")  # attribute_map: num_experts
        per_tok = c.opt_int("num_experts_per_tok", 2)
        lin += [
            _lin("mlp.gate.weight", h, experts, False, "router", quantized_by_bnb=False, peft_target="parameter"),
            _lin("mlp.experts.gate_up_proj", h, 2 * inter, False, "experts_gate_up", num_experts=experts,
                 quantized_by_bnb=False, peft_target="parameter", lora_rank_multiplier=2),
            _lin("mlp.experts.down_proj", inter, h, False, "experts_down", num_experts=experts,
                 quantized_by_bnb=False, peft_target="parameter"),
        ]
    else:
        lin += [
            _lin("mlp.gate_proj", h, inter, mlp_bias, "mlp_gate"),
            _lin("mlp.up_proj", h, inter, mlp_bias, "mlp_up"),
            _lin("mlp.down_proj", inter, h, mlp_bias, "mlp_down"),
        ]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if mt == "gemma2":  # Gemma2DecoderLayer: 4 RMSNorms (sandwich norm around attention and MLP)
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    params = [p for n in norms for p in _rmsnorm(n, h)]
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"), *_rmsnorm("model.norm", h,
                                                                                         per_layer=False)]
    tied = _tied(c, mt == "gemma2")  # only Gemma2Config defaults to tied embeddings
    top, tied_l, extra = _lm_head(h, vocab, tied)
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
        tie_word_embeddings=tied, mlp_kind="gated", hidden_act=act or "silu", norm_kind="rmsnorm",
        parallel_attn_mlp=False, position_embedding="rotary",
        attention_dropout=c.num("attention_dropout"), residual_dropout=0.0, embedding_dropout=0.0,
        activation_dropout=0.0, num_experts=experts, num_experts_per_tok=per_tok,
        attn_logit_softcapping=_opt_float(c.get("attn_logit_softcapping", 50.0)) if mt == "gemma2" else None,
        final_logit_softcapping=_opt_float(c.get("final_logit_softcapping", 30.0)) if mt == "gemma2" else None,
        sliding_window=window, is_causal_lm=True, layer_prefix="model.layers",
        layer_linears=tuple(lin), top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        residual_dropout_sites=0, rotary_dim=hd,
    )


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def _dropout_fields(attn: float, resid_sites: list[float], embed: float = 0.0, act: float = 0.0) -> dict:
    live = [p for p in resid_sites if p > 0]
    return dict(attention_dropout=attn, residual_dropout=max(live, default=0.0), residual_dropout_sites=len(live),
                embedding_dropout=embed, activation_dropout=act)


def _opt(c: _Config) -> dict:
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
        _lin("self_attn.k_proj", h, h, bias, "attn_k"),
        _lin("self_attn.v_proj", h, h, bias, "attn_v"),
        _lin("self_attn.q_proj", h, h, bias, "attn_q"),
        _lin("self_attn.out_proj", h, h, bias, "attn_out"),
        _lin("fc1", h, ffn, bias, "mlp_up"),
        _lin("fc2", ffn, h, bias, "mlp_down"),
    )
    params = [*_layernorm("self_attn_layer_norm", h, affine=affine), *_layernorm("final_layer_norm", h, affine=affine)]
    params += [
        ParamSpec("model.decoder.embed_tokens.weight", vocab * proj, "embedding"),
        ParamSpec("model.decoder.embed_positions.weight", (max_pos + 2) * h, "position_embedding"),
    ]
    top: list[LinearSpec] = []
    if proj != h:
        top += [_lin("model.decoder.project_out", h, proj, False), _lin("model.decoder.project_in", proj, h, False)]
    if pre_ln and not c.get("_remove_final_layer_norm", False):
        params += _layernorm("model.decoder.final_layer_norm", h, per_layer=False, affine=affine)
    tied = _tied(c, True)
    head_top, tied_l, extra = _lm_head(proj, vocab, tied)
    drop = c.num("dropout", 0.1)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=max_pos,
        tie_word_embeddings=tied, mlp_kind="plain", hidden_act=c.get("activation_function", "relu") or "relu",
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="learned",
        **_dropout_fields(c.num("attention_dropout", 0.0), [drop, drop]),
        layer_prefix="model.decoder.layers", layer_linears=lin,
        top_linears=tuple(top) + head_top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def _gpt2(c: _Config) -> dict:
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
        _lin("attn.c_attn", h, qkv_out, True, "attn_qkv", conv1d=conv),
        _lin("attn.c_proj", h, h, True, "attn_out", conv1d=conv),
        _lin("mlp.c_fc", h, inner, True, "mlp_up", conv1d=conv),
        _lin("mlp.c_proj", inner, h, True, "mlp_down", conv1d=conv),
    )
    params = [*_layernorm("ln_1", h), *_layernorm("ln_2", h)]
    params += [
        ParamSpec("transformer.wte.weight", vocab * h, "embedding"),
        ParamSpec("transformer.wpe.weight", n_pos * h, "position_embedding"),
        *_layernorm("transformer.ln_f", h, per_layer=False),
    ]
    tied = _tied(c, True)
    top, tied_l, extra = _lm_head(h, vocab, tied)
    resid = c.num("resid_pdrop", 0.1)
    act_default = "gelu_new" if mt == "gpt2" else "gelu_pytorch_tanh"
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inner, vocab_size=vocab, max_position_embeddings=n_pos, tie_word_embeddings=tied,
        mlp_kind="plain", hidden_act=c.get("activation_function", act_default) or act_default,
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="learned",
        **_dropout_fields(c.num("attn_pdrop", 0.1), [resid, resid], embed=c.num("embd_pdrop", 0.1)),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def _bloom(c: _Config) -> dict:
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
        _lin("self_attention.query_key_value", h, 3 * h, True, "attn_qkv"),
        _lin("self_attention.dense", h, h, True, "attn_out"),
        _lin("mlp.dense_h_to_4h", h, 4 * h, True, "mlp_up"),
        _lin("mlp.dense_4h_to_h", 4 * h, h, True, "mlp_down"),
    )
    params = [*_layernorm("input_layernorm", h), *_layernorm("post_attention_layernorm", h)]
    params += [
        ParamSpec("transformer.word_embeddings.weight", vocab * h, "embedding"),
        *_layernorm("transformer.word_embeddings_layernorm", h, per_layer=False),
        *_layernorm("transformer.ln_f", h, per_layer=False),
    ]
    tied = _tied(c, True)
    top, tied_l, extra = _lm_head(h, vocab, tied)
    hid = c.num("hidden_dropout", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=4 * h, vocab_size=vocab, max_position_embeddings=None,
        tie_word_embeddings=tied, mlp_kind="plain", hidden_act="bloom_gelu", norm_kind="layernorm",
        parallel_attn_mlp=False, position_embedding="alibi",
        **_dropout_fields(c.num("attention_dropout", 0.0), [hid, hid]),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None,
    )


def _falcon(c: _Config) -> dict:
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
        _lin("self_attention.query_key_value", h, qkv_out, bias, "attn_qkv", quantized_by_bnb=False),
        _lin("self_attention.dense", h, h, bias, "attn_out", quantized_by_bnb=False),
        _lin("mlp.dense_h_to_4h", h, ffn, bias, "mlp_up", quantized_by_bnb=False),
        _lin("mlp.dense_4h_to_h", ffn, h, bias, "mlp_down", quantized_by_bnb=False),
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
    params = [p for n in norms for p in _layernorm(n, h)]
    params += [
        ParamSpec("transformer.word_embeddings.weight", vocab * h, "embedding"),
        *_layernorm("transformer.ln_f", h, per_layer=False),
    ]
    tied = _tied(c, True)
    top, tied_l, extra = _lm_head(h, vocab, tied)
    alibi = bool(c.get("alibi", False))
    attn_p, hid_p = c.num("attention_dropout", 0.0), c.num("hidden_dropout", 0.0)
    is_parallel = parallel or new_arch
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=None if alibi else c.opt_int(
            "max_position_embeddings", 2048),
        tie_word_embeddings=tied, mlp_kind="plain", hidden_act=c.get("activation", "gelu") or "gelu",
        norm_kind="layernorm", parallel_attn_mlp=is_parallel,
        position_embedding="alibi" if alibi else "rotary",
        # FalconAttention applies attention_dropout to the probabilities on the ALiBi path only ("It is unclear
        # why dropout is not applied here" on the rotary path, eager and sdpa alike).
        **_dropout_fields(attn_p if alibi else 0.0, [hid_p] if is_parallel else [attn_p, hid_p]),
        layer_prefix="transformer.h", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra), rotary_dim=None if alibi else hd,
    )


def _phi(c: _Config) -> dict:
    """transformers/models/phi/modeling_phi.py (phi-1, phi-1.5, phi-2).

    PhiDecoderLayer is a parallel block: one input_layernorm feeds both self_attn and mlp; resid_dropout is
    applied to each output separately. PhiAttention: q/k/v_proj and dense with bias; optional q_layernorm /
    k_layernorm over head_dim. PhiMLP: fc1, fc2 with bias. PhiModel: embed_tokens, embed_dropout (embd_pdrop),
    final_layernorm. lm_head HAS a bias. Partial rotary (partial_rotary_factor, default 0.5).
    """
    h, n_layers, heads, vocab, inter = _standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", None) or heads
    hd = c.opt_int("head_dim", None) or h // heads
    lin = (
        _lin("self_attn.q_proj", h, heads * hd, True, "attn_q"),
        _lin("self_attn.k_proj", h, kv * hd, True, "attn_k"),
        _lin("self_attn.v_proj", h, kv * hd, True, "attn_v"),
        _lin("self_attn.dense", heads * hd, h, True, "attn_out"),
        _lin("mlp.fc1", h, inter, True, "mlp_up"),
        _lin("mlp.fc2", inter, h, True, "mlp_down"),
    )
    params = _layernorm("input_layernorm", h)
    if c.get("qk_layernorm", False):  # nn.LayerNorm(hidden // heads) on q and on k
        params += _layernorm("self_attn.q_layernorm", h // heads) + _layernorm("self_attn.k_layernorm", h // heads)
    params += [
        ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
        *_layernorm("model.final_layernorm", h, per_layer=False),
    ]
    tied = _tied(c, False)
    top, tied_l, extra = _lm_head(h, vocab, tied, bias=True)
    resid = c.num("resid_pdrop", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 2048),
        tie_word_embeddings=tied, mlp_kind="plain", hidden_act=c.get("hidden_act", "gelu_new") or "gelu_new",
        norm_kind="layernorm", parallel_attn_mlp=True, position_embedding="rotary",
        **_dropout_fields(c.num("attention_dropout", 0.0), [resid, resid], embed=c.num("embd_pdrop", 0.0)),
        layer_prefix="model.layers", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(0.5)),
    )


def _phi3(c: _Config) -> dict:
    """transformers/models/phi3/modeling_phi3.py.

    Phi3Attention: fused qkv_proj (h -> (heads + 2 * kv) * head_dim) and o_proj, no bias. Phi3MLP: fused
    gate_up_proj (h -> 2 * inter) and down_proj (SwiGLU). RMSNorm input/post_attention_layernorm, model.norm.
    resid_pdrop is applied to the attention and the MLP output (resid_attn_dropout / resid_mlp_dropout);
    5.23's Phi3Model applies no embedding dropout (embd_pdrop is unused).
    """
    h, n_layers, heads, vocab, inter = _standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", None) or heads
    hd = c.opt_int("head_dim", None) or h // heads
    lin = (
        _lin("self_attn.o_proj", heads * hd, h, False, "attn_out"),
        _lin("self_attn.qkv_proj", h, (heads + 2 * kv) * hd, False, "attn_qkv"),
        _lin("mlp.gate_up_proj", h, 2 * inter, False, "mlp_gate_up"),
        _lin("mlp.down_proj", inter, h, False, "mlp_down"),
    )
    params = _rmsnorm("input_layernorm", h) + _rmsnorm("post_attention_layernorm", h)
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
               *_rmsnorm("model.norm", h, per_layer=False)]
    tied = _tied(c, False)
    top, tied_l, extra = _lm_head(h, vocab, tied)
    resid = c.num("resid_pdrop", 0.0)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 4096),
        tie_word_embeddings=tied, mlp_kind="gated", hidden_act=c.get("hidden_act", "silu") or "silu",
        norm_kind="rmsnorm", parallel_attn_mlp=False, position_embedding="rotary",
        **_dropout_fields(c.num("attention_dropout", 0.0), [resid, resid]),
        sliding_window=c.opt_int("sliding_window", None), is_causal_lm=True, layer_prefix="model.layers",
        layer_linears=lin, top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(1.0)),
    )


def _stablelm(c: _Config) -> dict:
    """transformers/models/stablelm/modeling_stablelm.py.

    StableLmAttention: q/k/v_proj (bias = use_qkv_bias), o_proj (h -> h, no bias), head_dim = hidden / heads;
    qk_layernorm adds per-head LayerNorms without bias (heads * head_dim and kv * head_dim values).
    StableLmMLP: gate/up/down_proj, no bias. LayerNorm (with bias) input_layernorm, post_attention_layernorm
    (absent with use_parallel_residual), model.norm. hidden_dropout is applied to the MLP output only.
    Partial rotary (partial_rotary_factor, default 0.25).
    """
    h, n_layers, heads, vocab, inter = _standard_sizes(c)
    kv = c.opt_int("num_key_value_heads", 32) or heads
    hd = h // heads
    qkv_bias = bool(c.get("use_qkv_bias", False))
    parallel = bool(c.get("use_parallel_residual", False))
    lin = (
        _lin("self_attn.q_proj", h, heads * hd, qkv_bias, "attn_q"),
        _lin("self_attn.k_proj", h, kv * hd, qkv_bias, "attn_k"),
        _lin("self_attn.v_proj", h, kv * hd, qkv_bias, "attn_v"),
        _lin("self_attn.o_proj", h, h, False, "attn_out"),
        _lin("mlp.gate_proj", h, inter, False, "mlp_gate"),
        _lin("mlp.up_proj", h, inter, False, "mlp_up"),
        _lin("mlp.down_proj", inter, h, False, "mlp_down"),
    )
    params = _layernorm("input_layernorm", h)
    if not parallel:
        params += _layernorm("post_attention_layernorm", h)
    if c.get("qk_layernorm", False):  # StableLmLayerNormPerHead: one bias-free LayerNorm(head_dim) per head
        params += [ParamSpec("self_attn.q_layernorm.weight", heads * hd, "norm", True),
                   ParamSpec("self_attn.k_layernorm.weight", kv * hd, "norm", True)]
    params += [ParamSpec("model.embed_tokens.weight", vocab * h, "embedding"),
               *_layernorm("model.norm", h, per_layer=False)]
    tied = _tied(c, False)
    top, tied_l, extra = _lm_head(h, vocab, tied)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=c.opt_int("max_position_embeddings", 4096),
        tie_word_embeddings=tied, mlp_kind="gated", hidden_act=c.get("hidden_act", "silu") or "silu",
        norm_kind="layernorm", parallel_attn_mlp=parallel, position_embedding="rotary",
        **_dropout_fields(c.num("attention_dropout", 0.0), [c.num("hidden_dropout", 0.0)]),
        layer_prefix="model.layers", layer_linears=lin,
        top_linears=top, tied_linears=tied_l, params=tuple(params + extra),
        rotary_dim=int(hd * c.rope_fraction(0.25)),
    )


def _bert(c: _Config) -> dict:
    """transformers/models/bert/modeling_bert.py, BertForMaskedLM (what memplan fine-tunes for BERT).

    BertModel(add_pooling_layer=False): embeddings (word, position, token_type, LayerNorm), per layer
    attention.self.query/key/value, attention.output.dense + LayerNorm, intermediate.dense, output.dense +
    LayerNorm, all Linear with bias (post-LN). BertOnlyMLMHead: cls.predictions.transform.dense + LayerNorm,
    cls.predictions.decoder (weight tied to word_embeddings, bias tied to cls.predictions.bias).
    hidden_dropout_prob: after the embeddings and after both output denses; attention_probs_dropout_prob on
    the probabilities.
    """
    h, n_layers, heads, vocab, inter = _standard_sizes(c)
    max_pos = c.opt_int("max_position_embeddings", 512)
    types = c.opt_int("type_vocab_size", 2)
    lin = (
        _lin("attention.self.query", h, h, True, "attn_q"),
        _lin("attention.self.key", h, h, True, "attn_k"),
        _lin("attention.self.value", h, h, True, "attn_v"),
        _lin("attention.output.dense", h, h, True, "attn_out"),
        _lin("intermediate.dense", h, inter, True, "mlp_up"),
        _lin("output.dense", inter, h, True, "mlp_down"),
    )
    params = _layernorm("attention.output.LayerNorm", h) + _layernorm("output.LayerNorm", h)
    params += [
        ParamSpec("bert.embeddings.word_embeddings.weight", vocab * h, "embedding"),
        ParamSpec("bert.embeddings.position_embeddings.weight", max_pos * h, "position_embedding"),
        ParamSpec("bert.embeddings.token_type_embeddings.weight", types * h, "position_embedding"),
        *_layernorm("bert.embeddings.LayerNorm", h, per_layer=False),
        *_layernorm("cls.predictions.transform.LayerNorm", h, per_layer=False),
        ParamSpec("cls.predictions.bias", vocab, "bias"),
    ]
    top = [_lin("cls.predictions.transform.dense", h, h, True, "other")]
    tied = _tied(c, True)
    # Tied, the decoder's weight is word_embeddings and its bias is cls.predictions.bias (_tied_weights_keys);
    # untied, transformers 5.23 ties neither, so the decoder holds its own weight and bias.
    decoder = _lin("cls.predictions.decoder", h, vocab, not tied, "lm_head", quantized_by_bnb=False)
    tied_l: tuple[LinearSpec, ...] = ()
    if tied:
        tied_l = (decoder,)
    else:
        top.append(decoder)
    hid = c.num("hidden_dropout_prob", 0.1)
    return dict(
        num_layers=n_layers, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=h // heads, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max_pos,
        tie_word_embeddings=tied, mlp_kind="plain", hidden_act=c.get("hidden_act", "gelu") or "gelu",
        norm_kind="layernorm", parallel_attn_mlp=False, position_embedding="absolute+type",
        **_dropout_fields(c.num("attention_probs_dropout_prob", 0.1), [hid, hid], embed=hid),
        sliding_window=None, is_causal_lm=False, layer_prefix="bert.encoder.layer", layer_linears=lin,
        top_linears=tuple(top), tied_linears=tied_l, params=tuple(params), rotary_dim=None,
    )


_BUILDERS = {
    "opt": _opt,
    "llama": _llama_like,
    "mistral": _llama_like,
    "mixtral": _llama_like,
    "qwen2": _llama_like,
    "gemma2": _llama_like,
    "phi": _phi,
    "phi3": _phi3,
    "falcon": _falcon,
    "gpt2": _gpt2,
    "bloom": _bloom,
    "stablelm": _stablelm,
    "bert": _bert,
    "gpt_bigcode": _gpt2,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def spec_from_config(config: dict, *, name: str, hf_id: str | None = None, source: str | None = None) -> ModelSpec:
    """The ModelSpec of the model transformers 5.23 builds from these config.json values
    (``AutoModelForCausalLM``; ``AutoModelForMaskedLM`` for bert)."""
    where = source or name
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a config must be a JSON object, got {type(config).__name__}")
    mt = config.get("model_type")
    if not mt:
        raise ConfigError(f"{where}: config.json lacks 'model_type' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    builder = _BUILDERS.get(mt)
    if builder is None:
        raise ConfigError(
            f"{where}: unsupported model_type {mt!r}; memplan supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # What most architectures share; a builder returns only the fields it sets itself or that differ.
    fields = dict(num_experts=1, num_experts_per_tok=1, attn_logit_softcapping=None, final_logit_softcapping=None,
                  sliding_window=None, is_causal_lm=True)
    fields.update(builder(_Config(config, mt, where)))
    h, heads = fields["hidden_size"], fields["num_attention_heads"]
    if mt not in ("gemma2", "llama", "mistral", "mixtral", "qwen2", "phi", "phi3") and h % heads:
        raise ConfigError(f"{where}: hidden size {h} is not a multiple of the {heads} attention heads")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise ConfigError(f"{where}: {heads} attention heads are not a multiple of the "
                          f"{fields['num_key_value_heads']} key/value heads")
    return ModelSpec(name=name, model_type=mt, hf_id=hf_id, source=source, config=dict(config), **fields)


# ---------------------------------------------------------------------------------------------------------------
# The catalog (profiles/models/<id>.json) and local config.json files


@dataclass(frozen=True)
class CatalogModel:
    """One catalog entry's metadata (its config is read by load_model)."""

    id: str
    hf_id: str
    aliases: tuple[str, ...]
    family: str
    source: str
    published_params: dict = field(compare=False, hash=False)
    exact_params: int
    path: Path = field(compare=False, default=None)

    def names(self) -> tuple[str, ...]:
        """Every spelling load_model accepts for this entry (compared case-insensitively)."""
        full = (self.id, self.hf_id, *self.aliases)
        return tuple(dict.fromkeys(n for x in full if x for n in (x, x.rsplit("/", 1)[-1])))


def _models_dir(override) -> Path:
    # memplan.catalog owns the profiles folder (override, MEMPLAN_PROFILES, packaged copy) and JSON reading.
    d = _catalog.profiles_dir(override) / "models"
    if not d.is_dir():
        raise ConfigError(f"{d}: model catalog folder not found (set {_catalog.PROFILES_ENV} to a profiles folder)")
    return d


_ENTRY_KEYS = ("id", "hf_id", "aliases", "family", "source", "published_params", "exact_params", "config")


def _entry(path: Path, data) -> CatalogModel:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a catalog model entry must be a JSON object")
    missing = [k for k in _ENTRY_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: catalog entry lacks {', '.join(repr(k) for k in missing)}")
    return CatalogModel(
        id=str(data["id"]), hf_id=str(data["hf_id"]), aliases=tuple(str(a) for a in data["aliases"] or ()),
        family=str(data["family"]), source=str(data["source"]), published_params=dict(data["published_params"]),
        exact_params=int(data["exact_params"]), path=path,
    )


def list_models(*, profiles_dir=None) -> list[CatalogModel]:
    """Every catalog model, sorted by id."""
    d = _models_dir(profiles_dir)
    return sorted((_entry(p, _catalog.read_json(p)) for p in sorted(d.glob("*.json"))), key=lambda m: m.id)


@functools.lru_cache(maxsize=16)
def _name_index(models_dir: str, stamp: tuple) -> dict[str, str]:
    """lower-cased spelling -> catalog file; ``stamp`` (file names + mtimes) invalidates it when files change."""
    index: dict[str, str] = {}
    for m in list_models(profiles_dir=Path(models_dir).parent):
        for n in m.names():
            index.setdefault(n.lower(), str(m.path))
    return index


def _dir_stamp(d: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in d.glob("*.json")))
    except OSError:
        return ()


@functools.lru_cache(maxsize=256)
def _spec_from_catalog_file(path: str, mtime_ns: int) -> ModelSpec:
    data = _catalog.read_json(Path(path))
    entry = _entry(Path(path), data)
    return spec_from_config(data["config"], name=entry.id, hf_id=entry.hf_id, source=entry.source)


@functools.lru_cache(maxsize=64)
def _spec_from_config_file(path: str, mtime_ns: int) -> ModelSpec:
    data = _catalog.read_json(Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config.json must hold a JSON object")
    return spec_from_config(data, name=path, source=path)


def _catalog_hit(file: Path, key: str) -> bool:
    """Whether the catalog file ``file`` is the entry named ``key`` (read without building its spec)."""
    try:
        return key in {n.lower() for n in _entry(file, _catalog.read_json(file)).names()}
    except ConfigError:
        return False


_CATALOG_FILES: dict[tuple[str, str], str] = {}  # (models dir, lower-cased name) -> file; hits only


def _catalog_file(models_dir: str, key: str) -> str | None:
    """The catalog file of the entry spelled ``key`` (lower-cased), or None. Hits are cached: planning calls
    load_model once per evaluated setup."""
    cached = _CATALOG_FILES.get((models_dir, key))
    if cached is not None:
        return cached
    d = Path(models_dir)
    # fast path: the file is named after the id, which is usually the name without its org prefix
    direct = d / f"{key.rsplit('/', 1)[-1]}.json"
    if direct.is_file() and _catalog_hit(direct, key):
        hit: str | None = str(direct)
    else:
        index = _name_index(models_dir, _dir_stamp(d))
        hit = index.get(key) or index.get(key.rsplit("/", 1)[-1])
    if hit is not None:
        _CATALOG_FILES[(models_dir, key)] = hit
    return hit


def load_model(name_or_path: str | Path, *, profiles_dir=None) -> ModelSpec:
    """A ModelSpec from a catalog name, a config.json path, or a local model folder holding config.json.

    A local path wins over a catalog name. A catalog lookup reads one file when the name is the entry's file
    name (``opt-13b``, ``facebook/opt-13b``, ``OPT-13B``); other spellings (aliases, hf ids that differ from the
    id) go through an index of all entries. Specs are cached per file and modification time.
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise UnknownModelError("empty model name; pass a catalog name (memplan models) or a local config.json")
    p = Path(raw).expanduser()
    if p.is_file():
        return _spec_from_config_file(str(p.resolve()), p.stat().st_mtime_ns)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = p / "config.json"
        return _spec_from_config_file(str(cfg.resolve()), cfg.stat().st_mtime_ns)

    d = _models_dir(profiles_dir)
    hit = _catalog_file(str(d), raw.lower())
    if hit and Path(hit).is_file():
        return _spec_from_catalog_file(hit, Path(hit).stat().st_mtime_ns)
    if p.is_dir():  # a folder that is not a catalog name either
        raise ConfigError(f"{p}: the folder holds no config.json")
    if raw.endswith(".json") or raw.startswith((".", "/", "~")) or "\\" in raw:
        raise UnknownModelError(f"no such config file or model folder: {raw!r}")
    ids = sorted(Path(f).stem for f in d.glob("*.json"))
    probe = raw.rsplit("/", 1)[-1]
    raise UnknownModelError(
        f"unknown model {raw!r}{suggestion_suffix(probe, ids)}; pass a catalog name (memplan models) "
        f"or a local config.json / model folder"
    )
