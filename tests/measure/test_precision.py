"""The analytic estimate in every precision regime (memplan.plan.precision), held to the simulation, which runs
the real step under CUDA's autocast policy (memplan.measure.autocast)."""

from __future__ import annotations

import os

import pytest

from tests.extras import require

pytestmark = require("torch", "transformers", "peft", "bitsandbytes")

from memplan.catalog.gpus import load_gpu  # noqa: E402
from memplan.catalog.models import load_model  # noqa: E402
from memplan.measure.simulate import simulate_for  # noqa: E402
from memplan.plan.estimate import estimate_for  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402

# The regimes a training script runs in (README, "Precision"): weights' dtype x autocast x k-bit preparation.
REGIMES = {
    "16-bit, no autocast": dict(bits=16, autocast="off"),
    "16-bit under autocast": dict(bits=16, autocast="bf16"),
    "fp32 master weights under autocast": dict(bits=32, dtype="bf16", autocast="bf16"),
    "k-bit prepared, no autocast": dict(method="qlora", bits=4, autocast="off"),
    "k-bit prepared under autocast": dict(method="qlora", bits=4, autocast="bf16"),
    "k-bit unprepared under autocast": dict(method="qlora", bits=4, upcast_non_quantized=False, autocast="bf16"),
}


# qwen2.5-0.5b (a grouped-query rotary model at real width) takes a minute and a half over the 16 cases; the
# committed validation grid (reports/validation_matrix.csv, tests/measure/test_validate.py) holds every regime on
# Qwen2.5-1.5B: it runs with MEMPLAN_FULL=1, as the other whole-catalog checks do with MEMPLAN_DERIVED_ALL=1
FULL = pytest.mark.skipif(not os.environ.get("MEMPLAN_FULL"), reason="qwen2.5-0.5b in every regime: MEMPLAN_FULL=1")


@pytest.mark.parametrize("model", ["opt-125m", "gpt2", pytest.param("qwen2.5-0.5b", marks=(pytest.mark.slow, FULL))])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_analytic_is_within_one_percent_of_the_simulation(model, regime, ckpt):
    """Measured when this was written (batch 2 x 256 tokens, r16 all-linear, bf16): 0.998-1.003 over opt-1.3b,
    llama-3.2-1b, gpt2-medium and qwen2.5-0.5b in every regime, where ignoring autocast was off by up to 19%."""
    spec, gpu = load_model(model), load_gpu("a100")
    setup = resolve_setup(TrainSetup(model, rank=16, targets="all-linear", batch_size=2, seq_len=128, grad_ckpt=ckpt,
                                     **REGIMES[regime]), spec, gpu)
    est = estimate_for(spec, setup, gpu, include_runtime=False)
    sim = simulate_for(spec, setup, gpu)
    assert est.total_bytes / sim.total_bytes == pytest.approx(1.0, abs=0.01), (est.components, sim.components)
    assert est.peak_phase == sim.peak_phase


def test_autocast_changes_what_a_qlora_step_keeps():
    """Under autocast a QLoRA step's fp32 q/k/v go to SDPA as bf16 (flash, no seq x seq probabilities) and the
    fp32 lm_head is cast for its matmul: the cast is saved for backward."""
    from memplan.plan.activations import attention_kernel

    spec, gpu = load_model("qwen2.5-0.5b"), load_gpu("a100")
    base = dict(method="qlora", bits=4, rank=16, targets="all-linear", batch_size=1, seq_len=1024, grad_ckpt=True)
    off_setup, on_setup = (resolve_setup(TrainSetup("qwen2.5-0.5b", autocast=a, **base), spec, gpu)
                           for a in ("off", "bf16"))
    # fp32 grouped-query attention has no flash kernel and the memory-efficient one refuses GQA: math
    assert (attention_kernel(spec, off_setup), attention_kernel(spec, on_setup)) == ("math", "flash")
    off, on = estimate_for(spec, off_setup, gpu), estimate_for(spec, on_setup, gpu)
    lm_head_copy = spec.vocab_size * spec.hidden_size * 2
    assert on.components["activations"] - off.components["activations"] >= lm_head_copy * 0.9
