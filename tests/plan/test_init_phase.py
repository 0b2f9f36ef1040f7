"""The LoRA initialisation phase (memplan.plan.init_phase): validation, the paths peft offers, and the replay's
bookkeeping on catalog models. The replay against peft's real initialisation: tests/measure/test_init_measure.py."""

from __future__ import annotations

import pytest

from memplan.catalog.models import load_model
from memplan.errors import InvalidSetupError
from memplan.plan.init_phase import INITS, InitPhase, init_path_within, init_paths, init_phase_for, resolve_init
from memplan.plan.setup import TrainSetup, resolve_setup

SPEC = load_model("llama-2-7b-hf")
GIB = 1024**3


def _setup(**kw):
    kw.setdefault("rank", 16)
    kw.setdefault("targets", "all-linear")
    return resolve_setup(TrainSetup("llama-2-7b-hf", **kw), SPEC)


def test_inits_and_default():
    assert INITS == ("default", "loftq", "pissa", "olora")
    assert init_phase_for(SPEC, _setup(method="qlora")) is None
    assert init_paths(SPEC, _setup(method="qlora")) == []


@pytest.mark.parametrize("kw, words", [
    (dict(method="full", init="pissa"), "method 'full'"),
    (dict(method="lora", adapter="ia3", init="olora", targets=None), "--adapter ia3"),
    (dict(method="lora", init="svd"), "invalid init 'svd'"),
    (dict(method="lora", init="pissa_niter_0"), "pissa_niter_<q>"),
])
def test_refusals_name_the_value_and_what_is_allowed(kw, words):
    with pytest.raises(InvalidSetupError, match="allowed") as err:
        _setup(**kw)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_vera_refused():
    with pytest.raises(InvalidSetupError, match="--adapter vera has its own"):
        resolve_init(TrainSetup("llama-2-7b-hf", adapter="vera", init="loftq"), SPEC, method="lora", bits=16)
    assert resolve_init(TrainSetup("llama-2-7b-hf", adapter="vera"), SPEC, method="lora", bits=16) == {}


def test_fast_pissa_is_accepted():
    ph = init_phase_for(SPEC, _setup(method="lora", init="pissa_niter_4"))
    full = init_phase_for(SPEC, _setup(method="lora", init="pissa"))
    assert ph.path_id == "full_precision"
    assert ph.gpu_peak_bytes < full.gpu_peak_bytes  # no m x k / k x n factors
    assert ph.seconds_estimate < full.seconds_estimate


def test_paths_offered():
    both = ["kbit_model", "full_precision"]  # the quantized model first: what init_phase_for plans by default
    assert [p.path_id for p in init_paths(SPEC, _setup(method="qlora", init="loftq"))] == both
    assert [p.path_id for p in init_paths(SPEC, _setup(method="qlora", init="olora"))] == both
    assert [p.path_id for p in init_paths(SPEC, _setup(method="lora", bits=8, init="olora"))] == both
    assert [p.path_id for p in init_paths(SPEC, _setup(method="qlora", init="pissa"))] == ["full_precision"]
    assert [p.path_id for p in init_paths(SPEC, _setup(method="lora", bits=8, init="loftq"))] == ["full_precision"]
    with pytest.raises(InvalidSetupError, match="allowed: full_precision"):
        init_phase_for(SPEC, _setup(method="qlora", init="pissa"), path="kbit_model")
    with pytest.raises(InvalidSetupError, match="loftq_iter"):
        init_phase_for(SPEC, _setup(method="qlora", init="loftq"), loftq_iter=0)


def test_llama2_7b_qlora_loftq():
    kbit, full = init_paths(SPEC, _setup(method="qlora", init="loftq"))
    # replace_lora_weights_loftq: the 4-bit model (~3.9 GiB with its fp32 embeddings / lm_head), plus one
    # 11008 x 4096 layer's fp32 copies and SVD factors
    assert 4.5 * GIB < kbit.gpu_peak_bytes < 6 * GIB
    assert kbit.host_peak_bytes == 11008 * 4096 * 2  # the bf16 layer read from safetensors
    # LoftQConfig: the whole bf16 model is resident
    assert 13 * GIB < full.gpu_peak_bytes < 14.5 * GIB
    assert full.host_peak_bytes == 11008 * 4096 * 4  # res.to("cpu") handed to Params4bit
    assert "gate_proj" in kbit.largest_layer and "11008 x 4096" in kbit.largest_layer
    assert kbit.tensor_peak_bytes == kbit.gpu_peak_bytes - 11008 * 4096 * 4  # the cuSOLVER input copy
    two = init_phase_for(SPEC, _setup(method="qlora", init="loftq"), path="full_precision", loftq_iter=2)
    assert two.gpu_peak_bytes > full.gpu_peak_bytes  # the previous iteration's U, S, Vh, L, R stay alive
    assert two.seconds_estimate == pytest.approx(2 * full.seconds_estimate)


def test_components_sum_and_to_dict():
    ph = init_phase_for(SPEC, _setup(method="qlora", init="olora"))
    assert isinstance(ph, InitPhase)
    assert ph.gpu_peak_bytes == sum(ph.gpu_components.values())
    assert all(v >= 0 for v in ph.gpu_components.values())
    d = ph.to_dict()
    assert {"init", "path_id", "path", "gpu_peak_bytes", "gpu_components", "host_peak_bytes", "host_components",
            "tensor_peak_bytes", "largest_layer", "seconds_estimate", "seconds_rule", "loftq_iter", "notes"} <= set(d)
    cuda = init_phase_for(SPEC, _setup(method="qlora", init="loftq"))
    cpu = init_phase_for(SPEC, _setup(method="qlora", init="loftq"), semantics="cpu")
    assert cpu.tensor_peak_bytes == cpu.gpu_peak_bytes < cuda.gpu_peak_bytes  # no cuSOLVER input copy on CPU


def test_peaks_grow_with_the_model():
    small = init_phase_for(load_model("tinyllama-1.1b"), resolve_setup(
        TrainSetup("tinyllama-1.1b", method="qlora", init="loftq", targets="all-linear"), load_model("tinyllama-1.1b")))
    big = init_phase_for(SPEC, _setup(method="qlora", init="loftq"))
    assert small.gpu_peak_bytes < big.gpu_peak_bytes
    assert small.seconds_estimate < big.seconds_estimate


def test_the_path_that_fits_a_card():
    setup = _setup(method="qlora", init="loftq")
    assert init_path_within(SPEC, setup, 8 * GIB).path_id == "kbit_model"  # only replace_lora_weights_loftq
    assert init_path_within(SPEC, setup, 4 * GIB) is None
    assert init_path_within(SPEC, _setup(method="qlora", init="pissa"), 8 * GIB) is None  # needs the 16-bit model
    assert init_path_within(SPEC, _setup(method="qlora"), 80 * GIB) is None  # default init: no phase
