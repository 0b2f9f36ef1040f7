"""Adapter variants and what they train (memplan.plan.adapters): pure planning, no torch."""

from __future__ import annotations

import pytest

from memplan.catalog.models import load_model
from memplan.errors import InvalidSetupError
from memplan.plan.estimate import estimate
from memplan.plan.setup import TrainSetup, resolve_setup

MODEL = "llama-3.1-8b"


def _est(**kw):
    return estimate(TrainSetup(MODEL, gpu="a100-80gb", **kw))


def test_rslora_and_loraplus_cost_nothing():
    base = _est()
    assert _est(rslora=True).total_bytes == base.total_bytes
    assert _est(loraplus_lr_ratio=16.0).total_bytes == base.total_bytes


def test_dora_adds_one_magnitude_value_per_output_row():
    spec = load_model(MODEL)
    lora, dora = _est(targets="all-linear"), _est(targets="all-linear", adapter="dora")
    rows = spec.num_layers * sum(lin.out_features for lin in spec.layer_linears)
    assert dora.params.trainable - lora.params.trainable == rows
    assert dora.components["lora_params"] - lora.components["lora_params"] == rows * 4  # fp32 adapter
    assert dora.total_bytes > lora.total_bytes


def test_dora_with_dropout_saves_a_copy_of_every_adapted_weight():
    """With dropout, DoRA's F.linear(dropout(x), W) keeps W's autocast cast for backward: as large as the 16-bit
    weights it adapts, in every layer but the first."""
    spec = load_model(MODEL)
    kw = dict(targets="q_proj,v_proj", batch_size=1, seq_len=256)
    with_dropout, without = _est(adapter="dora", **kw), _est(adapter="dora", lora_dropout=0.0, **kw)
    adapted = sum(lin.in_features * lin.out_features for lin in spec.layer_linears
                  if lin.name.endswith(("q_proj", "v_proj")))
    gap = with_dropout.components["activations"] - without.components["activations"]
    assert gap >= (spec.num_layers - 1) * adapted * 2


def test_lora_fa_trains_only_b_and_keeps_a_frozen():
    lora, fa = _est(targets="all-linear", rank=64), _est(targets="all-linear", rank=64, adapter="lora-fa")
    spec = load_model(MODEL)
    a_values = spec.num_layers * 64 * sum(lin.in_features for lin in spec.layer_linears)
    assert lora.params.trainable - fa.params.trainable == a_values
    assert fa.components["weights"] - lora.components["weights"] == a_values * 4  # A frozen, fp32
    assert fa.components["optimizer_state"] < lora.components["optimizer_state"]
    assert fa.components["activations"] < lora.components["activations"]  # lora_A saves no input


def test_ia3_trains_peft_default_vectors():
    # peft IA3 on llama: k_proj, v_proj (out 1024 each) and down_proj (feed-forward: in 14336), 32 layers
    assert _est(adapter="ia3").params.trainable == 32 * (1024 + 1024 + 14336)


def test_modules_to_save_trains_a_full_copy_in_the_module_dtype():
    spec = load_model(MODEL)
    head = spec.vocab_size * spec.hidden_size
    base, saved = _est(), _est(modules_to_save="lm_head")
    assert saved.params.trainable - base.params.trainable == head
    assert saved.components["lora_params"] - base.components["lora_params"] == head * 2  # a bf16 deep copy
    assert saved.components["optimizer_state"] - base.components["optimizer_state"] == head * 2 * 2
    qlora = estimate(TrainSetup(MODEL, method="qlora", modules_to_save="lm_head"))
    assert qlora.params.trainable * 4 > head * 4  # fp32 after prepare_model_for_kbit_training's upcast


def test_trainable_tokens_train_rows_of_the_embedding():
    base, tokens = _est(), _est(trainable_tokens=10)
    assert tokens.params.trainable - base.params.trainable == 10 * 4096


@pytest.mark.parametrize("kw, words", [
    (dict(method="full", adapter="dora"), "full fine-tuning"),
    (dict(adapter="lora-fa", optimizer="sgd"), "LoraFAOptimizer"),
    (dict(modules_to_save="lm_heda"), "did you mean lm_head"),
    (dict(trainable_tokens=10**7), "vocabulary"),
    (dict(trainable_tokens=-1), "trainable tokens"),
    (dict(loraplus_lr_ratio=0.0), "LoRA+"),
    (dict(adapter="ia3", rslora=True), "IA3"),
    (dict(adapter="ia3", targets="nonexistent"), "matches no module"),
    (dict(adapter="bogus"), "allowed: lora, dora, lora-fa, ia3"),
])
def test_bad_adapter_settings_get_one_line(kw, words):
    spec = load_model(MODEL)
    with pytest.raises(InvalidSetupError, match=words):
        resolve_setup(TrainSetup(MODEL, **kw), spec)


def test_ia3_needs_targets_where_peft_has_no_default():
    spec = load_model("santacoder")  # gpt_bigcode has peft IA3 defaults; pick a type without: stablelm
    resolve_setup(TrainSetup("santacoder", adapter="ia3"), spec)
    spec = load_model("stablelm-3b-4e1t")
    with pytest.raises(InvalidSetupError, match="no IA3 default targets"):
        resolve_setup(TrainSetup("stablelm-3b-4e1t", adapter="ia3"), spec)
    resolve_setup(TrainSetup("stablelm-3b-4e1t", adapter="ia3", targets="k_proj,v_proj"), spec)


def test_dora_transient_can_be_the_peak():
    """At batch 1 the weight norm of the widest DoRA module (an in x in identity, the dense BA, the weight copy)
    outweighs the logits: the peak moves into forward."""
    est = _est(adapter="dora", targets="all-linear", batch_size=1, seq_len=256, autocast="off")
    assert est.peak_phase == "forward_end"


@pytest.mark.parametrize("adapter, name", [("dora", "DoRA"), ("lora-fa", "LoRA-FA")])
def test_fused_expert_parameters_refuse_dora_and_lora_fa(adapter, name):
    """peft wraps Mixtral's router and fused experts as parameters: DoRA does not run there, and LoRA-FA's frozen A
    has no per-module pair to freeze (before this refusal LoRA-FA's adapter silently vanished from the estimate)."""
    spec = load_model("mixtral-8x7b-v0.1")
    with pytest.raises(InvalidSetupError, match=f"{name} cannot adapt"):
        resolve_setup(TrainSetup("mixtral-8x7b-v0.1", adapter=adapter, targets="all-linear", lora_dropout=0.0), spec)
