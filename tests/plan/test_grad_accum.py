"""Gradient accumulation (``--grad-accum``, TrainingArguments.gradient_accumulation_steps): from the second
micro-batch on, forward and backward run with every gradient of the earlier ones held."""

from __future__ import annotations

import pytest

from memplan.catalog.models import load_model
from memplan.plan.estimate import estimate, estimate_for
from memplan.plan.setup import TrainSetup, resolve_setup


def _est(model="llama-3.2-1b", **kw):
    spec = load_model(model)
    return estimate_for(spec, resolve_setup(TrainSetup(model=model, autocast="off", **kw), spec), include_runtime=False)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_held_gradients_join_forward_and_backward(method):
    one, four = _est(method=method, grad_accum=1), _est(method=method, grad_accum=4)
    grad_bytes = four.phases["optimizer_step"]["gradients"]
    assert grad_bytes > 0
    assert four.phases["forward_end"]["gradients"] == grad_bytes
    assert one.phases["forward_end"]["gradients"] == 0
    assert sum(four.phases["forward_end"].values()) - sum(one.phases["forward_end"].values()) == grad_bytes
    for phase in ("backward_end", "optimizer_step"):  # the step itself is the same
        assert four.phases[phase] == one.phases[phase]
    # two or sixteen micro-batches: the same peak (the memory of every micro-batch after the first)
    assert _est(method=method, grad_accum=2).total_bytes == _est(method=method, grad_accum=16).total_bytes == \
        four.total_bytes


def test_full_fine_tuning_pays_a_full_gradient_copy():
    one, four = _est(method="full", batch_size=4, seq_len=1024), _est(method="full", batch_size=4, seq_len=1024,
                                                                    grad_accum=4)
    spec = load_model("llama-3.2-1b")
    assert four.total_bytes - one.total_bytes > 0.5 * spec.total_params() * 2  # bf16 grads of the whole model


def test_bad_values_are_one_line():
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="gradient accumulation 0"):
        estimate(TrainSetup(model="opt-125m", grad_accum=0))
    with pytest.raises(InvalidSetupError, match="expected an integer"):
        estimate(TrainSetup(model="opt-125m", grad_accum=2.5))


def test_a_smaller_micro_batch_suggestion_accumulates():
    """The "smaller micro-batch with gradient_accumulation_steps" change is estimated with the gradients held."""
    from memplan.catalog.gpus import load_gpu
    from memplan.plan.budget import Budget
    from memplan.plan.changes import smallest_changes

    spec, gpu = load_model("llama-3.2-1b"), load_gpu("3090")
    setup = resolve_setup(TrainSetup(model="llama-3.2-1b", method="full", batch_size=16, autocast="off"), spec, gpu)
    (micro,) = [c for c in smallest_changes(spec, setup, gpu, Budget.for_gpu(gpu)) if "batch_size" in c.fields]
    b = micro.fields["batch_size"]
    assert micro.fields["grad_accum"] == 16 // b
    assert micro.estimate.total_bytes == estimate_for(spec, resolve_setup(
        setup.with_(batch_size=b, grad_accum=16 // b), spec, gpu), gpu).total_bytes
    assert micro.estimate.components["gradients"] == micro.estimate.phases["optimizer_step"]["gradients"]


@pytest.mark.extras("torch", "transformers", "peft")
@pytest.mark.parametrize("model,kw", [
    ("gpt2", dict(method="full", batch_size=2, seq_len=128, grad_ckpt=True)),
    ("opt-125m", dict(method="lora", targets="all-linear", batch_size=2, seq_len=128)),
])
def test_simulate_holds_exactly_the_gradients_the_estimate_holds(model, kw):
    """Two micro-batches in simulate: its forward peak grows by the gradient bytes, as the estimate's does."""
    from memplan.measure.simulate import simulate

    spec = load_model(model)
    runs = {}
    for ga in (1, 3):
        setup = resolve_setup(TrainSetup(model=model, autocast="off", grad_accum=ga, **kw), spec)
        runs[ga] = (simulate(setup), estimate_for(spec, setup, include_runtime=False))
    sim_growth = runs[3][0].phases["forward_end"] - runs[1][0].phases["forward_end"]
    est_growth = sum(runs[3][1].phases["forward_end"].values()) - sum(runs[1][1].phases["forward_end"].values())
    assert est_growth == runs[3][1].phases["optimizer_step"]["gradients"]
    assert sim_growth == pytest.approx(est_growth, rel=0.01)
    assert runs[3][1].total_bytes == pytest.approx(runs[3][0].total_bytes, rel=0.02)


# ---- before torch 2.0 (rules "zero-grad-keeps-buffers", "optimizer-foreach-default") -------------------------------

def test_before_torch_2_the_trainers_zero_grad_keeps_the_gradients():
    """torch 1.13: zero_grad(set_to_none=False) zeroes in place, so a step runs with every gradient allocated."""
    old = _est(method="full", versions="torch=1.13.1")
    new = _est(method="full", versions="torch=2.1.2")
    grad_bytes = new.phases["optimizer_step"]["gradients"]
    assert old.phases["forward_end"]["gradients"] == grad_bytes
    assert new.phases["forward_end"]["gradients"] == 0
    assert _est(method="full", versions="torch=1.13.1", grad_accum=4).total_bytes == old.total_bytes


def test_a_per_parameter_optimizer_holds_one_tensors_temporaries():
    from memplan.plan.trainable import trainable

    spec = load_model("llama-3.2-1b")
    setup = resolve_setup(TrainSetup(model="llama-3.2-1b", method="full", autocast="off"), spec)
    train = trainable(spec, setup)
    largest = max(t.numel * t.bytes_per_value for t, _ in train.tensors)
    assert largest == 128256 * 2048 * 2  # the (tied) embedding, bf16
    foreach = _est(method="full", optimizer="adamw_torch", versions="torch=2.1.2")
    loop_old_torch = _est(method="full", optimizer="adamw_torch", versions="torch=1.13.1")
    loop_hf = _est(method="full", optimizer="adamw_hf", versions="torch=2.1.2")
    assert foreach.phases["optimizer_step"]["transients"] == train.grad_bytes
    assert loop_old_torch.phases["optimizer_step"]["transients"] == largest
    assert loop_hf.phases["optimizer_step"]["transients"] == largest
    fused = _est(method="full", optimizer="adamw_torch_fused", versions="torch=1.13.1")
    assert fused.phases["optimizer_step"]["transients"] == 0
