"""The traced estimate (memplan.measure.simulate / tracker / build) against real runs.

The anchor: a fake-tensor simulation with CPU semantics must equal a REAL CPU training run of the same setup
under the same tracker, to the byte -- total peak, per-phase peaks and per-step peaks -- for tiny models
(docs/memory-model.md, "Exact measurement", shows this for OPT; here it is kept true for fp32/bf16, gradient
checkpointing, LoRA, QLoRA NF4 + double quant through real bitsandbytes, AdamW and a bnb 8-bit optimizer,
and a grouped-query llama). CUDA semantics cannot be checked without a GPU; it is checked for the direction
of its changes and against the OPT-13B numbers of docs/memory-model.md ("Base weights", "Activations").
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes')
import torch  # noqa: E402

import torch.nn.functional as F  # noqa: E402

# peft's prepare_model_for_kbit_training calls checkpoint without use_reentrant, as a user's script does
pytestmark = [EXTRAS, pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")]

from memplan.measure.build import build_training_model  # noqa: E402
from memplan.measure.optimizer import make_optimizer  # noqa: E402
from memplan.measure.recorder import StepRecorder  # noqa: E402
from memplan.measure.autocast import autocast_for  # noqa: E402
from memplan.measure.step import run_steps  # noqa: E402
from memplan.plan.estimate import COMPONENTS, PHASES  # noqa: E402
from memplan.catalog.models import load_model, spec_from_config  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402
from memplan.measure.simulate import simulate, simulate_for  # noqa: E402
from memplan.measure.tracker import MemoryTracker  # noqa: E402

# docs/memory-model.md, "Exact measurement": OPT h=256, L=4, V=1000
TINY_OPT = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4, "ffn_dim": 1024,
            "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 256}
# grouped-query attention (4 query heads share 2 k/v heads), rotary, RMSNorm, SwiGLU
TINY_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


# one small config per supported model_type (the catalog's architectures)
TINY = {
    "opt": {**TINY_OPT, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "word_embed_proj_dim": 16,
            "do_layer_norm_before": False},
    "llama": TINY_LLAMA,
    "mistral": {**TINY_LLAMA, "model_type": "mistral"},
    "mixtral": {"model_type": "mixtral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                "num_local_experts": 4, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4},
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2", "tie_word_embeddings": True},
    "gemma2": {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 32},
    "phi": {**TINY_LLAMA, "model_type": "phi", "num_key_value_heads": 4},
    "phi3": {**TINY_LLAMA, "model_type": "phi3", "pad_token_id": 0, "eos_token_id": 0},
    "falcon": {"model_type": "falcon", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4},
    "gpt2": {"model_type": "gpt2", "vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
             "bos_token_id": 0, "eos_token_id": 0},
    "bloom": {"model_type": "bloom", "vocab_size": 1000, "hidden_size": 64, "n_layer": 2, "n_head": 4},
    "stablelm": {**TINY_LLAMA, "model_type": "stablelm"},
    "bert": {"model_type": "bert", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4,
                    "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0},
}


@pytest.fixture(scope="module")
def opt_spec():
    return spec_from_config(TINY_OPT, name="tiny-opt")


@pytest.fixture(scope="module")
def llama_spec():
    return spec_from_config(TINY_LLAMA, name="tiny-llama")


def _resolve(spec, **kw):
    kw = {"batch_size": 2, "seq_len": 64, "targets": "q_proj,v_proj", **kw}
    return resolve_setup(TrainSetup(spec.name, **kw), spec)


def _real_run(spec, setup, steps: int = 2):
    """What a training script does on real CPU tensors, under the same tracker."""
    torch.manual_seed(0)
    model, _ = build_training_model(spec, setup, fake=False, device="cpu")
    rec = StepRecorder(vocab_size=spec.vocab_size)
    rec.register_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(setup, trainable)
    rec.watch(trainable, opt)
    with rec:
        run_steps(model, opt, rec, spec, setup, steps=steps, autocast=autocast_for(setup, "cpu"))
    return rec.tracker.result()


# --------------------------------------------------------------------------------------------------------------
# the tracker on its own


def test_tracker_counts_storages_once_and_frees_them():
    trk = MemoryTracker()
    w = torch.zeros(10, 10)  # 400 bytes, made before tracking
    trk.register(w, "weights")
    trk.register(w[:5], "weights")  # a view: same storage, counted once
    with trk:
        with trk.phase("forward"):
            a = w * 2  # 400
            b = a.view(100)  # no new storage
            c = torch.ones(25)  # 100
            del c
        with trk.phase("backward"), torch.no_grad():  # the autograd engine runs backward with grad mode off
            d = torch.ones(50)  # 200
    res = trk.result()
    assert res.phase_peaks == {"load": 400, "forward": 900, "backward": 1000}
    assert res.peak_bytes == res.final_bytes == 1000 and res.peak_phase == "backward"
    assert res.peak_components["weights"] == 400
    assert res.peak_components["activations"] == 400  # made in forward, still alive
    assert res.peak_components["transients"] == 200  # made in backward
    assert sum(res.peak_components.values()) == res.peak_bytes
    del a, b, d


def test_tracker_round_to_and_exclude():
    trk = MemoryTracker(round_to=512)
    with trk:
        with trk.phase("forward"):
            x = torch.ones(3)  # 12 bytes -> 512
            y = torch.ones(200)  # 800 -> 1024
    assert trk.result().peak_bytes == 1536
    trk.exclude(x)
    res = trk.result()
    assert res.peak_bytes == 1024 and res.final_bytes == 1024
    del y


def test_tracker_classifies_gradients_optimizer_state_and_logits():
    vocab = 37
    lin = torch.nn.Linear(8, vocab)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    trk = MemoryTracker(vocab_size=vocab)
    for p in lin.parameters():
        trk.register(p, "lora_params")
    trk.watch_gradients(lin.parameters())
    trk.watch_optimizer(opt)
    x = torch.randn(4, 8)
    trk.register(x, "inputs")
    with trk:
        for _ in range(2):
            with trk.phase("forward"):
                loss = torch.log_softmax(lin(x), -1).sum()
            with trk.phase("backward"):
                loss.backward()
            del loss
            with trk.phase("optimizer_step"):
                opt.step()
            with trk.phase("zero_grad"):
                opt.zero_grad(set_to_none=True)
    res = trk.result()
    cats = trk.categories()
    assert "gradients" in cats and "optimizer_state" in cats and "logits_loss" in cats
    assert len(res.step_peaks) == 2 and res.step_peaks[1] >= res.step_peaks[0]
    # AdamW state: exp_avg + exp_avg_sq per parameter (+ a 4-byte step each), alive after the steps
    n = sum(p.numel() for p in lin.parameters())
    assert res.final_bytes == n * 4 + 2 * n * 4 + 2 * 4 + x.numel() * 4
    assert set(res.estimate_phase_peaks) <= set(PHASES)


def test_tracker_rejects_unknown_names():
    trk = MemoryTracker()
    with pytest.raises(ValueError, match="unknown category"):
        trk.register(torch.zeros(1), "stuff")
    with pytest.raises(ValueError, match="unknown phase"):
        with trk.phase("warmup"):
            pass


# --------------------------------------------------------------------------------------------------------------
# fake CPU simulation == real CPU run, to the byte

EQUAL_CASES = {
    "opt-fp32-lora-adamw": ("opt", dict(bits=32, seq_len=128)),
    "opt-bf16-lora-gc": ("opt", dict(bits=16, dtype="bf16", grad_ckpt=True)),
    "opt-fp32-gc-all-linear": ("opt", dict(bits=32, grad_ckpt=True, targets="all-linear")),
    "opt-qlora-nf4-dq": ("opt", dict(method="qlora", dtype="bf16")),
    "opt-qlora-nf4-dq-gc-adamw8bit": ("opt", dict(method="qlora", dtype="bf16", grad_ckpt=True,
                                                  optimizer="adamw_bnb_8bit")),
    "opt-int8-lora": ("opt", dict(bits=8, dtype="bf16")),
    "llama-gqa-bf16-lora": ("llama", dict(dtype="bf16")),
    "llama-gqa-fp32-gc-full": ("llama", dict(method="full", bits=32, grad_ckpt=True)),
    "llama-gqa-qlora-fp4-no-dq": ("llama", dict(method="qlora", dtype="fp16", quant_type="fp4", double_quant=False)),
}


@pytest.mark.parametrize("case", list(EQUAL_CASES))
def test_fake_cpu_simulation_equals_real_cpu_run(case, opt_spec, llama_spec):
    family, kw = EQUAL_CASES[case]
    spec = opt_spec if family == "opt" else llama_spec
    setup = _resolve(spec, **kw)
    sim = simulate_for(spec, setup, device_semantics="cpu")
    real = _real_run(spec, setup)
    assert sim.total_bytes == real.peak_bytes
    assert sim.phase_peaks == real.phase_peaks
    assert list(sim.step_peaks) == real.step_peaks
    assert sim.components == {c: real.peak_components[c] for c in COMPONENTS}
    assert sum(sim.components.values()) == sim.total_bytes
    assert sim.final_bytes == real.final_bytes


def test_simulation_counts_match_the_spec(opt_spec):
    setup = _resolve(opt_spec, bits=16, dtype="bf16", rank=8)
    sim = simulate_for(opt_spec, setup, device_semantics="cpu", steps=1)
    assert sim.params.total == opt_spec.total_params()
    assert sim.params.trainable == opt_spec.lora_trainable_params(8, "q_proj,v_proj")
    assert sim.components["weights"] == opt_spec.total_params() * 2
    assert sim.components["lora_params"] == sim.params.trainable * 4  # peft keeps adapters in fp32
    q = simulate_for(opt_spec, _resolve(opt_spec, method="qlora", dtype="bf16"), device_semantics="cpu", steps=1)
    assert q.params.quantized == opt_spec.quantized_params_by_bnb()
    assert q.components["quantized_weights"] == opt_spec.quantized_params_by_bnb() // 2  # two 4-bit codes a byte


def test_build_honours_targets_and_adapter_dtype(opt_spec):
    regex = _resolve(opt_spec, targets=r".*\.(q_proj|v_proj)", adapter_dtype="bf16", dtype="bf16")
    model, info = build_training_model(opt_spec, regex, fake=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in lora) == opt_spec.lora_trainable_params(8, "q_proj,v_proj")
    assert {p.dtype for p in lora} == {torch.bfloat16}
    full = _resolve(opt_spec, method="full", bits=16, dtype="fp16")
    model, _ = build_training_model(opt_spec, full, fake=True)
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == opt_spec.total_params()


@pytest.mark.parametrize("model_type", list(TINY))
def test_every_architecture_simulates(model_type):
    """CUDA semantics, default LoRA targets, bf16: the built model is the spec's, parameter for parameter."""
    spec = spec_from_config(TINY[model_type], name=f"tiny-{model_type}")
    setup = resolve_setup(TrainSetup(spec.name, dtype="bf16", batch_size=2, seq_len=32), spec)
    res = simulate_for(spec, setup, steps=1)
    assert res.params.total == spec.total_params()
    assert res.params.trainable == spec.lora_trainable_params(setup.rank, setup.targets)
    # bf16 weights; buffers (rotary inv_freq, position ids) and 512-byte rounding add a little
    assert 0 <= res.components["weights"] - spec.total_params() * 2 < 2**20
    assert sum(res.components.values()) == res.total_bytes > res.components["weights"]
    assert res.peak_phase in PHASES


def test_moe_experts_outside_bf16_are_refused_with_the_reason():
    from memplan.errors import InvalidSetupError

    spec = spec_from_config(TINY["mixtral"], name="tiny-mixtral")
    with pytest.raises(InvalidSetupError, match="grouped_mm.*bf16"):
        simulate_for(spec, resolve_setup(TrainSetup(spec.name, dtype="fp16", seq_len=32), spec), steps=1)


# --------------------------------------------------------------------------------------------------------------
# CUDA semantics


def test_cuda_semantics_bool_dropout_masks_are_smaller(opt_spec):
    """fp32 LoRA with dropout: CPU's composite dropout keeps an fp32 mask per dropout, CUDA's native_dropout a
    bool one; the activations shrink although every storage is rounded up to 512 bytes."""
    setup = _resolve(opt_spec, bits=32, batch_size=4, seq_len=256)
    cpu = simulate_for(opt_spec, setup, device_semantics="cpu", steps=1)
    cuda = simulate_for(opt_spec, setup, device_semantics="cuda", steps=1)
    assert cuda.components["activations"] < cpu.components["activations"]
    assert cuda.total_bytes < cpu.total_bytes
    assert all(v % 512 == 0 for v in cuda.components.values())
    assert any("flash" in n or "efficient" in n for n in cuda.notes)


def _alive_after_each_allocation(fn, dtype, *, causal, mask, gqa, dropout_p):
    """The bytes alive right after every allocation of one attention forward + backward: equal curves mean
    equal peaks at every point (frees between two allocations may come in any order)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 1 if gqa else 4, 8, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    attn_mask = {None: None, "bool": torch.ones(8, 8, dtype=torch.bool).tril(),
                 "float": torch.zeros(2, 1, 8, 8, dtype=dtype)}[mask]
    trk = MemoryTracker()
    with trk:
        out = fn(q, k, v, attn_mask, dropout_p, causal, None, enable_gqa=gqa)[0]
        out.float().sum().backward()
    born, died, size = trk._born, trk._died, trk._size
    return [sum(size[j] for j in range(len(size)) if born[j] <= born[i] and (died[j] < 0 or died[j] > born[i]))
            for i in range(len(size))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal,mask", [(True, None), (False, None), (False, "bool"), (False, "float")])
@pytest.mark.parametrize("gqa", [True, False])
def test_python_math_attention_allocates_like_the_aten_kernel(dtype, causal, mask, gqa):
    """cuda_semantics.sdpa_math (used under CUDA semantics so that its dropout can be CUDA's) is the aten math kernel
    op for op: with at::dropout it allocates and frees exactly as the aten op does, forward and backward."""
    from memplan.measure.cuda_semantics import sdpa_math

    def aten(q, k, v, m, p, c, s, enable_gqa):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, m, p, c, None, scale=s,
                                                                  enable_gqa=enable_gqa)

    kw = dict(causal=causal, mask=mask, gqa=gqa, dropout_p=0.1)
    assert (_alive_after_each_allocation(sdpa_math, getattr(torch, dtype), **kw)
            == _alive_after_each_allocation(aten, getattr(torch, dtype), **kw))


def test_cuda_math_attention_keeps_a_bool_dropout_mask():
    """Under CUDA semantics the math kernel's dropout keeps a bool mask: 3 bytes less per fp32 probability."""
    from memplan.measure.cuda_semantics import native_dropout, sdpa_math

    def run(dropout):
        return max(_alive_after_each_allocation(
            lambda *a, **k: sdpa_math(*a, **k, dropout=dropout), torch.float32,
            causal=True, mask=None, gqa=True, dropout_p=0.1))

    probs = 2 * 4 * 8 * 8
    assert run(torch.dropout) - run(native_dropout) == 3 * probs


def test_cuda_semantics_restores_every_patch(opt_spec):
    import bitsandbytes as bnb
    import transformers
    from transformers import masking_utils

    before = (F.dropout, F.scaled_dot_product_attention, bnb.matmul, masking_utils.is_tracing,
              masking_utils.find_packed_sequence_indices)
    simulate_for(opt_spec, _resolve(opt_spec, bits=8, dtype="bf16", attn="flash_attention_2"), steps=1)
    after = (F.dropout, F.scaled_dot_product_attention, bnb.matmul, masking_utils.is_tracing,
             masking_utils.find_packed_sequence_indices)
    assert before == after
    assert "simattn" not in transformers.AttentionInterface._global_mapping


def test_unknown_device_semantics(opt_spec):
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="device semantics"):
        simulate_for(opt_spec, _resolve(opt_spec), device_semantics="tpu")


def test_to_dict_has_the_estimate_keys(opt_spec):
    from memplan.plan.estimate import estimate_for

    setup = _resolve(opt_spec, dtype="bf16")
    d = simulate_for(opt_spec, setup, steps=1).to_dict()
    assert set(estimate_for(opt_spec, setup).to_dict()) <= set(d)
    assert d["device_semantics"] == "cuda" and d["peak_phase"] in PHASES


def test_opt_13b_lora_matches_reference_numbers():
    """docs/memory-model.md ("Base weights", "LoRA parameters and gradients"): 12,853,473,280 parameters
    (tied lm_head), LoRA r=16 on q,v = 13,107,200 fp32 values = 50 MiB; the peak is the loss gradient at the
    start of backward."""
    try:
        load_model("opt-13b")
    except Exception as e:  # the catalog is not where the tests run
        pytest.skip(f"opt-13b not in the catalog: {e}")
    res = simulate(TrainSetup("opt-13b", rank=16, alpha=32, targets="q_proj,v_proj", dtype="fp16"))
    assert res.components["weights"] == 12_853_473_280 * 2
    assert res.components["lora_params"] == 50 * 2**20
    assert res.params.total == 12_853_473_280 and res.params.trainable == 13_107_200
    assert res.components["optimizer_state"] == 100 * 2**20  # AdamW, 2 fp32 states (step counters on the host)
    assert res.peak_phase == "backward_start"
    assert sum(res.components.values()) == res.total_bytes
    assert res.dominant == "weights"


def test_simulate_shows_a_spinner_on_a_terminal_and_keeps_json_clean():
    import json
    import sys

    from tests.extras import run_with_tty_stderr

    cmd = [sys.executable, "-m", "memplan", "simulate", "opt-125m", "--seq-len", "64", "--steps", "1", "--json"]
    code, out, seen = run_with_tty_stderr(cmd, timeout=300)
    assert code == 0, out
    assert b"simulating opt-125m" in seen
    assert json.loads(out)["total_bytes"] > 0  # stdout is the JSON alone (a pipe's stderr: tests/reports)
