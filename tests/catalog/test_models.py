"""memplan.catalog.models: architecture specs held to transformers, peft and bitsandbytes.

Two kinds of tests:

- pure ones (no torch): name resolution, errors, hand-derived counts, catalog self-consistency;
- ground-truth ones, skipped without torch / transformers / peft: every catalog model is built by transformers
  on the meta device and wrapped by peft, and the spec must reproduce the exact parameter count, the exact
  LoRA-trainable count and the set of module names peft adapts, for peft's default targets and "all-linear".
  A tiny model per architecture is also loaded through bitsandbytes (4-bit, CPU) to check which weights
  bnb quantizes.

Runtime (2 CPU cores, 42 catalog models): 45-70 s for the whole file, most of it in the ``slow``-marked
meta-device builds (cached per module: each (model, targets) pair is built once; the largest, llama-3.1-405b,
takes ~6 s); ``-m "not slow"`` runs the rest in ~8 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from memplan.errors import ConfigError, InvalidSetupError, UnknownModelError
from memplan.catalog.models import (
    SUPPORTED_MODEL_TYPES,
    LinearSpec,
    ModelSpec,
    list_models,
    load_model,
    spec_from_config,
)

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
CATALOG = list_models(profiles_dir=PROFILES) if (PROFILES / "models").is_dir() else []
CATALOG_IDS = [m.id for m in CATALOG]


def _load(name: str) -> ModelSpec:
    return load_model(name, profiles_dir=PROFILES)


def _config(entry) -> dict:
    return json.loads(entry.path.read_text())["config"]


needs_catalog = pytest.mark.skipif(not CATALOG, reason=f"no catalog models under {PROFILES / 'models'}")

# OPT-125m's config.json values (facebook/opt-125m), used for the local-file tests and hand derivations.
OPT_125M = {
    "model_type": "opt", "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "num_attention_heads": 12, "max_position_embeddings": 2048, "do_layer_norm_before": True,
    "word_embed_proj_dim": 768, "dropout": 0.1, "attention_dropout": 0.0, "activation_function": "relu",
}

# A Mixtral small enough to derive by hand.
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_local_experts": 4,
                "num_hidden_layers": 1, "vocab_size": 1000, "num_attention_heads": 32, "num_key_value_heads": 8}


# --------------------------------------------------------------------------------------------------------------
# Pure tests: counts derived by hand


def test_opt_125m_total_by_hand():
    spec = spec_from_config(OPT_125M, name="opt-125m-local")
    # embed_tokens 50272*768 = 38,608,896; embed_positions (2048+2)*768 = 1,574,400 (OPT's offset of 2)
    # per layer: q,k,v,out_proj 4*(768*768+768) = 2,362,368; fc1 768*3072+3072 = 2,362,368;
    #            fc2 3072*768+768 = 2,360,064; 2 LayerNorms 2*2*768 = 3,072  -> 7,087,872; x12 = 85,054,464
    # final_layer_norm 2*768 = 1,536; lm_head tied to embed_tokens (counted once)
    assert spec.total_params() == 38_608_896 + 1_574_400 + 85_054_464 + 1_536 == 125_239_296
    assert spec.embedding_params() == 38_608_896 + 1_574_400


def test_opt_125m_lora_by_hand():
    spec = spec_from_config(OPT_125M, name="opt-125m-local")
    # LoRA r=16 on q_proj, v_proj: 12 layers x 2 modules x 16 x (768 in + 768 out) = 589,824
    assert spec.lora_trainable_params(16, ["q_proj", "v_proj"]) == 12 * 2 * 16 * (768 + 768) == 589_824
    # bnb quantizes the 72 linear weights of the layers; embeddings, biases, norms and the lm_head stay 16-bit
    assert spec.quantized_params_by_bnb() == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert spec.non_quantized_params() == 125_239_296 - spec.quantized_params_by_bnb()


def test_tiny_mixtral_all_linear_by_hand():
    spec = spec_from_config(TINY_MIXTRAL, name="tiny-mixtral")
    # head_dim 64/32 = 2: q 64->64, k 64->16, v 64->16, o 64->64: r*(in+out) = 4*(128+80+80+128) = 1,664
    # router (peft ParamWrapper on mlp.gate.weight, 4x64): 4*(64+4) = 272
    # experts.gate_up_proj (4, 256, 64): peft doubles the rank (w1+w3 fused): 8*4*(64+256) = 10,240
    # experts.down_proj (4, 64, 128): 4*4*(128+64) = 3,072                      -> 15,248 in all
    assert spec.lora_trainable_params(4, "all-linear") == 1_664 + 272 + 10_240 + 3_072 == 15_248
    assert spec.is_moe and spec.num_experts == 4
    # bnb leaves the router and the 3-D expert tensors 16-bit: only the attention projections are quantized
    assert spec.quantized_params_by_bnb() == 64 * 64 + 64 * 16 + 64 * 16 + 64 * 64


@needs_catalog
def test_opt_13b_reference_numbers():
    """docs/memory-model.md, "Base weights" and "LoRA parameters and gradients"."""
    spec = _load("opt-13b")
    assert spec.total_params() == 12_853_473_280
    # 40 layers x 2 x 16 x (5120 + 5120)
    assert spec.lora_trainable_params(16, "q_proj,v_proj") == 13_107_200 == 40 * 2 * 16 * (5120 + 5120)


# --------------------------------------------------------------------------------------------------------------
# Pure tests: catalog self-consistency (no torch)


@needs_catalog
@pytest.mark.parametrize("entry", CATALOG, ids=CATALOG_IDS)
def test_spec_matches_catalog_exact_params(entry):
    assert _load(entry.id).total_params() == entry.exact_params


@needs_catalog
@pytest.mark.parametrize("entry", CATALOG, ids=CATALOG_IDS)
def test_total_within_published_tolerance(entry):
    pub = entry.published_params
    total = _load(entry.id).total_params()
    rel = abs(total - pub["value"]) / pub["value"]
    assert rel <= pub["rel_tolerance"], f"{entry.id}: {total:,} vs published {pub['as_written']} ({rel:.2%} off)"


@needs_catalog
@pytest.mark.parametrize("entry", CATALOG, ids=CATALOG_IDS)
def test_catalog_spec_basics(entry):
    spec = _load(entry.id)
    assert spec.name == entry.id and spec.hf_id == entry.hf_id
    assert spec.model_type in SUPPORTED_MODEL_TYPES or spec.derived  # derived: memplan.catalog.models.derive
    hash(spec)  # the estimator caches on specs
    assert 0 <= spec.quantized_params_by_bnb() < spec.total_params()
    assert spec.lora_trainable_params(8) > 0  # peft's default targets resolve


# --------------------------------------------------------------------------------------------------------------
# Pure tests: name resolution and errors


@needs_catalog
def test_architecture_facts():
    # opt-350m: 512-dim word embeddings projected in/out of the 1024-dim stack; post-LN, no final LayerNorm
    opt = _load("opt-350m")
    assert [lin.name for lin in opt.top_linears] == ["model.decoder.project_out", "model.decoder.project_in"]
    assert not any(p.name.startswith("model.decoder.final_layer_norm") for p in opt.params)
    # falcon-7b: multi-query fused QKV (71 query heads + one K and one V head of 64), parallel block, and
    # FalconLinear is not an exact nn.Linear, so bnb quantizes nothing
    falcon = _load("falcon-7b")
    assert falcon.num_key_value_heads == 1 and falcon.layer_linears[0].out_features == 4544 + 2 * 64
    assert falcon.parallel_attn_mlp and falcon.quantized_params_by_bnb() == 0
    # phi-2: parallel block, partial rotary (0.4 of head_dim 80), lm_head with bias
    phi = _load("phi-2")
    assert phi.parallel_attn_mlp and phi.rotary_dim == 32 and phi.top_linears[0].bias
    # gemma-2: 4 RMSNorms per layer, logit softcapping, tied head
    gemma = _load("gemma-2-9b")
    assert sum(1 for p in gemma.params if p.per_layer and p.kind == "norm") == 4
    assert (gemma.attn_logit_softcapping, gemma.final_logit_softcapping) == (50.0, 30.0)
    assert gemma.tie_word_embeddings and not gemma.top_linears and gemma.tied_linears[0].name == "lm_head"
    # bloom: ALiBi, fused QKV with bias
    bloom = _load("bloom-560m")
    assert bloom.position_embedding == "alibi" and bloom.layer_linears[0].out_features == 3 * bloom.hidden_size
    # bert: masked-LM head, decoder tied to the word embeddings
    bert = _load("bert-large-uncased")
    assert not bert.is_causal_lm and bert.tied_linears[0].name == "cls.predictions.decoder"
    # gpt2: Conv1D everywhere in the blocks
    assert all(lin.conv1d for lin in _load("gpt2").layer_linears)
    # mixtral: the router and the 3-D experts stay 16-bit under bnb
    mix = _load("mixtral-8x7b")
    assert mix.is_moe and mix.num_experts == 8 and mix.num_experts_per_tok == 2
    assert {lin.role for lin in mix.layer_linears if not lin.quantized_by_bnb} == {
        "router", "experts_gate_up", "experts_down"}


@needs_catalog
@pytest.mark.parametrize("name", ["opt-13b", "facebook/opt-13b", "OPT-13B", "Facebook/OPT-13b", " opt-13b "])
def test_catalog_name_variants(name):
    assert _load(name).name == "opt-13b"


@needs_catalog
def test_aliases_and_hf_ids_resolve():
    for entry in CATALOG:
        for n in (entry.hf_id, entry.hf_id.upper(), *entry.aliases):
            assert _load(n).name == entry.id, n


@needs_catalog
def test_load_model_is_cached_and_fast():
    first = _load("opt-13b")
    t0 = time.perf_counter()
    for _ in range(100):
        assert _load("facebook/OPT-13B") is first
    assert (time.perf_counter() - t0) / 100 < 0.005


@needs_catalog
def test_unknown_name_suggests():
    with pytest.raises(UnknownModelError) as e:
        _load("opt-14b")
    msg = str(e.value)
    assert "unknown model 'opt-14b'" in msg and "did you mean" in msg and "opt-13b" in msg
    assert "config.json" in msg


def test_local_config_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OPT_125M))
    by_file = load_model(tmp_path / "config.json")
    by_folder = load_model(str(tmp_path))
    assert by_file.total_params() == by_folder.total_params() == 125_239_296
    assert by_file.model_type == "opt"


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_malformed_json_names_path(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "opt", ')
    with pytest.raises(ConfigError) as e:
        load_model(bad)
    assert str(bad) in str(e.value)


def test_unsupported_model_type():
    with pytest.raises(ConfigError) as e:
        spec_from_config({"model_type": "t5", "d_model": 512}, name="t5-small")
    msg = str(e.value)
    assert "'t5'" in msg and "encoder-decoder" in msg and len(msg.splitlines()) == 1


def test_missing_required_key_names_it():
    cfg = {k: v for k, v in OPT_125M.items() if k != "ffn_dim"}
    with pytest.raises(ConfigError, match="ffn_dim") as e:
        spec_from_config(cfg, name="my-opt", source="/tmp/my-opt/config.json")
    assert "/tmp/my-opt/config.json" in str(e.value)
    with pytest.raises(ConfigError, match="model_type"):
        spec_from_config({"hidden_size": 8}, name="x")


def test_alternative_key_spellings():
    # GPT-2 names its dimensions n_embd / n_layer / n_head; transformers' attribute_map accepts the
    # standard names too.
    a = spec_from_config({"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4},
                         name="a")
    b = spec_from_config({"model_type": "gpt2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 4}, name="b")
    assert a.total_params() == b.total_params()
    assert a.layer_linears[0].conv1d and a.layer_linears[0].out_features == 96  # c_attn: in 32, out 3*32


# --------------------------------------------------------------------------------------------------------------
# Pure tests: LoRA target semantics (peft's)


def test_target_forms_agree():
    spec = spec_from_config(OPT_125M, name="opt")
    as_list = spec.lora_trainable_params(8, ["q_proj", "v_proj"])
    assert spec.lora_trainable_params(8, "q_proj,v_proj") == as_list
    assert spec.lora_trainable_params(8, " q_proj , v_proj ") == as_list
    assert spec.lora_trainable_params(8, ("self_attn.q_proj", "v_proj")) == as_list
    assert spec.lora_trainable_params(8, r".*\.(q_proj|v_proj)") == as_list
    assert spec.lora_trainable_params(8, None) == as_list  # peft's default for opt
    assert spec.lora_trainable_params(8, "ALL-LINEAR") == spec.lora_trainable_params(8, "all-linear")


def test_regex_is_fullmatch_and_can_pick_layers():
    spec = spec_from_config(OPT_125M, name="opt")
    # a string is a regex matched against the FULL name, so "q_proj|v_proj" matches nothing (as in peft)
    with pytest.raises(InvalidSetupError, match="regex"):
        spec.resolve_targets("q_proj|v_proj")
    # ... but a bare name that fully matches nothing is read as a one-name list (peft would raise): memplan's
    # setups and CLI pass targets as comma-separated strings
    assert spec.resolve_targets("q_proj") == spec.resolve_targets(["q_proj"])
    with pytest.raises(InvalidSetupError, match="'q_prj' matches no module"):
        spec.resolve_targets("q_prj")
    resolved = spec.resolve_targets(r"model\.decoder\.layers\.(0|1)\.self_attn\.q_proj")
    assert [(lin.name, lin.layers) for lin in resolved] == [("self_attn.q_proj", (0, 1))]
    assert spec.instances(resolved[0]) == 2
    assert spec.lora_trainable_params(4, r"model\.decoder\.layers\.(0|1)\.self_attn\.q_proj") == 2 * 4 * 1536


def test_list_target_is_suffix_match():
    spec = spec_from_config(OPT_125M, name="opt")
    # "layers.3.fc1" matches only layer 3; "proj" is not a suffix after a dot, so it matches nothing
    (fc1,) = spec.resolve_targets(["layers.3.fc1"])
    assert fc1.layers == (3,)
    with pytest.raises(InvalidSetupError):
        spec.resolve_targets(["proj"])


def test_bad_target_lists_valid_names():
    spec = spec_from_config(OPT_125M, name="opt")
    with pytest.raises(InvalidSetupError) as e:
        spec.lora_trainable_params(8, "q_prj,v_proj")
    msg = str(e.value)
    assert "'q_prj'" in msg
    for short in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert short in msg
    with pytest.raises(InvalidSetupError, match="embedding"):
        spec.resolve_targets("embed_tokens,")
    with pytest.raises(InvalidSetupError, match="regular expression"):
        spec.resolve_targets("(")
    with pytest.raises(InvalidSetupError):
        spec.lora_trainable_params(0, "q_proj,")


def test_all_linear_excludes_output_layer():
    spec = spec_from_config(OPT_125M, name="opt")
    names = {lin.name for lin in spec.resolve_targets("all-linear")}
    assert "lm_head" not in names and len(names) == 6
    # but the (tied) lm_head can be named explicitly, as peft allows
    (head,) = spec.resolve_targets(["lm_head"])
    assert head.role == "lm_head" and spec.lora_trainable_params(8, ["lm_head"]) == 8 * (768 + 50272)


def test_mixtral_fused_expert_targets():
    spec = spec_from_config(TINY_MIXTRAL, name="tiny-mixtral")
    # peft (transformers-v5 conversion) refuses w1 without w3: both live in one gate_up_proj tensor
    with pytest.raises(InvalidSetupError, match="w3"):
        spec.resolve_targets(["w1"])
    assert spec.lora_trainable_params(4, ["w1", "w3"]) == 8 * 4 * (64 + 256)
    assert spec.adapted_names(["gate", "w2"]) == ["model.layers.0.mlp.gate.weight",
                                                  "model.layers.0.mlp.experts.down_proj"]
    # a string target on Mixtral is reduced to leaf names by peft, so a layer-0 regex adapts every layer
    two = spec_from_config({**TINY_MIXTRAL, "num_hidden_layers": 2}, name="two-layers")
    assert two.lora_trainable_params(4, r".*layers\.0\.self_attn\.q_proj") == 2 * 4 * 128


def test_default_targets():
    def default(cfg):
        return spec_from_config(cfg, name="x").default_lora_targets()

    assert default(OPT_125M) == ("q_proj", "v_proj")
    assert default({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2}) == ("c_attn",)
    assert default({"model_type": "bloom", "vocab_size": 10, "hidden_size": 8, "n_layer": 1,
                    "n_head": 2}) == ("query_key_value",)
    assert default({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "intermediate_size": 16}) == ("query", "value")


def test_falcon_is_not_quantized_by_bnb():
    spec = spec_from_config({"model_type": "falcon", "vocab_size": 100, "hidden_size": 32,
                             "num_hidden_layers": 2, "num_attention_heads": 4}, name="falcon-tiny")
    # FalconLinear subclasses nn.Linear; transformers' bnb replacement wants exactly nn.Linear
    assert spec.quantized_params_by_bnb() == 0
    assert spec.non_quantized_params() == spec.total_params()
    qkv = spec.layer_linears[0]
    assert qkv.name == "self_attention.query_key_value" and qkv.out_features == 32 + 2 * 8  # multi-query


# --------------------------------------------------------------------------------------------------------------
# Ground truth: transformers builds every catalog model on the meta device; peft wraps it.


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    return torch, transformers, peft


def _build_meta(config: dict):
    torch, transformers, _ = _hf()
    auto = transformers.AutoModelForMaskedLM if config["model_type"] == "bert" else transformers.AutoModelForCausalLM
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return auto.from_config(cfg)
    except Exception as e:  # an architecture this transformers cannot build: not memplan's failure
        pytest.skip(f"transformers {transformers.__version__} cannot build {config['model_type']}: {e!r}"[:300])


_TARGET_SETS = ("default", "all-linear")


@pytest.fixture(scope="module")
def hf_results():
    """(model id, targets) -> (total params, trainable params, adapted names); built lazily, once each."""
    cache: dict = {}

    def get(entry, which: str):
        key = (entry.id, which)
        if key not in cache:
            _, _, peft = _hf()
            import warnings

            config = _config(entry)
            spec = _load(entry.id)
            model = _build_meta(config)
            total = sum(p.numel() for p in model.parameters())
            targets = list(spec.default_lora_targets()) if which == "default" else "all-linear"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets))
            trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            base = wrapped.base_model
            adapted = set(base.targeted_module_names) | set(getattr(base, "targeted_parameter_names", []))
            cache[key] = (total, trainable, adapted)
        return cache[key]

    return get


@pytest.mark.slow
@needs_catalog
@pytest.mark.parametrize("entry", CATALOG, ids=CATALOG_IDS)
def test_total_matches_transformers(entry, hf_results):
    total, _, _ = hf_results(entry, "default")
    assert _load(entry.id).total_params() == total == entry.exact_params


@pytest.mark.slow
@needs_catalog
@pytest.mark.parametrize("which", _TARGET_SETS)
@pytest.mark.parametrize("entry", CATALOG, ids=CATALOG_IDS)
def test_lora_matches_peft(entry, which, hf_results):
    spec = _load(entry.id)
    _, trainable, adapted = hf_results(entry, which)
    targets = spec.default_lora_targets() if which == "default" else "all-linear"
    assert spec.lora_trainable_params(8, targets) == trainable
    assert set(spec.adapted_names(targets)) == adapted
    # resolve_targets agrees with the names: every adapted instance is one spec copy
    assert sum(spec.instances(lin) for lin in spec.resolve_targets(targets)) == len(adapted)


# --------------------------------------------------------------------------------------------------------------
# Ground truth: what bitsandbytes quantizes when transformers loads a model with load_in_4bit (CPU).

_TINY = {
    "opt": {"model_type": "opt", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 64,
            "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 16,
            "do_layer_norm_before": False},
    "llama": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mixtral": {**TINY_MIXTRAL, "vocab_size": 128, "num_hidden_layers": 2},
    "qwen2": {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "phi": {"model_type": "phi", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4},
    "phi3": {"model_type": "phi3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "pad_token_id": 0, "eos_token_id": 0},
    "falcon": {"model_type": "falcon", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4},
    "gpt2": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0},
    "bloom": {"model_type": "bloom", "vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 4},
    "stablelm": {"model_type": "stablelm", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "bert": {"model_type": "bert", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4,
                    "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0},
}


def test_tiny_configs_cover_every_model_type():
    assert set(_TINY) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(_TINY))
def test_bnb_quantizes_what_the_spec_says(model_type, tmp_path):
    torch, transformers, _ = _hf()
    pytest.importorskip("bitsandbytes")
    import warnings

    config = _TINY[model_type]
    spec = spec_from_config(config, name=f"tiny-{model_type}")
    auto = transformers.AutoModelForMaskedLM if model_type == "bert" else transformers.AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto.from_config(transformers.AutoConfig.for_model(**config)).save_pretrained(tmp_path)
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True)
        model = auto.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16)
    quantized = {n.removesuffix(".weight") for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    expected = {f"{spec.layer_prefix}.{i}.{lin.name}" for i in range(spec.num_layers)
                for lin in spec.layer_linears if lin.quantized_by_bnb}
    expected |= {lin.name for lin in spec.top_linears if lin.quantized_by_bnb}
    assert quantized == expected
    # what stays 16-bit (embeddings, norms, biases, lm_head, routers, experts) is the rest of the model
    kept = sum(p.numel() for n, p in model.named_parameters() if type(p).__name__ != "Params4bit")
    assert kept == spec.non_quantized_params()


# Every dropout probability key the supported config classes read, each with its own value so that a recorded
# call tells which key it came from.
_DROPOUTS = {"dropout": 0.21, "attention_dropout": 0.11, "activation_dropout": 0.41, "resid_pdrop": 0.22,
             "embd_pdrop": 0.33, "attn_pdrop": 0.12, "hidden_dropout": 0.23, "hidden_dropout_prob": 0.24,
             "attention_probs_dropout_prob": 0.13}


@pytest.mark.parametrize("model_type", sorted(_TINY))
def test_dropout_fields_match_training_forward(model_type, monkeypatch):
    """The dropout fields say which dropouts transformers really applies in training mode: one forward of a
    tiny model with every dropout key set records each F.dropout call (eager attention, so the probability
    dropout is an F.dropout call too)."""
    torch, transformers, _ = _hf()
    config = {**_TINY[model_type], **_DROPOUTS}
    spec = spec_from_config(config, name=f"tiny-{model_type}")
    auto = transformers.AutoModelForMaskedLM if model_type == "bert" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(transformers.AutoConfig.for_model(**config, attn_implementation="eager")).train()
    calls: list[float] = []
    real = torch.nn.functional.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            calls.append(round(p, 2))
        return real(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", recording)
    model(input_ids=torch.randint(0, 100, (1, 5)))
    expected: dict[float, int] = {}
    for p, n in ((spec.attention_dropout, spec.num_layers),
                 (spec.residual_dropout, spec.num_layers * spec.residual_dropout_sites),
                 (spec.embedding_dropout, 1), (spec.activation_dropout, spec.num_layers)):
        if p > 0:
            expected[round(p, 2)] = expected.get(round(p, 2), 0) + n
    assert {p: calls.count(p) for p in set(calls)} == expected


def test_linear_spec_lora_params():
    lin = LinearSpec("self_attn.q_proj", 4096, 4096, False)
    assert lin.lora_params(16) == 16 * (4096 + 4096)
    experts = LinearSpec("mlp.experts.gate_up_proj", 64, 256, False, num_experts=4, lora_rank_multiplier=2)
    assert experts.weight_numel == 4 * 64 * 256 and experts.lora_params(4) == 8 * 4 * (64 + 256)

