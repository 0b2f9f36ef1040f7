"""Architecture specs: every weight-bearing module of a model with its shape and Hugging Face module name, and
exact parameter counts, from ``config.json`` values (the builders are in ``families.py``).

Pure Python: no torch, no transformers. ``tests/catalog/test_models.py`` holds each spec to the meta-device
model transformers 5.23 builds (exact total and LoRA-trainable counts) and to the counts published for each
catalog model. Which modules a LoRA adapter lands on is ``targets.LoraTargets``, mixed into ``ModelSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .targets import ALL_LINEAR, LoraTargets

__all__ = ["LinearSpec", "ParamSpec", "ModelSpec", "ALL_LINEAR"]


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
class ModelSpec(LoraTargets):
    """Everything memplan knows about one architecture, derived from its config.json values.

    Hashable and compared by value; the hash is computed once (the estimator memoizes on the spec, and the
    search asks for it hundreds of times: hashing every field each time was most of ``fit``'s run time).
    """

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

    # Output layers whose weight IS the input embedding (tied lm_head, BERT's MLM decoder): peft can adapt
    # them, but their weight is stored once, in the embedding ParamSpec, so they count no parameters here.
    tied_linears: tuple[LinearSpec, ...] = ()
    # How many dropouts with p > 0 each layer applies to hidden-size tensors on the residual path (attention
    # output, MLP output); residual_dropout is their (largest) probability. 2 for OPT / GPT-2 / BERT,
    # 1 for StableLM (MLP only) and parallel Falcon (one dropout on attn + mlp).
    residual_dropout_sites: int = 0
    rotary_dim: int | None = None  # dims per head that get rotary embeddings (partial rotary: phi, stablelm)
    # Derived from transformers' own module tree (memplan.catalog.models.derive) rather than a hand-written family:
    # its activation terms are traced per regime (memplan.plan.derived), keyed by ``derived_key`` in the cache.
    derived: bool = False
    derived_key: str = field(default="", compare=False)
    lora_defaults: tuple[str, ...] = ()  # peft's default target_modules where no DEFAULT_LORA_TARGETS entry exists
    # peft's transformers-v5 MoE conversion for derived model types (targets.PEFT_V5_MOE_TARGETS / _FUSED form)
    moe_targets: tuple[tuple[str, str], ...] = ()
    moe_fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The attention implementations a derived model's class supports (``_supports_sdpa``, ``_supports_flash_attn``:
    # gpt-oss has no SDPA path, for its attention sinks); empty for hand-written families, whose rules live in
    # memplan.plan.attention.
    attention_implementations: tuple[str, ...] = ()
    # A derived model whose fused 3-D experts run through transformers' experts interface, torch grouped_mm by
    # default (``use_experts_implementation``: Qwen3-MoE, Qwen3.5-MoE, gpt-oss; not Llama-4's bmm experts)
    experts_grouped_mm: bool = False

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare))
            object.__setattr__(self, "_hash", cached)  # frozen: stored once in the instance dict
        return cached

    def __getstate__(self) -> dict:
        # str hashes differ between processes: a pickled spec must not carry this process's cached values
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_candidate_list")}

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

