"""Instrumented real runs on tiny models (CPU): records, per-phase peaks, OOM / error / Ctrl-C as results,
sweeps, and CUDA collectors degrading gracefully on a machine without a GPU."""

from __future__ import annotations

import json
import os

import pytest

from tests.extras import require  # noqa: E402

EXTRAS = require('torch', 'transformers', 'peft')
import torch  # noqa: E402

pytestmark = EXTRAS

from memplan.catalog.models import load_model  # noqa: E402
from memplan.measure import build, nvml, optimizer  # noqa: E402
from memplan.measure.environment import collect_environment  # noqa: E402
from memplan.measure.nvml import NvmlReader, measure_cuda_context, paged_bytes  # noqa: E402
from memplan.measure.profile import ProfileError, RunInterrupted, profile_run  # noqa: E402
from memplan.measure.recorder import is_oom_error  # noqa: E402
from memplan.measure.runs import list_runs, load_run  # noqa: E402
from memplan.measure.sweep import default_batch_sizes, profile_sweep  # noqa: E402
from memplan.plan.setup import TrainSetup, resolve_setup  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPT = {"model_type": "opt", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 1024,
       "vocab_size": 1000, "max_position_embeddings": 512, "word_embed_proj_dim": 256, "do_layer_norm_before": True,
       "dropout": 0.1, "attention_dropout": 0.0, "activation_function": "relu", "enable_bias": True,
       "tie_word_embeddings": True}
LLAMA_GQA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 1024,
             "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
STEP_PHASES = ["forward", "backward", "optimizer_step"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    out = {}
    for name, cfg in (("tiny-opt", OPT), ("tiny-llama", LLAMA_GQA)):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(cfg))
        out[name] = str(d / name / "config.json")
    return out


def _setup(path, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("seq_len", 64)
    return TrainSetup(path, **kw)


def _wrap_optimizer(monkeypatch, fail_on_call: int, exc_factory):
    """Make the optimizer of the ``fail_on_call``-th run raise ``exc_factory()`` from ``step()``."""
    real = optimizer.make_optimizer
    calls = {"n": 0}

    def make(setup, params, **kw):
        calls["n"] += 1
        opt = real(setup, params, **kw)
        if calls["n"] == fail_on_call:
            def step(*a, **k):
                raise exc_factory()
            opt.step = step
        return opt

    monkeypatch.setattr(optimizer, "make_optimizer", make)
    return calls


# ---------------------------------------------------------------------------------------------------- ok runs
def test_lora_fp32_run_writes_a_valid_record_with_per_phase_peaks(configs, tmp_path):
    rec = profile_run(_setup(configs["tiny-opt"], bits=32), steps=2, out_dir=tmp_path)
    assert rec.outcome == "ok" and rec.error is None and rec.steps_completed == 2
    back = load_run(rec.path)
    assert back.to_dict() == rec.to_dict()
    assert [(p["name"], p["step"]) for p in back.phases] == [("load", None)] + [
        (n, s) for s in (1, 2) for n in STEP_PHASES]
    assert all(p["completed"] and p["tensor_peak_bytes"] >= p["tensor_end_bytes"] > 0 for p in back.phases)
    peak = back.peak
    assert peak["tensor_peak_bytes"] == max(p["tensor_peak_bytes"] for p in back.phases)
    assert sum(peak["components"].values()) == peak["tensor_peak_bytes"]
    assert peak["components"]["lora_params"] > 0 and peak["components"]["logits_loss"] > 0
    # the setup is stored resolved, and rebuilds a TrainSetup
    assert TrainSetup(**back.setup).dtype == "fp32" and back.setup["targets"] == "q_proj,v_proj"
    spec = load_model(configs["tiny-opt"])
    assert back.model["params_trainable"] == spec.lora_trainable_params(8, "q_proj,v_proj")
    assert back.model["params_total"] == spec.total_params() + back.model["params_trainable"]
    # CPU: the CUDA collectors are not used, their fields are null and a note says so
    for key in ("max_allocated_bytes", "max_reserved_bytes", "nvml_used_bytes", "paged_bytes", "num_ooms"):
        assert all(p[key] is None for p in back.phases)
    assert back.peak["cuda_context_bytes"] is None
    assert any("CUDA collectors" in n for n in back.notes)
    env = back.environment
    assert env["device_kind"] == "cpu" and env["versions"]["torch"] == torch.__version__
    assert env["versions"]["transformers"] and env["versions"]["peft"] and env["python"]


def test_tensor_peak_equals_an_independent_tracker_measurement(configs):
    """The profiler's instrumentation (phase windows, collectors, HF loading path) does not change what the
    tracker sees: a bare loop over memplan.measure.build's model under a plain MemoryTracker gives the same bytes.
    Autocast is pinned, and the loop runs the setup the record says ran: on a CPU without native bf16 the profiler
    picks fp32 weights itself (memplan.measure.profile), which the loop must follow."""
    from memplan.measure.tracker import MemoryTracker

    setup = _setup(configs["tiny-llama"], bits=32, lora_dropout=0.1, autocast="bf16")
    rec = profile_run(setup, steps=2)
    assert rec.outcome == "ok"

    spec = load_model(setup.model)
    resolved = resolve_setup(TrainSetup(**rec.setup), spec)
    model, _ = build.build_training_model(spec, resolved, fake=False)
    trk = MemoryTracker(round_to=1, vocab_size=spec.vocab_size)
    for p in model.parameters():
        trk.register(p, "lora_params" if p.requires_grad else "weights")
    for b in model.buffers():
        trk.register(b, "weights")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer.make_optimizer(resolved, params)
    trk.watch_gradients(params)
    trk.watch_optimizer(opt)
    with trk:
        for _ in range(2):
            ids = torch.randint(0, spec.vocab_size, (resolved.batch_size, resolved.seq_len))
            labels = ids.clone()  # the data collator's copy
            trk.register(ids, "inputs")
            trk.register(labels, "inputs")
            # a Trainer with bf16=True: forward and loss under the device's autocast (the setup's default)
            with trk.phase("forward"), torch.autocast("cpu", dtype=torch.bfloat16,
                                                      enabled=resolved.autocast == "bf16"):
                loss = model(input_ids=ids, labels=labels).loss
            with trk.phase("backward"):
                loss.backward()
            del loss
            with trk.phase("optimizer_step"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            del ids, labels
    res = trk.result()
    assert resolved.autocast == "bf16"
    assert rec.peak["tensor_peak_bytes"] == res.peak_bytes
    assert rec.peak["components"] == res.peak_components
    for name in STEP_PHASES:
        assert max(p["tensor_peak_bytes"] for p in rec.phases if p["name"] == name) == res.phase_peaks[name]


def test_tensor_peak_equals_the_cpu_simulation(configs):
    trace = pytest.importorskip("memplan.measure.simulate")
    setup = _setup(configs["tiny-opt"], bits=32)
    rec = profile_run(setup, steps=2)
    # (what the record ran: on a CPU without native bf16 the profiler chooses fp32 without autocast itself)
    sim = trace.simulate(TrainSetup(**rec.setup), steps=2, device_semantics="cpu")
    assert rec.peak["tensor_peak_bytes"] == sim.total_bytes


def test_qlora_nf4_double_quant_runs_on_cpu(configs):
    setup = _setup(configs["tiny-llama"], method="qlora", grad_ckpt=True)
    rec = profile_run(setup, steps=2)
    assert rec.outcome == "ok", rec.error
    assert rec.setup["bits"] == 4 and rec.setup["double_quant"] and rec.setup["upcast_non_quantized"]
    spec = load_model(setup.model)
    quantized = sum(lin.weight_numel for lin in spec.layer_linears if lin.quantized_by_bnb) * spec.num_layers
    assert rec.model["params_quantized"] == quantized  # every layer linear, not lm_head
    comps = rec.peak["components"]
    assert comps["quantized_weights"] == (quantized + 1) // 2  # two 4-bit values per byte
    assert comps["quant_constants"] > 0


def test_bnb_8bit_optimizer_keeps_smaller_state(configs):
    # rank 16 on h=256: every LoRA matrix has 4096 values = bnb's min_8bit_size, so states are 8-bit
    base = _setup(configs["tiny-opt"], bits=32, rank=16)
    r8 = profile_run(base.with_(optimizer="adamw_bnb_8bit"), steps=2)
    r32 = profile_run(base, steps=2)
    assert r8.outcome == r32.outcome == "ok"
    lora = r32.model["params_trainable"]
    assert r32.peak["components"]["optimizer_state"] >= 2 * 4 * lora  # two fp32 states
    assert 2 * lora <= r8.peak["components"]["optimizer_state"] < 2 * 4 * lora  # two uint8 states + absmax


def test_int8_lora_runs_on_cpu(configs):
    rec = profile_run(_setup(configs["tiny-opt"], bits=8, dtype="fp16"), steps=1)
    assert rec.outcome == "ok", rec.error
    assert rec.model["params_quantized"] > 0
    assert any("MatMul8bitFp" in n for n in rec.notes)


# ---------------------------------------------------------------------------------------------------- failures
def test_oom_is_a_result_saved_atomically(configs, tmp_path, monkeypatch):
    _wrap_optimizer(monkeypatch, 1, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    rec = profile_run(_setup(configs["tiny-opt"], bits=32), steps=2, out_dir=tmp_path)
    assert rec.outcome == "oom" and "Tried to allocate" in rec.error
    assert (rec.error_type, rec.error_phase, rec.error_step) == ("OutOfMemoryError", "optimizer_step", 1)
    assert rec.steps_completed == 0
    assert [(p["name"], p["completed"]) for p in rec.phases] == [
        ("load", True), ("forward", True), ("backward", True), ("optimizer_step", False)]
    assert rec.peak["tensor_peak_bytes"] == max(p["tensor_peak_bytes"] for p in rec.phases)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(rec.path)]
    assert load_run(rec.path).outcome == "oom"


def test_cpu_allocator_failure_counts_as_oom():
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"))
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of memory"))


def test_tensor_budget_emulates_a_smaller_card(configs):
    rec = profile_run(_setup(configs["tiny-opt"], bits=32), steps=1, tensor_budget_bytes=16_000_000)
    assert rec.outcome == "oom" and "emulated out of memory" in rec.error
    assert (rec.error_phase, rec.error_step) == ("forward", 1)


def test_other_exceptions_are_error_records(configs, monkeypatch):
    _wrap_optimizer(monkeypatch, 1, lambda: ValueError("boom"))
    rec = profile_run(_setup(configs["tiny-opt"], bits=32), steps=1)
    assert (rec.outcome, rec.error, rec.error_type) == ("error", "boom", "ValueError")
    assert rec.error_phase == "optimizer_step"
    assert "ValueError: boom" in rec.to_dict()["traceback"]


def test_interrupted_single_run_is_saved_and_reraised(configs, tmp_path, monkeypatch):
    _wrap_optimizer(monkeypatch, 1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt) as err:
        profile_run(_setup(configs["tiny-opt"], bits=32), steps=2, out_dir=tmp_path)
    assert isinstance(err.value, RunInterrupted)
    saved = list_runs(tmp_path)
    assert [r.outcome for r in saved] == ["interrupted"]
    assert saved[0].error_phase == "optimizer_step" and len(saved[0].phases) == 4


def test_invalid_setup_raises_before_running(configs):
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError):
        profile_run(_setup(configs["tiny-opt"], rank=0))
    with pytest.raises(ProfileError, match="steps"):
        profile_run(_setup(configs["tiny-opt"]), steps=0)
    with pytest.raises(ProfileError, match="device"):
        profile_run(_setup(configs["tiny-opt"]), device="tpu")


# ---------------------------------------------------------------------------------------------------- sweeps
def test_sweep_stops_at_the_first_oom(configs, tmp_path):
    seen = []
    recs = profile_sweep(_setup(configs["tiny-opt"], bits=32, seq_len=64), out_dir=tmp_path, steps=1,
                         tensor_budget_bytes=30_000_000, progress=False, on_record=seen.append)
    assert [(r.setup["batch_size"], r.outcome) for r in recs] == [(1, "ok"), (2, "ok"), (4, "oom")]
    assert seen == recs
    on_disk = list_runs(tmp_path)
    assert sorted(r.setup["batch_size"] for r in on_disk) == [1, 2, 4] and not on_disk.skipped
    assert recs[0].peak["tensor_peak_bytes"] < recs[1].peak["tensor_peak_bytes"]


def test_interrupted_sweep_keeps_finished_records(configs, tmp_path, monkeypatch):
    _wrap_optimizer(monkeypatch, 2, KeyboardInterrupt)  # Ctrl-C in the second run's optimizer step
    with pytest.raises(KeyboardInterrupt):
        profile_sweep(_setup(configs["tiny-opt"], bits=32), batch_sizes=[1, 2, 4], out_dir=tmp_path, steps=1,
                      progress=False)
    on_disk = {r.setup["batch_size"]: r for r in list_runs(tmp_path)}
    assert sorted(on_disk) == [1, 2]
    assert on_disk[1].outcome == "ok" and on_disk[1].steps_completed == 1
    stopped = on_disk[2]
    assert stopped.outcome == "interrupted" and stopped.error_phase == "optimizer_step"
    assert [p["name"] for p in stopped.phases] == ["load", "forward", "backward", "optimizer_step"]
    assert stopped.peak["tensor_peak_bytes"] > 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_isolated_sweep_runs_each_batch_in_a_fresh_process(configs, tmp_path):
    setup = _setup(configs["tiny-opt"], bits=32)
    (inproc,) = profile_sweep(setup, batch_sizes=[2], out_dir=tmp_path / "a", steps=1, progress=False)
    (child,) = profile_sweep(setup, batch_sizes=[2], out_dir=tmp_path / "b", steps=1, progress=False, isolate=True)
    assert child.outcome == "ok" and child.path and os.path.exists(child.path)
    assert child.peak["tensor_peak_bytes"] == inproc.peak["tensor_peak_bytes"]  # deterministic


def test_default_batch_sizes():
    assert default_batch_sizes() == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert default_batch_sizes(3, 20) == [3, 6, 12]
    with pytest.raises(ProfileError):
        default_batch_sizes(0)


# ---------------------------------------------------------------------------------------------------- CUDA collectors
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_collectors_degrade_without_a_gpu(configs):
    nvml = NvmlReader()
    try:
        if not nvml.ok:  # no NVML library / driver here: every reading is None, with the reason kept
            assert nvml.error and nvml.used() is None and nvml.process_used() is None
            assert nvml.driver_version() is None or isinstance(nvml.driver_version(), str)
    finally:
        nvml.close()
    ctx, notes = measure_cuda_context()
    assert ctx["cuda_context_bytes"] is None and any("not measured" in n for n in notes)
    env, env_notes = collect_environment("cuda")
    assert env["device_name"] is None and env["total_memory_bytes"] is None and env["driver_version"] is None
    assert env_notes  # each missing collector says why
    assert paged_bytes(0) in (None, 0)
    with pytest.raises(ProfileError, match="device cuda requested"):
        profile_run(_setup(configs["tiny-opt"]), device="cuda")
    with pytest.raises(ProfileError, match="gpu_memory_fraction"):
        profile_run(_setup(configs["tiny-opt"]), gpu_memory_fraction=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_records_allocator_nvml_and_paged_memory(configs, tmp_path):
    # rank 512 on h=256: LoRA matrices of 131072 values >= 1e5, so bitsandbytes pages their 8-bit state
    rec = profile_run(_setup(configs["tiny-llama"], method="qlora", optimizer="paged_adamw_8bit", rank=512,
                             batch_size=4, seq_len=256), device="cuda", steps=2, out_dir=tmp_path)
    assert rec.outcome == "ok", rec.error
    for p in rec.phases:
        assert p["max_reserved_bytes"] >= p["max_allocated_bytes"] > 0
        assert p["num_ooms"] == 0 and p["tensor_peak_bytes"] % 512 == 0
    assert rec.peak["max_reserved_bytes"] >= rec.peak["max_allocated_bytes"]
    assert rec.peak["paged_bytes"] > 0
    env = rec.environment
    assert env["device_name"] and env["total_memory_bytes"] > 0 and env["compute_capability"] and env["cuda_version"]
    if rec.peak["nvml_used_bytes"] is not None:  # NVML present
        assert rec.peak["nvml_used_bytes"] >= rec.peak["max_reserved_bytes"]
        assert rec.peak["cuda_context_bytes"] is not None and rec.peak["cuda_context_bytes"] > 0
        assert env["driver_version"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_is_a_result(configs):
    # the logits alone (64 x 512 x 1000 fp32 = 131 MB) exceed a 64 MiB cap
    fraction = 64 * 2**20 / torch.cuda.get_device_properties(0).total_memory
    rec = profile_run(_setup(configs["tiny-llama"], bits=32, batch_size=64, seq_len=512), device="cuda", steps=1,
                      gpu_memory_fraction=fraction)
    assert rec.outcome == "oom" and rec.error_type == "OutOfMemoryError"
    assert rec.error_phase in ("forward", "backward") and rec.phase(rec.error_phase, 1)["num_ooms"] >= 1
    assert torch.cuda.get_per_process_memory_fraction(0) == 1.0  # the cap is lifted after the run


class _FakeNvml:
    """Stands in for NvmlReader: device used memory from a list of readings, a per-process figure."""

    def __init__(self, used, process=None):
        self._used = list(used)
        self._process = process
        self.ok, self.error = True, None

    def used(self):
        return self._used.pop(0) if len(self._used) > 1 else self._used[0]

    def process_used(self):
        return self._process

    def verify_against_torch(self, index=0):
        return None


def test_cuda_context_arithmetic(monkeypatch):
    """The context is NVML used after the first allocation minus the baseline minus torch's reserved bytes (or
    the per-process NVML figure minus reserved), measured once per process."""
    prof = nvml  # memplan.measure.nvml measures the context

    monkeypatch.setattr(prof, "_CONTEXT_CACHE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**20)
    monkeypatch.setattr(prof, "_touch_cuda", lambda: object())
    monkeypatch.setattr(prof, "_primary_context_exists", lambda index=0: False)
    GiB, MiB = 2**30, 2**20
    ctx, notes = measure_cuda_context(_FakeNvml([1 * GiB, 1 * GiB + 500 * MiB]))
    assert ctx["cuda_context_bytes"] == 498 * MiB and ctx["nvml_baseline_bytes"] == 1 * GiB
    assert ctx["method"].startswith("nvml device used") and not notes
    again, notes = measure_cuda_context(_FakeNvml([0]))
    assert again == ctx and "reused" in notes[0]
    # per-process figure preferred; a context that already existed makes the baseline meaningless
    monkeypatch.setattr(prof, "_CONTEXT_CACHE", {})
    monkeypatch.setattr(prof, "_primary_context_exists", lambda index=0: True)
    ctx, _ = measure_cuda_context(_FakeNvml([3 * GiB], process=600 * MiB))
    assert ctx["cuda_context_bytes"] == 598 * MiB and ctx["nvml_baseline_bytes"] is None
    monkeypatch.setattr(prof, "_CONTEXT_CACHE", {})
    ctx, notes = measure_cuda_context(_FakeNvml([3 * GiB]))
    assert ctx["cuda_context_bytes"] is None and "had a CUDA context" in notes[0]


def test_cuda_phase_statistics(monkeypatch):
    """Per-phase CUDA fields: peaks from memory_stats after reset_peak_memory_stats, counters as increases,
    NVML at the phase end, paged bytes since the run began; the summary takes the maxima."""
    import memplan.measure.recorder as recorder
    from memplan.measure.runs import RunRecord

    stats = {"allocated_bytes.all.peak": 0, "reserved_bytes.all.peak": 0, "active_bytes.all.peak": 0,
             "allocated_bytes.all.current": 0, "reserved_bytes.all.current": 0, "num_alloc_retries": 3,
             "num_ooms": 1}
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(stats))
    monkeypatch.setattr(recorder, "paged_bytes", lambda since=0: 4096 * (since + 1))
    meter = recorder.StepRecorder(device="cuda", track_tensors=False, nvml=_FakeNvml([10_000_000]))
    with meter.phase("forward", 1):
        stats.update({"allocated_bytes.all.peak": 700, "reserved_bytes.all.peak": 2048, "active_bytes.all.peak": 710,
                      "allocated_bytes.all.current": 300, "reserved_bytes.all.current": 2048,
                      "num_alloc_retries": 5})
    (p,) = meter.phases
    assert calls == ["reset"] and p["completed"]
    assert (p["max_allocated_bytes"], p["max_reserved_bytes"], p["max_active_bytes"]) == (700, 2048, 710)
    assert (p["end_allocated_bytes"], p["end_reserved_bytes"]) == (300, 2048)
    assert (p["num_alloc_retries"], p["num_ooms"]) == (2, 0)
    assert p["nvml_used_bytes"] == p["nvml_peak_used_bytes"] == 10_000_000 and p["paged_bytes"] == 4096
    assert p["tensor_peak_bytes"] is None  # no tracker given
    rec = RunRecord(outcome="ok", setup={}, device="cuda")
    meter.summarize(rec, {"cuda_context_bytes": 500, "nvml_baseline_bytes": 7, "method": "m"})
    assert rec.peak["max_reserved_bytes"] == 2048 and rec.peak["nvml_used_bytes"] == 10_000_000
    assert (rec.peak["cuda_context_bytes"], rec.peak["nvml_baseline_bytes"], rec.peak["paged_bytes"]) == (500, 7, 4096)


def test_sweep_rejects_a_bad_setup_before_running(configs, tmp_path):
    from memplan.errors import InvalidSetupError

    with pytest.raises(InvalidSetupError, match="rank"):
        profile_sweep(_setup(configs["tiny-opt"], rank=0), batch_sizes=[1], out_dir=tmp_path, isolate=True)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
