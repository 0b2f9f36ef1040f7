"""memplan.preflight and memplan.integrations.MemplanCallback on tiny real models (CPU, random weights).

The anchor: a live model -- plain, peft-wrapped, 4-bit bitsandbytes + peft, 8-bit, full fine-tuning -- gives the
same estimate, to the byte, as the equivalent name-based setup (its config.json plus the LoraConfig /
BitsAndBytesConfig / TrainingArguments a script holds). Budgets are passed explicitly: these machines have no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft', 'bitsandbytes')
import torch  # noqa: E402

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments  # noqa: E402

import memplan  # noqa: E402
from memplan.errors import InvalidSetupError, UnknownGPUError, UnreadableModelError, WontFitError  # noqa: E402
from memplan.integrations.preflight import NoDeviceError, PreflightWarning, read_live_model  # noqa: E402

pytestmark = [EXTRAS, pytest.mark.filterwarnings("ignore:torch.utils.checkpoint"),
              pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")]

TINY_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512}
BIG = 10**12  # a budget everything fits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama saved like a downloaded checkpoint (config.json + safetensors), random weights."""
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**TINY_LLAMA)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return str(d)


def _args(**kw):
    """TrainingArguments as a CPU test can make them (bf16=True is refused without a GPU), as a dict."""
    bf16 = kw.pop("bf16", False)
    d = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **kw).to_dict()
    d["bf16"] = bf16
    return d


def _lora(**kw):
    return LoraConfig(**{"r": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05,
                         "task_type": "CAUSAL_LM", **kw})


def _load(model_dir, quant=None):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                device_map="cpu" if quant is not None else None)


# --------------------------------------------------------------------------------------------------------------
# live model == name-based setup, to the byte


def test_qlora_live_model_matches_the_name_based_setup(model_dir):
    """The QLoRA recipe as a script writes it: 4-bit NF4 + double quant, prepare_model_for_kbit_training,
    peft LoRA. Reading the live model gives the same estimate as config.json + the config objects."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    lora = _lora(r=16, target_modules="all-linear")
    model = get_peft_model(prepare_model_for_kbit_training(_load(model_dir, bnb), use_gradient_checkpointing=True),
                           lora)
    args = _args(per_device_train_batch_size=4, optim="paged_adamw_8bit", gradient_checkpointing=True, bf16=True)

    live = memplan.preflight(model, training_args=args, seq_len=128, budget_bytes=BIG)
    named = memplan.preflight(model_dir, training_args=args, lora_config=_lora(r=16, target_modules="all-linear"),
                              bnb_config=bnb, seq_len=128, budget_bytes=BIG)
    assert live.total_bytes == named.total_bytes
    assert live.components == named.components
    s = live.setup
    assert (s.bits, s.quant_type, s.double_quant, s.dtype, s.rank, s.batch_size, s.optimizer, s.grad_ckpt) == \
        (4, "nf4", True, "bf16", 16, 4, "paged_adamw_8bit", True)
    assert s.upcast_non_quantized is True  # prepare_model_for_kbit_training's fp32 upcast, read from the weights


def test_live_model_reads_counts_and_dtypes(model_dir):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = _load(model_dir, bnb)
    info = read_live_model(get_peft_model(base, _lora()))
    spec = memplan.load_model(model_dir)
    # every linear of the 2 layers but lm_head: q 128x128, k and v 64x128 (2 kv heads x 32), o 128x128,
    # gate and up 256x128, down 128x256
    quantized = 2 * (128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 256 * 128)
    assert info.bits == 4 and info.quant_type == "fp4" and info.double_quant is False
    assert info.params_quantized == quantized == info.values_by_dtype["fp4"]
    # a Params4bit packs two values per byte: its storage is half its logical count
    assert info.bytes_by_dtype["fp4"] == quantized // 2
    lora_params = 2 * 2 * 8 * 128 + 2 * 8 * (128 + 64)  # q: A 8x128, B 128x8; v: A 8x128, B 64x8; 2 layers
    assert info.params_trainable == lora_params
    assert info.params_total == spec.total_params() + lora_params
    assert info.lora == {"rank": 8, "alpha": 8, "targets": "q_proj,v_proj", "lora_dropout": 0.05,
                         "adapter_dtype": "fp32"}
    assert info.compute_dtype == "bf16" and info.upcast_non_quantized is False  # not prepared: bf16 norms


@pytest.mark.parametrize("kw", [
    dict(bits=16, dtype="bf16"),
    dict(method="qlora", bits=4, dtype="bf16", grad_ckpt=True),
    dict(method="qlora", bits=4, dtype="bf16", quant_type="fp4", double_quant=False, targets="all-linear", rank=16),
    dict(bits=8, dtype="bf16"),
    dict(method="full", bits=32),
], ids=["lora-bf16", "qlora-nf4-dq-ckpt", "fp4-all-linear", "int8", "full-fp32"])
def test_live_models_built_by_memplan_profile_match(kw):
    """The models `memplan profile` and `memplan simulate` build (memplan.measure.build, real tensors): preflight on
    the live object reproduces the setup they were built from, so the estimate is the same."""
    from memplan.catalog.models import spec_from_config
    from memplan.measure.build import build_training_model
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    spec = spec_from_config(TINY_LLAMA, name="tiny")
    setup = resolve_setup(TrainSetup("tiny", seq_len=64, batch_size=2, **kw), spec)
    model, _ = build_training_model(spec, setup, device="cpu")
    got = memplan.preflight(model, seq_len=64, batch_size=2, budget_bytes=BIG)
    want = estimate_for(spec, setup)
    assert got.total_bytes == want.total_bytes
    assert {k: v for k, v in got.setup.to_dict().items() if k != "model"} == \
        {k: v for k, v in setup.to_dict().items() if k != "model"}


def test_base_model_with_a_lora_config_plans_the_wrapped_model(model_dir):
    """Before get_peft_model: the base model plus the LoraConfig the script will apply."""
    base = _load(model_dir)
    before = memplan.preflight(base, lora_config=_lora(r=32), seq_len=64, budget_bytes=BIG)
    after = memplan.preflight(get_peft_model(_load(model_dir), _lora(r=32)), seq_len=64, budget_bytes=BIG)
    assert before.total_bytes == after.total_bytes and before.setup.rank == 32


def test_live_model_reading_allocates_nothing(model_dir):
    """No tensor op runs while a live model is read (so no device memory is used)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    model = get_peft_model(_load(model_dir), _lora())
    with Count():
        memplan.preflight(model, seq_len=64, budget_bytes=BIG)
    assert Count.ops == 0


# --------------------------------------------------------------------------------------------------------------
# the budget


def test_raises_just_below_and_passes_just_above(model_dir):
    est = memplan.preflight(model_dir, lora_config=_lora(), seq_len=256, batch_size=4, budget_bytes=BIG)
    assert memplan.preflight(model_dir, lora_config=_lora(), seq_len=256, batch_size=4,
                             budget_bytes=est.total_bytes).total_bytes == est.total_bytes
    with pytest.raises(WontFitError) as info:
        memplan.preflight(model_dir, lora_config=_lora(), seq_len=256, batch_size=4, budget_bytes=est.total_bytes - 1)
    err = info.value
    assert err.estimate.total_bytes == est.total_bytes and err.budget_bytes == est.total_bytes - 1
    msg = str(err)
    assert "will not fit" in msg and "Where it goes" in msg and "activations" in msg
    # one byte short: a smaller micro-batch fits, and so does checkpointing
    fields = [c.fields for c in err.changes]
    assert {"batch_size": 2, "grad_accum": 2} in fields and {"grad_ckpt": True} in fields
    for c in err.changes:
        assert c.estimate.total_bytes <= err.budget_bytes
        assert c.description in msg


def test_not_strict_warns_and_returns(model_dir):
    est = memplan.preflight(model_dir, seq_len=128, budget_bytes=BIG)
    with pytest.warns(PreflightWarning, match="will not fit"):
        got = memplan.preflight(model_dir, seq_len=128, budget_bytes=est.total_bytes // 2, strict=False)
    assert got.total_bytes == est.total_bytes


def test_no_single_change_falls_back_to_the_search():
    """A 7B at 16 bits, batch 8, sequence 2048 on a 24 GB card: no single change is enough; the message gives
    memplan fit's plan with the user's adapter kept."""
    with pytest.raises(WontFitError) as info:
        memplan.preflight("llama-2-7b-hf", training_args=_args(per_device_train_batch_size=8, bf16=True),
                          lora_config=_lora(r=16), seq_len=2048, gpu="3090")
    msg = str(info.value)
    assert info.value.changes == ()
    assert "No single change is enough" in msg and "r=16 on q_proj,v_proj" in msg


def test_nothing_fits_names_the_smallest_card():
    with pytest.raises(WontFitError, match="smallest catalog card it fits"):
        memplan.preflight("llama-2-70b-hf", seq_len=2048, gpu="3060")


def test_catalog_card_budget_is_fits_budget():
    """gpu= plans exactly as `memplan fit` does: total minus headroom."""
    from memplan.plan.search import fit

    plan = fit(memplan.TrainSetup("llama-2-7b-hf", seq_len=1024), "3090").recommended
    s = plan.setup
    est = memplan.preflight("llama-2-7b-hf", gpu="3090", **{k: getattr(s, k) for k in
                            ("bits", "rank", "targets", "batch_size", "seq_len", "grad_ckpt", "optimizer", "method")})
    assert est.total_bytes == plan.total_bytes


def test_without_a_gpu_it_says_what_to_pass(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NoDeviceError, match="gpu=.*budget_bytes="):
        memplan.preflight(model_dir)
    with pytest.warns(PreflightWarning, match="not checked"):
        est = memplan.preflight(model_dir, strict=False)
    assert est.total_bytes > 0


# --------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_a_clear_error(model_dir):
    with pytest.raises(UnreadableModelError, match="'object'"):
        memplan.preflight(object(), budget_bytes=BIG)
    with pytest.raises(InvalidSetupError, match="unknown setup field.*rnak"):
        memplan.preflight(model_dir, rnak=8, budget_bytes=BIG)
    with pytest.raises(InvalidSetupError, match="contradictory settings load_in_4bit: true and load_in_8bit: true"):
        memplan.preflight(model_dir, bnb_config={"load_in_4bit": True, "load_in_8bit": True}, budget_bytes=BIG)
    with pytest.raises(memplan.MemplanError, match="adamw_torch"):
        memplan.preflight(model_dir, training_args={"optim": "adamw_torchh"}, budget_bytes=BIG)
    with pytest.raises(InvalidSetupError, match="no bf16"):
        memplan.preflight(model_dir, training_args={"bf16": True}, gpu="T4")
    with pytest.raises(UnknownGPUError, match="did you mean"):
        memplan.preflight(model_dir, gpu="rtx 3009")
    with pytest.raises(InvalidSetupError, match="budget_bytes"):
        memplan.preflight(model_dir, budget_bytes=-5)


def test_preflight_by_name_imports_no_torch():
    code = ("import sys, memplan\n"
            "e = memplan.preflight('opt-13b', gpu='3090', seq_len=512, strict=False)\n"
            "assert e.total_bytes > 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------
# the Trainer callback


def _trainer(model_dir, tmp_path, callback, *, steps=2, batch=2, seq=32):
    from transformers import Trainer

    torch.manual_seed(0)
    model = get_peft_model(_load(model_dir), _lora())
    ids = torch.randint(0, 1000, (8, seq))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, max_steps=steps,
                             use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_callback_checks_and_records_a_trainer_run(model_dir, tmp_path):
    from memplan.integrations import MemplanCallback
    from memplan.measure.runs import list_runs, load_run

    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=tmp_path / "runs")
    _trainer(model_dir, tmp_path, cb).train()
    assert cb.estimate is not None and cb.estimate.setup.batch_size == 2
    rec = load_run(cb.record_path)
    assert rec.outcome == "ok" and rec.steps_completed == 2 and rec.device == "cpu"
    names = [(p["name"], p["step"]) for p in rec.phases]
    assert names == [("load", None), ("forward", 1), ("backward", 1), ("optimizer_step", 1),
                     ("forward", 2), ("backward", 2), ("optimizer_step", 2)]
    peak = rec.peak
    assert peak["tensor_peak_bytes"] == max(p["tensor_peak_bytes"] for p in rec.phases)
    assert sum(peak["components"].values()) == peak["tensor_peak_bytes"]
    assert peak["components"]["optimizer_state"] > 0 and peak["components"]["lora_params"] > 0
    assert rec.setup["rank"] == 8 and rec.setup["seq_len"] == 32
    assert rec.extra["preflight_estimate"]["total_bytes"] == cb.estimate.total_bytes
    assert len(list_runs(tmp_path / "runs")) == 1


def test_callback_stops_a_run_that_will_not_fit(model_dir, tmp_path):
    from memplan.integrations import MemplanCallback

    cb = MemplanCallback(seq_len=32, budget_bytes=1000, record_dir=tmp_path / "runs")
    trainer = _trainer(model_dir, tmp_path, cb)
    with pytest.raises(WontFitError):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_callback_records_an_out_of_memory_error(model_dir, tmp_path):
    """torch.OutOfMemoryError in step 2's forward: a record with outcome oom, where it happened."""
    from memplan.integrations import MemplanCallback
    from memplan.measure.runs import load_run

    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=tmp_path / "runs")
    trainer = _trainer(model_dir, tmp_path, cb, steps=3)
    calls = {"n": 0}

    def fail_second(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (emulated)")

    trainer.model.base_model.model.model.register_forward_pre_hook(fail_second)
    with pytest.raises(torch.OutOfMemoryError), cb.guard():
        trainer.train()
    rec = load_run(cb.record_path)
    assert rec.outcome == "oom" and rec.error_type == "OutOfMemoryError"
    assert (rec.error_phase, rec.error_step) == ("forward", 2) and rec.steps_completed == 1
    assert sys.excepthook is sys.__excepthook__ or "MemplanCallback" not in repr(sys.excepthook)


def test_uncaught_oom_in_a_script_leaves_a_record(model_dir, tmp_path):
    """A training script that dies of OOM without catching it: the chained excepthook writes the record."""
    script = tmp_path / "train.py"
    script.write_text(f"""
import os, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from memplan.integrations import MemplanCallback
model = get_peft_model(AutoModelForCausalLM.from_pretrained({model_dir!r}), LoraConfig(r=8, target_modules=["q_proj"]))
def boom(module, args):
    raise torch.OutOfMemoryError("CUDA out of memory (emulated)")
model.register_forward_pre_hook(boom)
ids = torch.randint(0, 1000, (4, 16))
args = TrainingArguments(output_dir={str(tmp_path / 'o')!r}, per_device_train_batch_size=2, max_steps=1,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=[{{"input_ids": i, "labels": i}} for i in ids],
        callbacks=[MemplanCallback(seq_len=16, budget_bytes=10**12, record_dir={str(tmp_path / 'runs')!r})]).train()
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode != 0 and "OutOfMemoryError" in out.stderr
    (record,) = (tmp_path / "runs").glob("*.json")
    data = json.loads(record.read_text())
    assert data["outcome"] == "oom" and data["error_phase"] == "forward" and data["schema_version"] == 1


def test_callback_record_validates(model_dir, tmp_path):
    """A callback record is validation data: memplan validate estimates and simulates it."""
    from memplan.integrations import MemplanCallback
    from memplan.measure.validate import validate_runs

    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=tmp_path / "runs")
    _trainer(model_dir, tmp_path, cb).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (row,) = validate_runs(tmp_path / "runs", simulate_runs=False)
    assert row.measured_bytes == cb.record.peak["tensor_peak_bytes"]
    assert 0.8 < row.analytic_bytes / row.measured_bytes < 1.25


def test_device_reading_counts_what_this_process_holds(model_dir, monkeypatch):
    """The free-memory path with torch.cuda answering as an RTX 3090 would (no GPU here: monkeypatched). The
    budget is free + reserved by this process + the card's CUDA-context default - 5% headroom, and the card's
    context default is what the estimate counts."""
    from types import SimpleNamespace

    from memplan.catalog.gpus import load_gpu

    total, free, reserved = 25_447_170_048, 20 * 2**30, 3 * 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: reserved)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=None: SimpleNamespace(name="NVIDIA GeForce RTX 3090", major=8, minor=6))
    card = load_gpu("3090")
    budget = free + reserved + card.cuda_context_bytes - int(0.05 * total)
    est = memplan.preflight(model_dir, seq_len=64, device="cuda")
    assert est.components["cuda_context"] == card.cuda_context_bytes
    assert any(f"{budget / 2**30:.2f} GiB" in n and "cuda:0 (RTX 3090)" in n for n in est.notes)
    with pytest.raises(WontFitError) as info:
        memplan.preflight("llama-2-13b-hf", seq_len=512, device="cuda")
    assert info.value.budget_bytes == budget
    with pytest.raises(NoDeviceError, match="not a CUDA device"):
        memplan.preflight(model_dir, device="cpu")


def test_callback_says_the_plan_and_the_record(model_dir, tmp_path, capsys):
    from memplan.integrations import MemplanCallback

    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=tmp_path / "runs")
    _trainer(model_dir, tmp_path, cb, steps=1).train()
    err = capsys.readouterr().err
    assert "memplan: estimated peak" in err
    assert "fits the 931.32 GiB budget (budget_bytes: 1,000,000,000,000 bytes" in err
    assert "GiB): " not in err  # the budget is named once, not "(1.00 GiB): 1.00 GiB"
    assert f"memplan: run record (ok) {cb.record_path}: tensor peak" in err


# examples/train_qlora.py, the README's script: tests/integrations/test_example_script.py


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_callback_record_dir_that_cannot_take_records_fails_before_training(model_dir, tmp_path, where):
    """record_dir is checked at on_train_begin: a file (or a path under one) is a one-line ConfigError naming
    it before the first step, not an error after the run when the record cannot be written."""
    from memplan.errors import ConfigError
    from memplan.integrations import MemplanCallback

    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    record_dir = blocker if where == "a file" else blocker / "sub"
    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=record_dir)
    trainer = _trainer(model_dir, tmp_path, cb)
    hook = sys.excepthook
    with pytest.raises(ConfigError) as info:
        trainer.train()
    msg = str(info.value)
    assert "\n" not in msg and f"record_dir={str(record_dir)!r}" in msg
    assert ("is a file, not a folder" if where == "a file" else "cannot write there") in msg
    assert "--out" not in msg  # the CLI's flag, not the callback's argument
    assert trainer.state.global_step == 0 and cb.record_path is None
    assert sys.excepthook is hook  # no excepthook left chained
    assert blocker.read_text() == "not a folder"


def test_callback_creates_the_record_dir_at_train_begin(model_dir, tmp_path):
    from transformers import TrainerCallback

    from memplan.integrations import MemplanCallback

    record_dir = tmp_path / "new" / "runs"
    seen = []

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(record_dir.is_dir())

    cb = MemplanCallback(seq_len=32, budget_bytes=BIG, record_dir=record_dir)
    trainer = _trainer(model_dir, tmp_path, cb, steps=1)
    trainer.add_callback(Spy())
    trainer.train()
    assert seen == [True] and cb.record_path.parent == record_dir


def test_training_args_decide_the_autocast(tmp_path):
    """TrainingArguments(bf16=True) runs forward and loss under bf16 autocast; bf16=False and fp16=False run
    none: the plan follows (memplan.plan.precision)."""
    amp = TrainingArguments(output_dir=str(tmp_path / "a"), bf16=True, use_cpu=True, report_to=[])
    pure = TrainingArguments(output_dir=str(tmp_path / "b"), bf16=False, fp16=False, use_cpu=True, report_to=[])
    on = memplan.preflight("llama-2-7b", training_args=amp, seq_len=256, budget_bytes=BIG)
    off = memplan.preflight("llama-2-7b", training_args=pure, seq_len=256, budget_bytes=BIG)
    assert (on.setup.autocast, off.setup.autocast) == ("bf16", "off")
    assert on.total_bytes != off.total_bytes
