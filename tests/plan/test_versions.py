"""``--versions``: the library stack a plan assumes (memplan.plan.versions) and the rules that change its numbers
(memplan.plan.stack_effects). Expected bytes are derived from the model configs in the comments."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memplan.catalog.models import load_model
from memplan.cli import main
from memplan.errors import InvalidSetupError
from memplan.plan import versions as v
from memplan.plan.activations import attention_kernel
from memplan.plan.estimate import estimate, estimate_for
from memplan.plan.setup import TrainSetup, resolve_setup
from memplan.plan.versions import NEWEST_KNOWN, PACKAGES, RULES, parse_versions, resolve_versions, stack_of

ROOT = Path(__file__).resolve().parents[2]
MIXTRAL = json.loads((ROOT / "profiles" / "models" / "mixtral-8x7b-v0.1.json").read_text())["config"]


def _est(model, **kw):
    return estimate(TrainSetup(model, **kw))


# ---- parsing ---------------------------------------------------------------------------------------------------

def test_parse_any_subset_and_local_labels():
    assert parse_versions("transformers=4.48.3,peft=0.14.0,bitsandbytes=0.45.2,torch=2.5.1") == {
        "transformers": "4.48.3", "peft": "0.14.0", "bitsandbytes": "0.45.2", "torch": "2.5.1"}
    assert parse_versions(" Torch==2.13.0+cu128 ") == {"torch": "2.13.0"}
    full = resolve_versions("transformers=4.48.3")
    assert full.startswith("transformers=4.48.3,peft=") and full.count("=") == 4
    assert stack_of(full).transformers == "4.48.3" and stack_of(full).release("transformers") == (4, 48, 3)
    assert v.parse_version("0.41.3.post2") == (0, 41, 3) and v.parse_version("4.48") == (4, 48, 0)


@pytest.mark.parametrize("text, message", [
    ("transformer=4.48.3", r"unknown package 'transformer' in versions \(did you mean: transformers\?\); allowed: "),
    ("transformers=four", r"invalid transformers version 'four'; expected a release such as 5.24.0"),
    ("transformers", r"invalid versions item 'transformers'; expected package=version"),
    ("peft=0.14.0,peft=0.15.0", r"peft given twice in versions \(0.14.0 and 0.15.0\)"),
    (",", r"empty versions"),
])
def test_bad_versions_name_the_value_and_what_is_allowed(text, message):
    with pytest.raises(InvalidSetupError, match=message):
        parse_versions(text)
    with pytest.raises(InvalidSetupError, match=message):  # the same error through a setup
        _est("opt-125m", versions=text)


def test_versions_older_than_the_rules_are_planned_with_the_oldest_and_said():
    e = _est("llama-2-7b-hf", method="qlora", versions="bitsandbytes=0.39.0,torch=2.1.0")
    assert any(n.startswith("bitsandbytes 0.39.0, torch 2.1.0: older than the releases memplan's version rules "
                            "were read against (bitsandbytes 0.41.0, torch 2.4.0)") for n in e.notes)


def test_older_bitsandbytes_4bit_saves_each_layers_input():
    spec = load_model("llama-3.2-1b")
    kw = dict(method="qlora", grad_ckpt=False, autocast="off")
    old = estimate_for(spec, resolve_setup(TrainSetup("llama-3.2-1b", versions="bitsandbytes=0.42.0", **kw), spec))
    new = estimate_for(spec, resolve_setup(TrainSetup("llama-3.2-1b", versions="bitsandbytes=0.43.3", **kw), spec))
    # the fp32 stream (k-bit upcast): each Linear4bit saves its own bf16 cast of its input, 2 B per input feature
    per_layer = 2 * sum(lin.in_features for lin in spec.layer_linears)
    assert (old.phases["forward_end"]["activations"] - new.phases["forward_end"]["activations"]
            == spec.num_layers * 512 * per_layer)


def test_bad_versions_are_one_line_on_the_command_line(capsys):
    assert main(["estimate", "opt-125m", "--versions", "pytorch=2.5.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown package 'pytorch'" in err and "torch" in err


@pytest.fixture
def installed(monkeypatch):
    """Pretend these packages are installed (the resolution caches are cleared before and after)."""
    def use(stack: dict):
        monkeypatch.setattr(v, "installed_stack", lambda: stack)
        v.resolve_versions.cache_clear()
        v.stack_of.cache_clear()
    yield use
    v.resolve_versions.cache_clear()
    v.stack_of.cache_clear()


def test_default_is_installed_else_newest(installed):
    installed({"transformers": "4.48.3", "peft": None, "bitsandbytes": "unknown", "torch": "2.13.0+cpu"})
    s = v.default_stack()
    # installed where it is (and its version reads); peft not installed, bitsandbytes unreadable: the newest known
    assert (s.transformers, s.peft, s.bitsandbytes, s.torch) == ("4.48.3", NEWEST_KNOWN.peft,
                                                                 NEWEST_KNOWN.bitsandbytes, "2.13.0")
    assert v.describe_versions(s.text).endswith(", torch 2.13.0 (transformers installed)")
    assert v.describe_versions("peft=0.14.0").endswith("(transformers installed; peft given)")
    assert v.describe_versions(NEWEST_KNOWN.text) == ("transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2, "
                                                       "torch 2.13.0")


def test_installed_versions_are_read_without_importing(tmp_path):
    (tmp_path / "transformers-4.48.3.dist-info").mkdir()
    (tmp_path / "Torch-2.13.0+cpu.dist-info").mkdir()
    (tmp_path / "bitsandbytes-0.45.2.dist-info").mkdir()
    found = v._dist_versions((str(tmp_path),))
    assert found == {"transformers": "4.48.3", "torch": "2.13.0+cpu", "bitsandbytes": "0.45.2"}


# ---- the rules table ----------------------------------------------------------------------------------------------

def test_every_rule_has_a_range_a_citation_and_says_what_memplan_does():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    cited = re.compile(r"\b\d+\.\d+(\.\d+)? \S+\.(py|h):\d+")  # "4.48.3 models/.../modeling_mixtral.py:67"
    for r in RULES:
        assert r.package in PACKAGES, r.name
        assert r.effect and len(r.effect) > 40, r.name
        assert cited.search(r.citation), (r.name, r.citation)
        assert r.memplan.startswith((v.WIRED, v.NO_EFFECT)), r.name
        oldest = v.parse_version(getattr(v.OLDEST_MODELLED, r.package))
        read = [v.parse_version(m.group(0)) for m in re.finditer(r"\b\d+\.\d+\.\d+\b", r.citation)]
        for bound in (r.since, r.until):
            # a bound below the oldest modelled release must have been read on both of its sides
            assert bound is None or v.parse_version(bound) >= oldest or (
                min(read) < v.parse_version(bound) <= max(read)), r.name
        assert r.range_text.count(r.package) == 1
    # at least one rule per package, and the ones the issue names
    assert {r.package for r in RULES} == set(PACKAGES)
    for needed in ("moe-experts-as-linears", "logits-fp32-in-forward", "kbit-prepare-casts",
                   "int8-saves-transposed-input", "linear4bit-output-dtype", "causal-lm-loss-shift-copy",
                   "sdpa-native-gqa"):
        assert needed in names


def test_rule_ranges_apply_by_release():
    old, new = stack_of("transformers=4.48.3"), stack_of("transformers=5.23.0")
    assert v.applies("moe-experts-as-linears", old, "mixtral") and not v.applies("moe-experts-as-linears", new,
                                                                                 "mixtral")
    assert not v.applies("moe-experts-as-linears", old, "llama")  # an architecture rule
    assert v.applies("causal-lm-loss-shift-copy", old) and not v.applies("causal-lm-loss-shift-copy", new)


# ---- MoE experts: quantized on transformers 4, left float (and upcast) on 5 ----------------------------------------

def test_mixtral_qlora_quantizes_the_experts_on_transformers_4_only():
    e4 = _est("mixtral-8x7b-v0.1", method="qlora", versions="transformers=4.48.3")
    e5 = _est("mixtral-8x7b-v0.1", method="qlora", versions="transformers=5.23.0")
    c = MIXTRAL
    layers, experts, h, ffn = (c["num_hidden_layers"], c["num_local_experts"], c["hidden_size"],
                               c["intermediate_size"])
    expert_values = layers * experts * 3 * h * ffn  # w1, w3 (h -> ffn) and w2 (ffn -> h) per expert
    router_values = layers * h * experts  # the router: an nn.Linear on 4.x, a bare parameter on 5.x
    # 5.x holds both in fp32 (prepare_model_for_kbit_training's upcast); 4.x quantizes both
    assert e5.components["weights"] - e4.components["weights"] == (expert_values + router_values) * 4
    # 4 bits: half a byte per value; each expert weight (4096 x 14336 / 2 B) is already a multiple of 512 B
    quantized = expert_values + router_values
    assert e4.components["quantized_weights"] - e5.components["quantized_weights"] == quantized // 2
    assert e4.params.quantized - e5.params.quantized == expert_values + router_values
    assert e4.params.total == e5.params.total  # the same values, other tensors
    assert e5.total_bytes > 6 * e4.total_bytes
    why = [n for n in e5.notes if "3-D parameters" in n]
    assert len(why) == 1 and "bitsandbytes does not quantize" in why[0] and "GiB" in why[0]
    assert f"{expert_values:,} values" in why[0]
    assert not any("3-D parameters" in n for n in e4.notes)


def test_mixtral_lora_targets_are_modules_on_transformers_4():
    # 4.x: w1/w2/w3 are nn.Linear modules, so LoRA dropout is allowed on them (5.x: target_parameters refuse it)
    e4 = _est("mixtral-8x7b-v0.1", targets="w1,w2,w3", lora_dropout=0.05, versions="transformers=4.48.3")
    c = MIXTRAL
    r = 8  # peft's default rank, memplan's default
    per_expert = r * (c["hidden_size"] + c["intermediate_size"])  # lora_A (r x in) + lora_B (out x r)
    assert e4.params.trainable == c["num_hidden_layers"] * c["num_local_experts"] * 3 * per_expert
    with pytest.raises(InvalidSetupError, match="lora-dropout 0"):
        _est("mixtral-8x7b-v0.1", targets="w1,w2,w3", lora_dropout=0.05, versions="transformers=5.23.0")


def test_fit_tells_a_transformers_5_user_what_the_experts_cost(capsys):
    assert main(["fit", "mixtral-8x7b-v0.1", "--gpu", "a100-80gb", "--versions", "transformers=5.23.0"]) == 1
    out = " ".join(capsys.readouterr().out.split())  # (rich wraps at the terminal width)
    assert "versions: transformers 5.23.0" in out
    assert re.search(r"note: at 4 bits \(QLoRA, [\d.]+ GiB in all for this plan\): transformers 5.23.0 fuses", out)
    assert main(["fit", "mixtral-8x7b-v0.1", "--gpu", "a100-80gb", "--versions", "transformers=4.48.3"]) == 0
    out = capsys.readouterr().out
    assert "Recommended" in out and "3-D parameters" not in out


# ---- the other rules that change numbers ------------------------------------------------------------------------

def _llama(versions, **kw):
    spec = load_model("llama-3.2-1b")
    return spec, estimate_for(spec, resolve_setup(TrainSetup("llama-3.2-1b", versions=versions, **kw), spec))


def test_logits_upcast_in_forward_and_the_shifted_copy():
    vocab = load_model("llama-3.2-1b").vocab_size
    for batch, seq in ((1, 512), (2, 256)):
        tv = batch * seq * vocab
        _, old = _llama("transformers=4.45.2", batch_size=batch, seq_len=seq)
        _, mid = _llama("transformers=4.48.3", batch_size=batch, seq_len=seq)
        _, new = _llama("transformers=5.23.0", batch_size=batch, seq_len=seq)
        # 5.x (padded labels): bf16 logits under autocast + fp32 copy + fp32 log-softmax = 10 B
        assert new.phases["forward_end"]["logits_loss"] == 10 * tv
        # 4.46-4.48: + the fp32 shifted copy, a copy only for batch > 1 (a batch of one stays contiguous)
        assert mid.phases["forward_end"]["logits_loss"] == (14 if batch > 1 else 10) * tv
        # < 4.46: the 16-bit logits die at .float(): fp32 logits + log-softmax (+ the shifted copy)
        assert old.phases["forward_end"]["logits_loss"] == (12 if batch > 1 else 8) * tv
        assert old.phases["backward_start"]["logits_loss"] == new.phases["backward_start"]["logits_loss"] == 12 * tv


def test_loss_in_the_logits_dtype_before_4_48():
    spec = load_model("opt-125m")
    tv = 512 * spec.vocab_size
    e = estimate_for(spec, resolve_setup(TrainSetup("opt-125m", autocast="off", attn="eager",
                                                    versions="transformers=4.47.1"), spec))
    assert e.phases["forward_end"]["logits_loss"] == 2 * 2 * tv  # bf16 logits + bf16 log-softmax (batch 1)
    assert e.phases["backward_start"]["logits_loss"] == 3 * 2 * tv


def test_adapters_take_the_base_dtype_before_peft_0_12():
    _, old = _llama("peft=0.11.1")
    _, new = _llama("peft=0.12.0")
    assert old.setup.adapter_dtype == "bf16" and new.setup.adapter_dtype == "fp32"
    assert 2 * old.components["lora_params"] == new.components["lora_params"]
    _, qlora = _llama("peft=0.11.1", method="qlora")
    assert qlora.setup.adapter_dtype == "fp32"  # a 4-bit layer's weight is not a float: peft keeps fp32
    _, pinned = _llama("peft=0.11.1", adapter_dtype="fp32")
    assert pinned.components["lora_params"] == new.components["lora_params"]


def test_older_bitsandbytes_int8_saves_a_transposed_int8_copy_of_each_input():
    spec = load_model("llama-3.2-1b")
    kw = dict(bits=8, grad_ckpt=False, batch_size=1, seq_len=512)
    old = estimate_for(spec, resolve_setup(TrainSetup("llama-3.2-1b", versions="bitsandbytes=0.44.1", **kw), spec))
    new = estimate_for(spec, resolve_setup(TrainSetup("llama-3.2-1b", versions="bitsandbytes=0.45.2", **kw), spec))
    per_layer = sum(lin.in_features for lin in spec.layer_linears)  # CAt: 1 B per input feature per module
    assert (old.phases["forward_end"]["activations"] - new.phases["forward_end"]["activations"]
            == spec.num_layers * 512 * per_layer)


def test_repeated_kv_before_transformers_4_54_or_torch_2_5():
    spec = load_model("llama-3.2-1b")  # grouped-query (32 heads, 8 kv heads)
    kw = dict(method="qlora", autocast="off", grad_ckpt=False, seq_len=1024)
    kernels = {}
    for text in ("transformers=5.23.0", "transformers=4.53.3", "transformers=5.23.0,torch=2.4.1"):
        s = resolve_setup(TrainSetup("llama-3.2-1b", versions=text, **kw), spec)
        kernels[text] = attention_kernel(spec, s)
    # the fp32 stream with native GQA: the math kernel; with k/v repeated by transformers: memory-efficient
    assert kernels == {"transformers=5.23.0": "math", "transformers=4.53.3": "flash",
                       "transformers=5.23.0,torch=2.4.1": "flash"}
    _, new = _llama("transformers=5.23.0", **kw)
    _, old = _llama("transformers=4.53.3", **kw)
    assert new.total_bytes > 1.2 * old.total_bytes  # seq x seq fp32 probabilities per layer


def test_sdpa_support_by_release():
    assert _est("opt-125m", versions="transformers=4.45.2").setup.attn == "eager"
    assert _est("opt-125m", versions="transformers=4.46.3").setup.attn == "sdpa"
    with pytest.raises(InvalidSetupError, match="do not support sdpa attention in transformers 4.45.2"):
        _est("opt-125m", attn="sdpa", versions="transformers=4.45.2")


def test_falcon_linear_is_quantized_before_transformers_5_5():
    before = _est("falcon-7b", method="qlora", versions="transformers=5.4.0")
    after = _est("falcon-7b", method="qlora", versions="transformers=5.5.0")
    assert after.params.quantized == 0 and before.params.quantized > 0.9 * before.params.total


# ---- where the versions are shown and refused ---------------------------------------------------------------------

def test_versions_are_printed_and_in_the_json(capsys):
    assert main(["estimate", "opt-125m"]) == 0
    assert f"versions: {v.describe_versions(None)}".split(" (")[0] in capsys.readouterr().out.replace("\n", " ")
    assert main(["estimate", "opt-125m", "--json", "--versions", "peft=0.14.0"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["setup"]["versions"] == resolve_versions("peft=0.14.0")
    assert "peft=0.14.0" in d["setup"]["versions"]


def test_preflight_uses_the_live_versions():
    from memplan.integrations.preflight import check

    with pytest.raises(InvalidSetupError, match="installed here"):
        check("opt-125m", gpu="3090", versions="transformers=4.48.3")
    c = check("opt-125m", gpu="3090")
    assert c.estimate.setup.versions == resolve_versions(None)
    assert any(n.startswith("library versions: ") for n in c.estimate.notes)


def test_simulate_refuses_a_stack_other_than_the_installed_one(installed):
    installed({"transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": None, "torch": "2.13.0+cpu"})
    v.check_installed("bitsandbytes=0.45.2", "memplan simulate")  # not installed: nothing to contradict
    with pytest.raises(InvalidSetupError, match=r"memplan simulate runs the libraries installed here, not "
                                                r"transformers 4.48.3 \(installed: 5.24.0\)"):
        v.check_installed("transformers=4.48.3", "memplan simulate")


def test_capacity_rows_plan_for_the_given_stack(capsys):
    from memplan.reports.capacity import capacity_rows

    rows = capacity_rows(["mixtral-8x7b-v0.1"], ["a100-80gb"], [512], versions="transformers=4.48.3")
    assert rows[0].versions == resolve_versions("transformers=4.48.3") and rows[0].bits == 4
    rows = capacity_rows(["mixtral-8x7b-v0.1"], ["a100-80gb"], [512], versions="transformers=5.23.0")
    assert rows[0].status == "no-fit"
    assert main(["report", "capacity", "--models", "opt-125m", "--versions", "torch"]) == 2
    assert "invalid versions item 'torch'" in capsys.readouterr().err
