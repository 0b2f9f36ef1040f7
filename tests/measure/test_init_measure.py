"""peft's real LoRA initialisation on CPU (memplan.measure.init_measure) against the analytic replay
(memplan.plan.init_phase.init_phase_for with CPU semantics): the tensor-level device peak within 2%, the host
peak exactly, on tiny llama-like and OPT-like models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes', 'safetensors')
pytestmark = [EXTRAS, pytest.mark.filterwarnings("ignore")]

from memplan.catalog.models import spec_from_config  # noqa: E402
from memplan.measure.init_measure import measure_init  # noqa: E402
from memplan.plan.init_phase import init_phase_for  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402

LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
OPT = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2, "ffn_dim": 1024,
       "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 256}


def _spec(cfg):
    return spec_from_config(cfg, name="tiny-init-" + cfg["model_type"])


def _setup(spec, **kw):
    return resolve_setup(TrainSetup(spec.name, rank=8, targets="all-linear", dtype="bf16", **kw), spec)


CASES = [
    (LLAMA, dict(method="lora", bits=16, init="pissa"), 1, None),
    (LLAMA, dict(method="lora", bits=16, init="pissa_niter_4"), 1, None),
    (LLAMA, dict(method="lora", bits=16, init="olora"), 1, None),
    (LLAMA, dict(method="qlora", init="olora"), 1, "kbit_model"),  # peft dequantizes and requantizes
    (LLAMA, dict(method="lora", bits=8, init="olora"), 1, "kbit_model"),
    (LLAMA, dict(method="qlora", init="loftq"), 1, "full_precision"),
    (LLAMA, dict(method="qlora", init="loftq"), 2, "full_precision"),
    (LLAMA, dict(method="qlora", init="loftq"), 1, "kbit_model"),  # replace_lora_weights_loftq
    (OPT, dict(method="lora", bits=16, init="pissa"), 1, None),
    (OPT, dict(method="qlora", init="loftq"), 1, "kbit_model"),
    (OPT, dict(method="qlora", init="loftq"), 2, "full_precision"),
]


@pytest.mark.parametrize("cfg, kw, iters, path", CASES,
                         ids=[f"{c[0]['model_type']}-{c[1]['init']}-{c[1].get('bits', 4)}bit-x{c[2]}-{c[3]}"
                              for c in CASES])
def test_replay_matches_peft(cfg, kw, iters, path):
    spec = _spec(cfg)
    setup = _setup(spec, **kw)
    planned = init_phase_for(spec, setup, path=path, loftq_iter=iters, semantics="cpu")
    got = measure_init(spec, setup, path=path, loftq_iter=iters)
    assert got.path == planned.path_id
    assert planned.tensor_peak_bytes == pytest.approx(got.device_peak_bytes, rel=0.02)
    assert planned.host_peak_bytes == got.host_peak_bytes
    assert got.device_peak_bytes > got.resident_bytes > 0
    assert got.seconds > 0


def test_measurement_to_dict_and_default_refused():
    spec = _spec(LLAMA)
    got = measure_init(spec, _setup(spec, method="lora", bits=16, init="olora"))
    d = got.to_dict()
    assert {"init", "path", "device_peak_bytes", "resident_bytes", "host_peak_bytes", "transient_bytes", "seconds",
            "peak_components", "notes"} <= set(d)
    assert d["transient_bytes"] == got.device_peak_bytes - got.resident_bytes
    with pytest.raises(ValueError, match="default"):
        measure_init(spec, _setup(spec, method="lora", bits=16))
