"""The adapter variants (memplan.plan.adapters) against the real peft modules, simulated: DoRA, LoRA-FA, IA3,
modules_to_save and trainable tokens. Each variant's cost over plain LoRA must agree with the simulation, and the
total within 2%, on a 4-layer grouped-query llama (h=1024) that is small enough to simulate in about a second."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes')
pytestmark = [EXTRAS, pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")]

from memplan.catalog.models import spec_from_config  # noqa: E402
from memplan.measure.simulate import simulate_for  # noqa: E402
from memplan.measure.tiny_configs import tiny_config  # noqa: E402
from memplan.plan.estimate import estimate_for  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402


def _spec(tied: bool = False):
    cfg = tiny_config("llama", hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=128, vocab_size=4096, num_hidden_layers=4, tie_word_embeddings=tied)
    return spec_from_config(cfg, name="mid-llama-tied" if tied else "mid-llama")


def _both(spec, **kw):
    setup = resolve_setup(TrainSetup(spec.name, seq_len=512, **kw), spec)
    return estimate_for(spec, setup, include_runtime=False), simulate_for(spec, setup)


CASES = [
    {"adapter": "dora"},
    {"adapter": "dora", "lora_dropout": 0.0},
    {"adapter": "dora", "autocast": "off", "targets": "all-linear"},
    {"adapter": "dora", "grad_ckpt": True},
    {"adapter": "lora-fa", "targets": "all-linear", "rank": 64},
    {"adapter": "ia3"},
    {"modules_to_save": "lm_head"},
    {"modules_to_save": "embed_tokens"},
    {"trainable_tokens": 16},
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_variant_cost_matches_the_simulation(kw):
    spec = _spec()
    base_kw = {k: v for k, v in kw.items() if k in ("bits", "autocast", "targets", "grad_ckpt", "rank")}
    est0, sim0 = _both(spec, **base_kw)
    est, sim = _both(spec, **kw)
    assert abs(est.total_bytes / sim.total_bytes - 1) < 0.02, (est.total_bytes, sim.total_bytes)
    est_cost, sim_cost = est.total_bytes - est0.total_bytes, sim.total_bytes - sim0.total_bytes
    # the variant's own cost over plain LoRA: within 5% of it, or 1% of the whole peak when it is small. A trainable
    # embedding makes the first layer's input require grad, which the plain-LoRA estimate already assumes (an
    # upper bound): there the cost shows in the simulation only, and 2% of the peak is allowed.
    # Under checkpointing the plain estimate's backward phase is itself an upper bound (the whole recomputed layer
    # with the layer's gradient temporaries), which DoRA's recomputed weight norm then tops: 2% there too.
    slack = 0.02 if ("modules_to_save" in kw or "trainable_tokens" in kw or kw.get("grad_ckpt")) else 0.01
    assert abs(est_cost - sim_cost) <= max(0.05 * abs(sim_cost), slack * sim.total_bytes), (est_cost, sim_cost)
    for comp in ("lora_params", "optimizer_state"):  # what trains is exact
        assert est.components[comp] == sim.components[comp], comp


@pytest.mark.parametrize("kw", [{"modules_to_save": "lm_head"}, {"trainable_tokens": 16}])
def test_tied_embeddings(kw):
    """A tied lm_head: peft wraps the module that shares the embedding; the copy (or the token rows) trains alone."""
    est, sim = _both(_spec(tied=True), **kw)
    assert abs(est.total_bytes / sim.total_bytes - 1) < 0.02
    assert est.components["lora_params"] == sim.components["lora_params"]
