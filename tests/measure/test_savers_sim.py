"""The two savers against ``memplan simulate``: the chunked loss (memplan.measure.loss_sim) and activation offloading
(memplan.measure.offload_sim) run for real on fake tensors, compared with memplan.plan.loss / memplan.plan.offload.
Liger's kernel needs Triton: simulate refuses it (tests/plan/test_loss.py pins its chunking from the source)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes')
pytestmark = [EXTRAS, pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")]

from memplan.catalog.models import spec_from_config  # noqa: E402
from memplan.errors import InvalidSetupError  # noqa: E402
from memplan.measure.simulate import simulate_for  # noqa: E402
from memplan.plan.estimate import estimate_for  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402

LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY = {
    "llama": LLAMA,
    "gemma2": {**LLAMA, "model_type": "gemma2", "head_dim": 32},  # final logit soft-capping
    "opt": {"model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128,
            "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 64},
}
# Deep enough that TRL's 5-tensor forward stash is a small part of what is offloaded, wide enough that tensors
# pass its 1,024-byte minimum (docs: "Activation offloading")
DEEP_LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2}


def _both(spec, **kw):
    s = resolve_setup(TrainSetup(spec.name, **{"batch_size": 2, "seq_len": 256, **kw}), spec)
    return estimate_for(spec, s, include_runtime=False), simulate_for(spec, s)


def _host(sim) -> int:
    notes = [n for n in sim.notes if "host memory at most" in n]
    return int(notes[0].split(" B ")[0].split(": ")[1].replace(",", "")) if notes else 0


def test_simulate_refuses_liger_with_the_reason():
    spec = spec_from_config(LLAMA, name="tiny-llama")
    s = resolve_setup(TrainSetup(spec.name, loss="liger"), spec)
    with pytest.raises(InvalidSetupError, match="cannot be simulated: .*Triton"):
        simulate_for(spec, s)


@pytest.mark.parametrize("model_type, kw", [("llama", {}), ("gemma2", {}), ("opt", {}),
                                            ("llama", {"grad_ckpt": True}), ("llama", {"bits": 4})])
def test_chunked_loss_matches_the_simulation(model_type, kw):
    spec = spec_from_config(TINY[model_type], name=f"tiny-{model_type}")
    est, sim = _both(spec, loss="chunked", **kw)
    for phase in ("forward_end", "backward_start"):
        # the logits and loss tensors, phase by phase (QLoRA under autocast: the per-chunk casts of the fp32
        # lm_head have the hidden size as last dimension, so the tracker files them under activations)
        modelled = est.phases[phase]["logits_loss"]
        traced = sim.phase_components[phase]["logits_loss"]
        if kw.get("bits") == 4:
            modelled -= 7 * spec.vocab_size * spec.hidden_size * 2
        assert modelled == pytest.approx(traced, rel=0.02), phase
    base_est, base_sim = _both(spec, **kw)
    # the phases the loss shapes, whole: as close as with transformers' own loss (the rest of the model is the same;
    # at this size the estimate's backward phase is loose, so the peak phase can change with the loss)
    for phase in ("forward_end", "backward_start"):
        ratio = sum(est.phases[phase].values()) / sim.phases[phase]
        assert ratio == pytest.approx(sum(base_est.phases[phase].values()) / base_sim.phases[phase], rel=0.02), phase
    assert sim.total_bytes <= base_sim.total_bytes


@pytest.fixture(scope="module")
def deep():
    spec = spec_from_config(DEEP_LLAMA, name="deep-llama")
    return spec, {kw: _both(spec, **dict(kw)) for kw in (
        (), (("activation_offload", "pinned"),), (("activation_offload", "pageable"),), (("grad_ckpt", True),),
        (("grad_ckpt", True), ("activation_offload", "pinned")))}


@pytest.mark.parametrize("mode", ["pinned", "pageable"])
def test_offload_saving_and_host_bytes_match_the_simulation(deep, mode):
    _spec, runs = deep
    (e0, s0), (e, s) = runs[()], runs[(("activation_offload", mode),)]
    # what leaves the card at the start of backward (the peak of both): within 5% of the simulated saving
    saved_est = sum(e0.phases["backward_start"].values()) - sum(e.phases["backward_start"].values())
    saved_sim = s0.phases["backward_start"] - s.phases["backward_start"]
    assert saved_est == pytest.approx(saved_sim, rel=0.05 if mode == "pinned" else 0.03)
    assert e.phases["backward_start"]["logits_loss"] == e0.phases["backward_start"]["logits_loss"]
    assert e.host_bytes["activation_offload"] == pytest.approx(_host(s), rel=0.02)
    assert e.total_bytes / s.total_bytes == pytest.approx(e0.total_bytes / s0.total_bytes, rel=0.05)


def test_offload_with_checkpointing_moves_the_checkpointed_inputs(deep):
    _spec, runs = deep
    (e0, s0), (e, s) = runs[(("grad_ckpt", True),)], runs[(("grad_ckpt", True), ("activation_offload", "pinned"))]
    assert e.host_bytes["activation_offload"] == pytest.approx(_host(s), rel=0.01)
    assert e.total_bytes / s.total_bytes == pytest.approx(e0.total_bytes / s0.total_bytes, rel=0.02)
    assert s.total_bytes < s0.total_bytes
