"""Adapter variants: what each trains and what it keeps for backward beyond plain LoRA.

peft 0.21 builds every variant here; memplan sizes each from its forward code (cited inline) and
``memplan simulate`` runs the real one (docs/adapters-and-savers.md, "Adapter variants"):

- ``lora``: plain LoRA (``peft.LoraConfig``), modelled in ``memplan.plan.trainable`` / ``memplan.plan.activations``.
- ``dora``: ``LoraConfig(use_dora=True)`` (peft/tuners/lora/dora.py ``DoraLinearLayer``): a trainable magnitude vector
  per adapted weight (out_features values) and, every forward, the norm of W + scale x BA (``get_weight_norm``) from a
  dense copy of BA built through an identity matrix (``get_lora_weight``) and the base weight (dequantized for 4/8-bit
  bases, ``dequantize_module_weight``).
- ``lora-fa``: LoRA with A frozen (peft/optimizers/lorafa.py ``create_lorafa_optimizer`` sets ``requires_grad_(False)``
  on every lora_A): no gradient or optimizer state for A, and lora_A no longer saves its input.
- ``ia3``: ``peft.IA3Config`` (peft/tuners/ia3/layer.py ``Linear.forward``): one learned vector per adapted module,
  scaling its output (attention) or its input (feed-forward modules).

``rslora`` (scale alpha / sqrt(r)) and LoRA+ (a larger learning rate for B: peft/optimizers/loraplus.py, the same
AdamW state) change values, not memory. ``modules_to_save`` trains full copies of whole modules
(peft/utils/other.py ``ModulesToSaveWrapper``: the original stays, frozen) and ``trainable_tokens`` trains some rows of
the input embedding (peft/tuners/trainable_tokens/layer.py ``TrainableTokensLayer``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .dtypes import DTYPE_BYTES

if TYPE_CHECKING:
    from memplan.catalog.models import LinearSpec, ModelSpec

    from .setup import TrainSetup

__all__ = ["ADAPTERS", "resolve_adapter", "ia3_targets", "ia3_vectors", "ia3_modules", "saved_modules",
           "frozen_adapter_bytes", "adapted_linears", "adapter_saved_per_token", "dora_saved_bytes",
           "dora_forward_transient_bytes", "saved_head_grad_bytes", "tied_token_rows_saved", "SavedModule",
           "IA3_TARGETS", "LORAFA_STEP_TEMPS"]

ADAPTERS = ("lora", "dora", "lora-fa", "ia3")

# peft's LoraFAOptimizer steps one (A, B) pair at a time (peft/optimizers/lorafa.py ``step``): B's projected gradient
# (made in bf16 under autocast, cast back), the denominator and the update are alive together, three B-sized
# tensors (memplan simulate: 2.1 MiB at a 2816 x 64 fp32 B)
LORAFA_STEP_TEMPS = 3

# peft 0.21.2 utils/constants.py TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, for the catalog's model types: (targets, feed-forward).
IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
}


def resolve_adapter(setup: TrainSetup, spec: ModelSpec, *, method: str, bits: int, targets: str | None) -> dict:
    """Check the adapter knobs against the method and the model; returns the fields to replace."""
    if setup.adapter not in ADAPTERS:
        raise InvalidSetupError(f"invalid adapter {setup.adapter!r}; allowed: {', '.join(ADAPTERS)}")
    if not isinstance(setup.trainable_tokens, int) or isinstance(setup.trainable_tokens, bool) \
            or setup.trainable_tokens < 0:
        raise InvalidSetupError(f"invalid trainable tokens {setup.trainable_tokens!r}; must be an integer >= 0")
    ratio = setup.loraplus_lr_ratio
    if ratio is not None and ratio <= 0:
        raise InvalidSetupError(f"invalid LoRA+ learning-rate ratio {ratio!r}; must be > 0 (the paper uses 16)")
    if method == "full":
        used = [name for name, on in (("--adapter " + setup.adapter, setup.adapter != "lora"),
                                      ("--modules-to-save", bool(setup.modules_to_save)),
                                      ("--trainable-tokens", setup.trainable_tokens > 0),
                                      ("--rslora", setup.rslora), ("--loraplus-lr-ratio", ratio is not None))
                if on]
        if used:
            raise InvalidSetupError(f"{', '.join(used)} configure an adapter; full fine-tuning trains every weight "
                                    f"(use --method lora or qlora)")
        return {}
    if setup.adapter == "ia3":
        for name, on in (("--rslora", setup.rslora), ("--loraplus-lr-ratio", ratio is not None),
                         ("--trainable-tokens", setup.trainable_tokens > 0)):
            if on:
                raise InvalidSetupError(f"{name} is a LoRA option; IA3 (--adapter ia3) has no such setting")
        names, _ = ia3_targets(spec, setup.targets)  # raises for a model type without peft defaults and no --targets
        return {"targets": ",".join(names)}
    if setup.adapter == "lora-fa" and setup.optimizer not in ("adamw_torch", "adamw"):
        raise InvalidSetupError(f"--adapter lora-fa trains with peft's LoraFAOptimizer (create_lorafa_optimizer, an "
                                f"AdamW); got --optimizer {setup.optimizer!r}, use adamw_torch")
    targets = targets if targets is not None else ",".join(spec.default_lora_targets())
    if setup.adapter in ("dora", "lora-fa"):
        # peft 0.21 lora.ParamWrapper: "does not work with ... use_dora"; LoRA-FA's A/B pairs are per module, and
        # memplan sizes a ParamWrapper's adapter as one tensor (trainable._lora_tensors), so it cannot freeze its A
        fused = [lin.name for lin in adapted_linears(spec, targets) if lin.peft_target == "parameter"]
        if fused:
            name = "DoRA" if setup.adapter == "dora" else "LoRA-FA"
            raise InvalidSetupError(f"{name} cannot adapt {', '.join(fused)} (peft target_parameters); choose "
                                    f"--targets without them")
    if setup.modules_to_save:
        saved_modules(spec, setup.modules_to_save)  # raises for a name the model does not have
    if setup.trainable_tokens and setup.trainable_tokens > spec.vocab_size:
        raise InvalidSetupError(f"--trainable-tokens {setup.trainable_tokens} exceeds {spec.name}'s vocabulary of "
                                f"{spec.vocab_size:,} rows")
    return {}


def ia3_targets(spec: ModelSpec, targets: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """IA3's (target modules, feed-forward modules) for ``spec``: peft's defaults for its model type, or the modules
    the user named (``--targets a,b``), of which peft's feed-forward ones scale their input."""
    default = IA3_TARGETS.get(spec.model_type)
    if targets is None:
        if default is None:
            raise InvalidSetupError(f"peft has no IA3 default targets for {spec.model_type}; name them with "
                                    f"--targets (e.g. k_proj,v_proj,down_proj)")
        return default
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    known = {lin.name.split(".")[-1] for lin in spec.layer_linears} | {lin.name for lin in spec.layer_linears}
    bad = [n for n in names if n not in known]
    if bad:
        raise InvalidSetupError(f"IA3 target {bad[0]!r} is not a layer module of {spec.name}; allowed: "
                                f"{', '.join(sorted(known))}")
    feedforward = default[1] if default else ()
    return names, tuple(n for n in names if n in feedforward)


def ia3_modules(spec: ModelSpec, targets: str | None) -> tuple[tuple[LinearSpec, bool], ...]:
    """Every per-layer module IA3 adapts, with whether it is a feed-forward one (scales its input)."""
    names, feedforward = ia3_targets(spec, targets)

    def matches(lin, name):
        return lin.name == name or lin.name.endswith("." + name)

    return tuple((lin, any(matches(lin, f) for f in feedforward)) for lin in spec.layer_linears
                 if any(matches(lin, n) for n in names))


@lru_cache(maxsize=256)
def ia3_vectors(spec: ModelSpec, targets: str | None) -> tuple[int, ...]:
    """The length of every IA3 vector of the model (peft/tuners/ia3/layer.py ``update_layer``: ``ia3_l`` is (1, in)
    for feed-forward modules, (out, 1) for the others), one per adapted module per layer."""
    per_layer = tuple(lin.in_features if ff else lin.out_features for lin, ff in ia3_modules(spec, targets))
    return per_layer * spec.num_layers


@lru_cache(maxsize=1024)
def adapted_linears(spec: ModelSpec, targets: str) -> tuple[LinearSpec, ...]:
    """``spec.resolve_targets`` memoized: the search asks for the same few target sets hundreds of times."""
    return tuple(spec.resolve_targets(targets))


class SavedModule:
    """A module trained in full through ``modules_to_save``: its weight (and bias) values, and its role."""

    __slots__ = ("name", "numel", "rows", "cols", "role")

    def __init__(self, name: str, numel: int, rows: int, cols: int, role: str):
        self.name, self.numel, self.rows, self.cols, self.role = name, numel, rows, cols, role


@lru_cache(maxsize=256)
def saved_modules(spec: ModelSpec, names: str) -> tuple[SavedModule, ...]:
    """The top-level modules ``--modules-to-save`` names: the lm_head (or a tied one) and the input embedding."""
    found: list[SavedModule] = []
    tops: dict[str, LinearSpec] = {lin.name.split(".")[-1]: lin for lin in spec.top_linears + spec.tied_linears}
    embeds = {p.name.split(".")[-2] if p.name.endswith(".weight") else p.name: p
              for p in spec.params if p.kind == "embedding" and not p.per_layer}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name in tops:
            lin = tops[name]
            found.append(SavedModule(name, lin.weight_numel + lin.bias_numel, lin.out_features, lin.in_features,
                                     "lm_head"))
        elif name in embeds:
            p = embeds[name]
            found.append(SavedModule(name, p.numel, p.numel // spec.hidden_size, spec.hidden_size, "embedding"))
        else:
            allowed = sorted(tops) + sorted(embeds)
            import difflib  # (only for a name that is not there)

            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidSetupError(f"--modules-to-save {name!r} is not a top-level module of {spec.name}{hint}; "
                                    f"allowed: {', '.join(allowed)}")
    return tuple(found)


def frozen_adapter_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """What an adapter adds to the frozen weights: LoRA-FA's A matrices (created with the adapter, then frozen), and
    the trainable tokens' original rows, which peft keeps to restore them (``trainable_tokens_original``, a clone in
    the embedding's dtype)."""
    if not setup.trains_lora:
        return 0
    # (peft's autocast_adapter_dtype casts the originals' BufferDict with the adapter: fp32)
    total = setup.trainable_tokens * spec.hidden_size * DTYPE_BYTES[setup.adapter_dtype]
    if setup.adapter == "lora-fa":
        total += sum(spec.instances(lin) * lin.num_experts * setup.rank * lin.lora_rank_multiplier * lin.in_features
                     for lin in adapted_linears(spec, setup.targets)) * DTYPE_BYTES[setup.adapter_dtype]
    return total


def adapter_saved_per_token(spec: ModelSpec, targets: str, adapter: str, *, rank: int, dropout: bool, ab: int,
                            base_b: int, adapter_b: int, layer_names: set[str]) -> int:
    """Bytes per token the adapters of all layers save for backward (the caller spreads them over the layers).

    ``ab``: the dtype lora_A / lora_B compute in (the autocast dtype, else the adapter's); ``base_b``: the base
    layer's output dtype; ``adapter_b``: the adapter weights' own dtype, which peft casts the input to
    (``LoraLayer._cast_input_dtype``). Per adapted module:

    - LoRA (peft/tuners/lora/layer.py ``Linear.forward``): lora_A saves its input (the dropout output, or the cast),
      the dropout its bool mask, lora_B lora_A's output (rank values).
    - LoRA-FA: A is frozen, so lora_A saves no input (a frozen matmul keeps only its weight); mask and rank stay.
    - DoRA (peft/tuners/lora/dora.py ``DoraLinearLayer.forward``): the LoRA terms, plus the two products with the
      trainable magnitude: ``(mag_norm_scale - 1) * base_result`` saves base_result and ``mag_norm_scale *
      lora_result`` saves lora_result, each out_features wide. With dropout the base result is recomputed as
      ``F.linear(dropout(x), W)`` in the adapter dtype (autocast dtype under autocast); without it is the base
      layer's own output (``base_b``).
    - IA3 (peft/tuners/ia3/layer.py ``Linear.forward``): ``result * ia3_scaling`` saves the output (out_features,
      ``base_b``); a feed-forward module's ``x.to(ia3 dtype) * ia3_scaling`` saves the fp32 input (in_features).
    """
    total = 0
    if adapter == "ia3":
        for lin, feedforward in ia3_modules(spec, targets):
            total += spec.num_layers * (lin.in_features * adapter_b if feedforward else lin.out_features * base_b)
        return total
    for lin in adapted_linears(spec, targets):
        if lin.name not in layer_names:
            continue  # top-level modules are handled with the model extras
        width = lin.in_features
        routed = spec.num_experts_per_tok if lin.num_experts > 1 else 1
        r = rank * lin.lora_rank_multiplier
        saved = (0 if adapter == "lora-fa" else width * ab) + (width if dropout else 0) + r * ab
        if adapter == "dora":
            saved += lin.out_features * ((ab if dropout else base_b) + ab)
        # Targets restricted to some layers: spread their bytes over the stack (a per-layer average).
        total += spec.instances(lin) * routed * saved
    return total


# Roles of the modules that read a layer's (normed) input: in the first layer, without checkpointing, that input
# does not require grad (memplan.catalog.models.spec LinearSpec.role)
_INPUT_ROLES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv"})
_MLP_INPUT_ROLES = frozenset({"mlp_up", "mlp_gate", "mlp_gate_up"})


def _dora_modules(spec: ModelSpec, setup: TrainSetup) -> list:
    layer_names = {x.name for x in spec.layer_linears}
    return [lin for lin in adapted_linears(spec, setup.targets) if lin.name in layer_names and lin.num_experts == 1]


def dora_saved_bytes(spec: ModelSpec, setup: TrainSetup, ac: int) -> tuple[int, int]:
    """DoRA's token-independent saved tensors: (bytes per layer, bytes the first layer does not save).

    Per adapted module (peft/tuners/lora/dora.py ``DoraLinearLayer.forward``): with dropout, ``F.linear(x, W)`` saves
    the base weight as it multiplies it -- ``dequantize_module_weight(base).to(x.dtype)``, a copy in the adapter dtype,
    or under autocast the autocast cast of that copy: out x in values per module and layer, as large as the frozen
    weight it adapts; and three out_features vectors in the adapter dtype (the detached weight norm, saved by the
    division; ``mag_norm_scale``; ``mag_norm_scale - 1``). A module whose input does not require grad -- the first
    layer's, reading the embeddings, without checkpointing or a trainable embedding -- saves neither the weight nor
    ``mag_norm_scale - 1``."""
    if setup.adapter != "dora" or not setup.trains_lora:
        return 0, 0
    ab = DTYPE_BYTES[setup.adapter_dtype]
    weight_b = (ac or ab) if setup.lora_dropout > 0 else 0
    mods = _dora_modules(spec, setup)
    per_layer = sum(lin.in_features * lin.out_features * weight_b + 3 * lin.out_features * ab for lin in mods)
    if setup.grad_ckpt or setup.trainable_tokens or _embedding_trains(spec, setup):
        return per_layer, 0
    roles = set(_INPUT_ROLES) | (_MLP_INPUT_ROLES if spec.parallel_attn_mlp else set())
    if not any(lin.role in _INPUT_ROLES | {"attn_out"} for lin in mods):
        roles |= _MLP_INPUT_ROLES  # no attention module adapted: the MLP's input does not require grad either
    exempt = sum(lin.in_features * lin.out_features * weight_b + lin.out_features * ab
                 for lin in mods if lin.role in roles)
    return per_layer, exempt


def _embedding_trains(spec: ModelSpec, setup: TrainSetup) -> bool:
    return bool(setup.modules_to_save) and any(m.role == "embedding"
                                               for m in saved_modules(spec, setup.modules_to_save))


def dora_forward_transient_bytes(spec: ModelSpec, setup: TrainSetup, ac: int, *, first_in_layer: bool | None = None
                                 ) -> int:
    """The largest transient of one DoRA module's forward, while it computes the weight norm: ``get_lora_weight``
    multiplies an in x in identity (``torch.eye``, adapter dtype) through lora_A and lora_B -- the identity (or its
    autocast cast) is saved by lora_A, lora_A's output by lora_B -- and ``get_weight_norm`` adds
    ``scaling * lora_weight`` to the base weight cast to the adapter dtype: at that add the dense BA (in x out,
    adapter dtype), the weight copy, the scaled BA and the sum are alive together (peft/tuners/lora/dora.py).

    ``first_in_layer``: only the modules that read the layer's input (True: q/k/v, run before anything else of the
    layer is saved) or only the others (False); None: all. Checkpointing's recomputation in backward needs the two
    apart: the first come before the recomputed layer's saved tensors, the others with most of them."""
    if setup.adapter != "dora" or not setup.trains_lora:
        return 0
    ab = DTYPE_BYTES[setup.adapter_dtype]
    # The identity lora_A saved stays alive through the norm, with or without checkpointing (memplan simulate).
    eye_b = ac or ab
    weight_src_b = DTYPE_BYTES[setup.dtype] if setup.bits in (4, 8) else (
        4 if setup.bits == 32 else DTYPE_BYTES[setup.dtype])
    copy_b = ab if weight_src_b != ab else 0  # ``weight.to(x.dtype)`` copies only across dtypes
    worst = 0
    for lin in _dora_modules(spec, setup):
        if first_in_layer is not None and (lin.role in _INPUT_ROLES) != first_in_layer:
            continue
        n_in, n_out = lin.in_features, lin.out_features
        r = setup.rank * lin.lora_rank_multiplier
        at_norm = n_in * n_in * eye_b + n_in * r * eye_b + n_in * n_out * (ab + copy_b + 2 * ab)
        # the identity itself, with its autocast cast, as lora_A multiplies it
        at_eye = n_in * n_in * (ab + ac) + n_in * r * (ac or ab) if ac else 0
        worst = max(worst, at_norm, at_eye)
    return worst


def saved_head_grad_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """The gradient of a ``modules_to_save`` lm_head copy (its own dtype: fp32 after the k-bit upcast)."""
    if not setup.trains_lora or not setup.modules_to_save:
        return 0
    from .weights import float_weight_bytes

    return sum(m.numel for m in saved_modules(spec, setup.modules_to_save) if m.role == "lm_head") \
        * float_weight_bytes(setup)


def tied_token_rows_saved(spec: ModelSpec, setup: TrainSetup, ac: int) -> tuple[int, int]:
    """Trainable tokens on a model whose lm_head is tied to the embedding: peft wraps the lm_head too and multiplies by
    the merged weight (peft/tuners/trainable_tokens/layer.py ``forward_adapters``: ``W.index_copy(...)``, then
    ``F.linear(x, W)``), which now requires grad, so the matmul saves both its input and a whole vocabulary x hidden
    weight (their autocast casts under autocast). Returns (bytes per token, fixed bytes)."""
    if not setup.trains_lora or not setup.trainable_tokens or not spec.tied_linears:
        return 0, 0
    from .weights import float_weight_bytes

    b = ac or float_weight_bytes(setup)
    return spec.hidden_size * b, spec.vocab_size * spec.hidden_size * b
