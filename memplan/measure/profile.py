"""``memplan profile``: instrumented real training runs, recorded as ``RunRecord``s (``memplan.measure.runs``).

``profile_run`` builds the model a user's training script would (``memplan.measure.build``, the builder
``simulate`` uses, with random values), runs real training steps through the shared loop
(``memplan.measure.step``) and records per-phase peaks with ``memplan.measure.recorder.StepRecorder``: the exact
tensor-level peak on every device, and on CUDA the allocator's peaks, retries and OOMs, NVML device memory and
bitsandbytes' paged memory (``memplan.measure.nvml`` explains what each sees). The CUDA context is measured once
per process, before the first tensor (``measure_cuda_context``). The model is built inside the ``load`` phase, so
its tensor figures are what is alive after loading; load-time transients are seen only by the CUDA allocator
counters.

An out-of-memory error is a result, not a failure: the record gets outcome ``"oom"``, the phase and step it
happened in, and everything measured until then. Any other exception gives outcome ``"error"`` (still a
record). Ctrl-C gives a record with outcome ``"interrupted"`` carried by ``RunInterrupted`` (a
``KeyboardInterrupt``). Sweeps over batch sizes are ``memplan.measure.sweep``.

Heavy imports (torch, transformers, peft, bitsandbytes, pynvml) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import warnings
from collections.abc import Callable

from memplan.errors import MemplanError

from .runs import RunRecord, save_run

__all__ = ["ProfileError", "RunInterrupted", "RunControl", "profile_run", "check_profile_args",
           "resolve_for_device", "cpu_has_native_bf16"]


class ProfileError(MemplanError):
    """A profile that cannot start: no CUDA device, a bad argument."""


class RunControl:
    """A caller's handle on a long run: ``say(text)`` gets progress lines; setting ``stop`` asks the run to end
    at its next phase boundary (a ``KeyboardInterrupt`` there); the run publishes its ``record`` and
    ``recorder`` here, so that a caller whose run is stuck inside one long kernel can still save what was
    measured (``salvage``) instead of waiting for it."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda text: None)
        self.stop = threading.Event()
        self.record: RunRecord | None = None
        self.recorder = None
        self.phase: tuple[str, int | None] | None = None  # the phase in progress

    def entering(self, name: str, step: int | None) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.phase = (name, step)

    def salvage(self) -> RunRecord | None:
        """The run as measured so far, outcome ``interrupted`` (None before it began)."""
        record, recorder = self.record, self.recorder
        if record is None:
            return None
        record.outcome, record.error, record.error_type = "interrupted", "interrupted", "KeyboardInterrupt"
        if self.phase is not None:
            record.error_phase, record.error_step = self.phase
        record.notes.append("interrupted inside a phase that did not return within 2 s of Ctrl-C: the figures "
                            "are those of the phases that completed")
        if recorder is not None:
            recorder.summarize(record)
        return record


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``profile_run``; ``record`` is the run with outcome ``"interrupted"`` and the phases
    measured so far. It is a ``KeyboardInterrupt``, so callers that only know that still stop."""

    def __init__(self, record: RunRecord):
        super().__init__("interrupted")
        self.record = record


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, Linux ``/proc/cpuinfo`` flags). Without
    them torch emulates bf16 matmuls, about 45x slower than fp32 on an AVX2 CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_for_device(setup, device: str, profiles_dir=None):
    """(spec, resolved setup, notes) for a run on ``device``: on CUDA the local card decides the dtype defaults;
    on a CPU the default is fp32 unless it multiplies bf16 natively."""
    from memplan.catalog.gpus import detect_local_gpu
    from memplan.catalog.models import load_model
    from memplan.plan.setup import resolve_setup
    from memplan.plan.versions import check_installed

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu = None
    if device == "cuda":
        gpu = detect_local_gpu(profiles_dir=profiles_dir)
        if gpu is None and setup.dtype is None and setup.bits != 32:
            import torch  # no NVML: ask torch whether the card does bf16

            setup = setup.with_(dtype="bf16" if torch.cuda.is_bf16_supported() else "fp16")
    notes: list[str] = []
    if device == "cpu" and setup.dtype is None:
        if cpu_has_native_bf16():
            notes.append("dtype bf16: this CPU multiplies bf16 natively (avx512_bf16 / amx_bf16)")
        else:
            setup = setup.with_(dtype="fp32", autocast="off" if setup.autocast is None else setup.autocast)
            notes.append("dtype fp32, no autocast: this CPU has no native bf16 matmul (no avx512_bf16 / amx_bf16 "
                         "flag), where bf16 runs ~45x slower; --dtype bf16 (--autocast bf16) to force it")
    resolved = resolve_setup(setup, spec, gpu)
    check_installed(resolved.versions, "memplan profile")  # it runs the installed libraries (memplan.plan.versions)
    if device == "cpu":
        resolved = resolved.with_(gpu=None)
    return spec, resolved, notes


def check_profile_args(device: str, steps: int, gpu_memory_fraction, tensor_budget_bytes) -> None:
    """``ProfileError`` for arguments a run cannot start with (checked before anything is built)."""
    if device not in ("cpu", "cuda"):
        raise ProfileError(f"invalid device {device!r}; allowed: cpu, cuda")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ProfileError(f"invalid steps {steps!r}; must be an integer >= 1")
    if gpu_memory_fraction is not None:
        if device != "cuda":
            raise ProfileError("the GPU memory fraction (gpu_memory_fraction / --memory-fraction) applies to "
                               "device cuda only; on cpu, tensor_budget_bytes emulates a smaller card")
        if not 0.0 < float(gpu_memory_fraction) <= 1.0:
            raise ProfileError(f"invalid gpu_memory_fraction {gpu_memory_fraction!r}; must be in (0, 1]")
    if tensor_budget_bytes is not None and (not isinstance(tensor_budget_bytes, int) or tensor_budget_bytes < 1):
        raise ProfileError(f"invalid tensor_budget_bytes {tensor_budget_bytes!r}; must be a positive integer")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch finds no usable CUDA device")
            raise ProfileError(f"device cuda requested but {why} (torch {torch.__version__}); use --device cpu")



def profile_run(setup, *, device: str = "cpu", steps: int = 3, gpu_memory_fraction: float | None = None,
                tensor_budget_bytes: int | None = None, profiles_dir=None, seed: int = 0,
                out_dir: str | os.PathLike | None = None, control: RunControl | None = None) -> RunRecord:
    """Run ``steps`` real training steps of ``setup`` on ``device`` and return the record.

    ``setup`` is a ``TrainSetup`` (resolved here: bad values raise ``InvalidSetupError`` before anything runs).
    ``gpu_memory_fraction`` caps the CUDA caching allocator (``torch.cuda.set_per_process_memory_fraction``) to
    emulate a smaller card. ``tensor_budget_bytes`` emulates a card on any device: a phase whose tracked tensor
    peak exceeds it ends the run as an out-of-memory result (checked at the end of each phase).
    With ``out_dir`` the record is also saved there (atomically), whatever the outcome, interrupted included.
    ``control`` (a ``RunControl``) gets progress lines and can stop the run between phases.

    Raises ``ProfileError`` for arguments that cannot run (device cuda without CUDA), ``RunInterrupted`` (a
    KeyboardInterrupt carrying the partial record) on Ctrl-C. Out of memory and other failures are returned as
    records with outcome ``"oom"`` / ``"error"``.
    """
    check_profile_args(device, steps, gpu_memory_fraction, tensor_budget_bytes)
    spec, resolved, dtype_notes = resolve_for_device(setup, device, profiles_dir)
    t_start = time.perf_counter()
    control = control or RunControl()

    import torch

    from memplan.units import format_gib

    from .autocast import autocast_for
    from .build import build_training_model
    from .environment import collect_environment
    from .nvml import NvmlReader, NvmlSampler, measure_cuda_context, paged_count
    from .optimizer import make_optimizer
    from .recorder import StepRecorder, is_oom_error, keep_warnings, record_failure
    from .dist_profile import check_profilable, ddp_wrap, launched, local_device, rank_group, record_rank, wrap_rank
    from .step import run_steps

    record = RunRecord(outcome="ok", setup=resolved.to_dict(), device=device, steps=steps)
    record.model = {"name": spec.name, "model_type": spec.model_type, "hf_id": spec.hf_id}
    notes = record.notes
    notes += dtype_notes
    control.record = record
    for n in dtype_notes:
        control.say(n)
    nvml = sampler = None
    context: dict = {}
    rec = model = opt = trainable = None
    interrupted: BaseException | None = None
    ranked = launched()  # one rank of several, started by launch_ranks (memplan.measure.dist_profile)
    engine = contextlib.ExitStack()
    if ranked:
        check_profilable(resolved)
        engine.enter_context(rank_group(device))
    run_device = local_device(device) if ranked else ("cuda:0" if device == "cuda" else "cpu")
    try:
        if device == "cuda":
            nvml = NvmlReader()
            context, ctx_notes = measure_cuda_context(nvml)  # first: before any tensor of ours
            notes += ctx_notes
            if gpu_memory_fraction is not None:
                torch.cuda.set_per_process_memory_fraction(float(gpu_memory_fraction), 0)
                notes.append(f"CUDA caching allocator capped at {gpu_memory_fraction} of the card")
            gc.collect()
            torch.cuda.empty_cache()
            if nvml.ok:
                sampler = NvmlSampler(nvml)
            else:
                notes.append(f"NVML readings unavailable: {nvml.error}")
        record.environment, env_notes = collect_environment(device, nvml)
        notes += env_notes
        if ranked:
            record_rank(record)
        _device_notes(resolved, device, notes)

        rec = StepRecorder(device=device, vocab_size=spec.vocab_size, round_to=512 if device == "cuda" else 1,
                           nvml=nvml, sampler=sampler, paged_start=paged_count(),
                           tensor_budget_bytes=tensor_budget_bytes, on_phase=control.entering)
        control.recorder = rec
        control.say(f"building {spec.name} on {device} ({resolved.bits}-bit, {resolved.dtype}, batch "
                    f"{resolved.batch_size} x {resolved.seq_len} tokens)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with rec.phase("load", None):
                    model, info = build_training_model(spec, resolved, device=run_device, seed=seed)
                    notes += [n for n in info.notes if not n.startswith("int8:")]  # _device_notes says it
                    if ranked:  # FSDP2 shards before the recorder registers what this rank holds
                        model, tracking = wrap_rank(model, spec, resolved, run_device, [rec.tracker])
                        engine.enter_context(tracking)
                    record.model.update(rec.register_model(model).record_fields(),
                                        spec_params_total=spec.total_params())
                trainable = [p for p in model.parameters() if p.requires_grad]
                opt = make_optimizer(resolved, trainable)  # what the HF Trainer builds for this optim
                rec.watch(trainable, opt)
                autocast = autocast_for(resolved, device)
                torch.manual_seed(seed + 2)  # the batches' token ids (values do not change memory)

                control.say(f"built in {time.perf_counter() - t_start:.1f} s; running {steps} step(s)")

                def completed(step: int) -> None:
                    record.steps_completed = step
                    done = [p for p in rec.phases if p["step"] == step]
                    peak = max((p["tensor_peak_bytes"] or 0 for p in done), default=0)
                    control.say(f"step {step}/{steps} done in {sum(p['seconds'] for p in done):.1f} s "
                                f"(tensor peak {format_gib(peak, 2)})")

                with rec:
                    if ranked and resolved.strategy == "ddp":  # its gradient buckets are allocated as it wraps
                        with rec.tracker.tagged("comm_buffers"):
                            model = ddp_wrap(model, run_device, rec.tracker)
                    run_steps(model, opt, rec, spec, resolved, steps=steps, device=run_device, autocast=autocast,
                              on_step=completed)
            finally:
                keep_warnings(caught, notes)
    except KeyboardInterrupt as exc:
        interrupted = exc
        record_failure(record, rec, "interrupted", exc)
    except Exception as exc:  # noqa: BLE001 - every failure of the run is a result
        record_failure(record, rec, "oom" if is_oom_error(exc) else "error", exc)
    finally:
        try:
            if sampler is not None:
                sampler.stop()
            if rec is not None:
                notes += [n for n in rec.notes if n not in notes]
                rec.summarize(record, context)
            else:
                StepRecorder(track_tensors=False).summarize(record, context)
            record.wall_seconds = round(time.perf_counter() - t_start, 3)
        finally:
            # drop every reference to the model's tensors before releasing cached memory (a sweep's next run)
            del model, opt, trainable
            rec = None
            _release_memory(device)
            if gpu_memory_fraction is not None:
                try:  # the cap is process-wide: lift it so that a later run in this process is not limited
                    torch.cuda.set_per_process_memory_fraction(1.0, 0)
                except Exception:  # noqa: BLE001
                    pass
            if nvml is not None:
                nvml.close()
            engine.close()
    if out_dir is not None:
        save_run(record, out_dir)
    if interrupted is not None:
        raise RunInterrupted(record) from interrupted
    return record


def _device_notes(setup, device: str, notes: list[str]) -> None:
    from memplan.plan.optimizers import resolve_optimizer

    if device == "cpu":
        notes.append("CPU run: tensor-level peak only (no CUDA context, allocator rounding or reserved memory)")
        if setup.bits == 8:
            notes.append("CPU int8: bitsandbytes trains Linear8bitLt through MatMul8bitFp (dequantize + float "
                         "matmul), not the CUDA MatMul8bitLt path; not representative of a GPU")
        if resolve_optimizer(setup.optimizer).paged:
            notes.append("paged optimizer on CPU: bitsandbytes falls back to ordinary tensors (counted by the "
                         "tracker); paged_bytes is null")
        notes.append("CUDA collectors (allocator statistics, NVML, paged memory) not used on CPU: fields are null")
        if setup.autocast not in (None, "off"):
            notes.append(f"autocast {setup.autocast} on CPU runs CPU autocast's op lists, not CUDA's (layer_norm, "
                         f"softmax and the losses stay in the input dtype): memplan simulate reproduces CUDA's")
    elif resolve_optimizer(setup.optimizer).paged:
        notes.append("paged optimizer: state of parameters with >= 1e5 values is CUDA managed memory (paged_bytes); "
                     "torch's allocator does not count it, NVML does while it is resident; the tracker counts it "
                     "as a CPU storage")


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        try:
            import torch

            torch.cuda.synchronize(0)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

