"""``--activation-offload``: what leaves the card, what the host holds (memplan.plan.offload). The simulation
checks (tests/measure/test_savers_sim.py) pin the same numbers against the real pack/unpack rules."""

from __future__ import annotations

import pytest

from memplan.catalog.models import load_model
from memplan.errors import InvalidSetupError
from memplan.plan import activations as act
from memplan.plan.estimate import estimate, estimate_for
from memplan.plan.offload import kept_per_token
from memplan.plan.setup import TrainSetup, resolve_setup


def _pair(model, **kw):
    spec = load_model(model)
    off = resolve_setup(TrainSetup(model, **kw), spec)
    return spec, off, {m: estimate_for(spec, resolve_setup(TrainSetup(model, activation_offload=m, **kw), spec),
                                       include_runtime=False) for m in ("off", "pinned", "pageable")}


def test_resolve_fills_off_and_refuses_unknown_names():
    spec = load_model("opt-1.3b")
    assert resolve_setup(TrainSetup("opt-1.3b"), spec).activation_offload == "off"
    with pytest.raises(InvalidSetupError, match="invalid activation offload 'cpu'; allowed: off, pinned, pageable"):
        resolve_setup(TrainSetup("opt-1.3b", activation_offload="cpu"), spec)


def test_off_changes_nothing_and_holds_no_host_memory():
    e = estimate(TrainSetup("opt-1.3b", batch_size=2, seq_len=512))
    assert e.host_bytes == {}


def test_llama31_8b_pinned_keeps_the_rmsnorm_fp32_inputs():
    spec, s, est = _pair("llama-3.1-8b", batch_size=4, seq_len=2048, grad_ckpt=False)
    tokens, h, L = 8192, 4096, 32
    # 2 RMSNorms per layer save their fp32 input twice (pow, x * rsqrt): the second save stays on the card.
    # bf16 with fp32 adapters: every LoRA input is its own fp32 cast, so no shared input stays.
    assert kept_per_token(spec, s) == 2 * 4 * h
    # save_on_cpu takes every layer's saved tensors off the card: that difference is L x the layer's bytes
    fwd = {m: est[m].phases["forward_end"]["activations"] for m in est}
    layer = (fwd["off"] - fwd["pageable"]) // L
    assert layer == pytest.approx(act.layer_activations(spec, s).per_token * tokens, rel=1e-3)
    moved = layer - 2 * 4 * h * tokens
    for phase in ("forward_end", "backward_start"):
        assert est["off"].phases[phase]["activations"] - est["pinned"].phases[phase]["activations"] == L * moved
        assert est["pinned"].phases[phase]["logits_loss"] == est["off"].phases[phase]["logits_loss"]
    # in backward only a node or two's tensors are back: within the backward transients' margin
    assert est["off"].phases["backward"]["activations"] - est["pinned"].phases["backward"]["activations"] == L * moved
    # host: every layer's saved tensors, the fp32 log-softmax and the final norm's fp32 input
    assert est["pinned"].host_bytes == {"activation_offload": L * layer + tokens * 128256 * 4 + tokens * h * 4}
    assert est["pageable"].host_bytes["activation_offload"] > est["pinned"].host_bytes["activation_offload"]
    assert est["pageable"].total_bytes < est["pinned"].total_bytes < est["off"].total_bytes


def test_shared_adapter_input_stays_when_nothing_copies_it():
    spec = load_model("llama-3.1-8b")
    base = dict(bits=4, targets="q_proj,k_proj,v_proj,gate_proj,up_proj", lora_dropout=0.0)
    s = resolve_setup(TrainSetup("llama-3.1-8b", **base), spec)
    assert s.upcast_non_quantized and s.adapter_dtype == "fp32" and s.autocast == "bf16"
    # autocast: adapters compute in bf16, the fp32 residual is cast per adapter -> no shared input
    assert kept_per_token(spec, s) == 2 * 4 * 4096
    s = resolve_setup(TrainSetup("llama-3.1-8b", **base, autocast="off"), spec)
    # fp32 residual into fp32 adapters, no dropout: q/k/v read one tensor, gate/up another (4 B each)
    assert kept_per_token(spec, s) == 2 * 4 * 4096 + 2 * 4096 * 4
    s = resolve_setup(TrainSetup("llama-3.1-8b", **{**base, "lora_dropout": 0.1}, autocast="off"), spec)
    assert kept_per_token(spec, s) == 2 * 4 * 4096


def test_layernorm_models_keep_nothing_of_the_layers():
    spec, s, est = _pair("opt-1.3b", batch_size=2, seq_len=512, grad_ckpt=False)
    assert kept_per_token(spec, s) == 0
    assert est["pinned"].phases["forward_end"]["activations"] == est["pageable"].phases["forward_end"]["activations"]


def test_checkpointing_offloads_the_checkpointed_inputs():
    spec, s, est = _pair("llama-3.1-8b", batch_size=4, seq_len=2048, grad_ckpt=True)
    tokens, L = 8192, 32
    ckpt = act.checkpoint_input_per_token(spec, s) * tokens
    for mode in ("pinned", "pageable"):
        assert est["off"].phases["forward_end"]["activations"] - est[mode].phases["forward_end"]["activations"] == \
            L * ckpt
        assert est["off"].phases["backward"]["activations"] - est[mode].phases["backward"]["activations"] == \
            (L - 1) * ckpt
    loss_host = tokens * 128256 * 4
    assert est["pinned"].host_bytes["activation_offload"] == L * ckpt + loss_host + tokens * 4096 * 4
    # save_on_cpu also copies the lm_head's weight and the log-softmax a second time (nll_loss saves it too)
    assert est["pageable"].host_bytes["activation_offload"] == \
        L * ckpt + 2 * loss_host + tokens * 4096 * 4 + 128256 * 4096 * 2
    assert any("checkpointed inputs" in n for n in est["pinned"].notes)
