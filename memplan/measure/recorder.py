"""The one recorder of a training run, phase by phase: ``memplan simulate``, ``memplan profile`` and the Trainer
callback all measure through ``StepRecorder``.

Per phase (``load``, then ``forward`` / ``backward`` / ``optimizer_step`` of every step) it collects:

- **tensor level** (``tensor_peak_bytes``, every device): ``memplan.measure.tracker.MemoryTracker``, exact and
  deterministic (on CUDA it rounds every storage to 512 bytes, as the caching allocator does). Process RSS is
  useless for this and is not recorded;
- **CUDA allocator** (CUDA runs): ``torch.cuda.reset_peak_memory_stats()`` before the phase, then
  ``memory_stats()``: ``allocated_bytes.all.peak`` (= ``max_memory_allocated``), ``reserved_bytes.all.peak``,
  ``active_bytes.all.peak``, and the increase of ``num_alloc_retries`` (the allocator had to free its cache
  and retry: fragmentation pressure) and ``num_ooms``;
- **NVML** (CUDA runs): device memory at the phase end and the highest 5 ms sample during it
  (``memplan.measure.nvml``), and the bytes of bitsandbytes' paged (managed) memory created since the start.

With ``tensor_budget_bytes`` a phase whose tensor peak exceeds it ends the run as an out-of-memory error: a CPU
run standing in for a smaller card. ``summarize`` turns the phases and the tracker's result into a run
record's ``phases`` and ``peak``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from memplan.plan.breakdown import ParamCounts
from memplan.units import format_bytes

from .nvml import NvmlReader, NvmlSampler, paged_bytes
from .quantize import quant_state_tensors
from .runs import RunRecord
from .tracker import MemoryTracker

__all__ = ["StepRecorder", "ModelCounts", "model_counts", "is_oom_error", "record_failure", "keep_warnings"]

# Messages of CPU allocation failures (c10/core/impl/alloc_cpu.cpp: "DefaultCPUAllocator: can't allocate
# memory: you tried to allocate N bytes") and of CUDA ones that arrive as plain RuntimeError (cuBLAS / cuDNN
# workspace allocation, bitsandbytes' own cudaMalloc checks).
_OOM_MESSAGES = ("can't allocate memory", "could not allocate", "cannot allocate memory", "out of memory",
                 "not enough memory", "cublas_status_alloc_failed")


def is_oom_error(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (= ``torch.cuda.OutOfMemoryError``), a ``MemoryError``, or a RuntimeError whose
    message says an allocation failed (the CPU allocator raises plain RuntimeError)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a built model in logical values (a 4-bit weight is one value although two share a
    byte) and its storage bytes."""

    base_total: int  # the base model's parameters, as ModelSpec.total_params counts them
    adapter: int  # LoRA parameters (trainable, not part of the base model)
    trainable: int
    quantized: int  # values stored by bitsandbytes in 4/8 bits
    param_bytes: int
    buffer_bytes: int

    def param_counts(self) -> ParamCounts:
        return ParamCounts(total=self.base_total, trainable=self.trainable, quantized=self.quantized)

    def record_fields(self) -> dict:
        """The ``model`` block of a run record."""
        return {"params_total": self.base_total + self.adapter, "params_trainable": self.trainable,
                "params_quantized": self.quantized, "param_bytes": self.param_bytes,
                "buffer_bytes": self.buffer_bytes}


def _quantized_parts(model) -> tuple[dict[int, object], list]:
    """(id of each bitsandbytes layer's weight -> the weight, the layers' quantization-constant tensors), for real
    bitsandbytes weights (``Params4bit`` / ``Int8Params``) and for the fake stand-ins of ``memplan.measure.quantize``
    alike: both sit in ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` modules."""
    import sys

    if "bitsandbytes" not in sys.modules:  # no bitsandbytes imported: no bitsandbytes layer exists
        return {}, []
    import bitsandbytes as bnb
    import torch

    weights: dict[int, object] = {}
    constants: list = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            weights[id(m.weight)] = m.weight
            constants += quant_state_tensors(getattr(m.weight, "quant_state", None) or getattr(m, "quant_state", None))
        elif isinstance(m, bnb.nn.Linear8bitLt):
            weights[id(m.weight)] = m.weight
            # Int8Params keeps its row scales (SCB); the matmul state takes CB / SCB over on the first forward
            for t in (getattr(m.weight, "SCB", None), getattr(m.state, "SCB", None), getattr(m.state, "CB", None)):
                if isinstance(t, torch.Tensor):
                    constants.append(t)
    return weights, constants


def _logical_numel(p) -> int:
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None) if qs is not None else None
    return int(shape.numel()) if shape is not None else p.numel()


def model_counts(model) -> ModelCounts:
    """Parameter counts and bytes of a built or live model (tied weights count once)."""
    quantized_weights, _ = _quantized_parts(model)
    lora = bool(getattr(model, "peft_config", None))
    base = adapter = trainable = quantized = param_bytes = 0
    for p in model.parameters():
        param_bytes += p.untyped_storage().nbytes()
        if id(p) in quantized_weights:
            n = _logical_numel(p)
            base += n
            quantized += n
            continue
        n = p.numel()
        if p.requires_grad:
            trainable += n
            if lora:
                adapter += n
                continue
        base += n
    buffer_bytes = sum(b.untyped_storage().nbytes() for b in model.buffers())
    return ModelCounts(base, adapter, trainable, quantized, param_bytes, buffer_bytes)


# ------------------------------------------------------------------------------------------------ the recorder
class StepRecorder:
    """Measures a run phase by phase (module docstring). Use it as a context manager around the steps (the
    tracker follows every tensor while it is entered) and ``phase(name, step)`` around each phase.

    Args:
        device: "cpu" or "cuda" (the CUDA collectors run for "cuda" only).
        vocab_size: lets the tracker tell logits from other activations.
        round_to: the tracker's block size (512 for CUDA, or CUDA semantics on fake tensors; 1 on a CPU).
        track_tensors: keep the exact tensor-level tracker (a Python call per aten op).
        nvml / sampler: NVML readings of a CUDA run (``memplan.measure.nvml``).
        paged_start: ``paged_count()`` before the run: later entries are this run's paged memory.
        tensor_budget_bytes: an emulated card (see the module docstring).
        on_phase: called with (name, step) as each phase begins (``memplan.measure.profile.RunControl``).
    """

    def __init__(self, *, device: str = "cpu", vocab_size: int | None = None, round_to: int = 1,
                 track_tensors: bool = True, nvml: NvmlReader | None = None, sampler: NvmlSampler | None = None,
                 paged_start: int = 0, tensor_budget_bytes: int | None = None,
                 on_phase: Callable[[str, int | None], None] | None = None):
        self.device = device
        self.tracker = MemoryTracker(round_to=round_to, vocab_size=vocab_size) if track_tensors else None
        self.nvml, self.sampler = nvml, sampler
        self.paged_start = paged_start
        self.budget = tensor_budget_bytes
        self.on_phase = on_phase  # called as each phase begins (progress; it may raise to stop the run)
        self.phases: list[dict] = []
        self.failed_at: tuple[str, int | None] | None = None
        self.notes: list[str] = []
        self._cuda_broken = False

    # -- what to follow ----------------------------------------------------------------------------------
    def register_model(self, model) -> ModelCounts:
        """Tell the tracker what the model holds: float weights, packed 4/8-bit weights, their quantization
        constants, LoRA parameters (the trainable ones of a peft model) and buffers; returns its counts."""
        counts = model_counts(model)
        if self.tracker is None:
            return counts
        quantized_weights, constants = _quantized_parts(model)
        lora = bool(getattr(model, "peft_config", None))
        for p in model.parameters():
            if id(p) in quantized_weights:
                self.tracker.register(p, "quantized_weights")
            elif p.requires_grad and lora:
                self.tracker.register(p, "lora_params")
            else:
                self.tracker.register(p, "weights")
        for b in model.buffers():
            self.tracker.register(b, "weights")
        for t in constants:
            self.tracker.register(t, "quant_constants")
        return counts

    def register_inputs(self, batch: dict) -> None:
        if self.tracker is not None:
            for t in batch.values():
                self.tracker.register(t, "inputs")

    def watch(self, trainable=(), optimizer=None) -> None:
        """Classify the ``.grad`` of ``trainable`` as gradients and ``optimizer``'s state as optimizer state."""
        if self.tracker is None:
            return
        self.tracker.watch_gradients(trainable)
        if optimizer is not None:
            self.tracker.watch_optimizer(optimizer)

    def __enter__(self):
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tracker is not None:
            return self.tracker.__exit__(*exc)
        return False

    # -- CUDA allocator ----------------------------------------------------------------------------------
    def _cuda_begin(self) -> dict:
        if self.device != "cuda" or self._cuda_broken:
            return {}
        try:
            import torch

            torch.cuda.synchronize(0)
            torch.cuda.reset_peak_memory_stats(0)
            s = torch.cuda.memory_stats(0)
            return {"retries": s.get("num_alloc_retries", 0), "ooms": s.get("num_ooms", 0)}
        except Exception as exc:  # noqa: BLE001 - a collector must never crash the run
            self._cuda_broken = True
            self.notes.append(f"CUDA allocator statistics unavailable: {type(exc).__name__}: {exc}")
            return {}

    def _cuda_end(self, entry: dict, before: dict) -> None:
        if self.device != "cuda" or self._cuda_broken:
            return
        try:
            import torch

            try:
                torch.cuda.synchronize(0)
            except Exception:  # noqa: BLE001 - after a failed kernel; the counters are still readable
                pass
            s = torch.cuda.memory_stats(0)
            entry.update(
                max_allocated_bytes=s.get("allocated_bytes.all.peak"),
                max_reserved_bytes=s.get("reserved_bytes.all.peak"),
                max_active_bytes=s.get("active_bytes.all.peak"),
                end_allocated_bytes=s.get("allocated_bytes.all.current"),
                end_reserved_bytes=s.get("reserved_bytes.all.current"),
                num_alloc_retries=s.get("num_alloc_retries", 0) - before.get("retries", 0),
                num_ooms=s.get("num_ooms", 0) - before.get("ooms", 0),
            )
        except Exception as exc:  # noqa: BLE001
            self._cuda_broken = True
            self.notes.append(f"CUDA allocator statistics unavailable: {type(exc).__name__}: {exc}")

    # -- one phase ---------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, step: int | None):
        if self.on_phase is not None:
            try:
                self.on_phase(name, step)
            except BaseException:  # asked to stop before this phase: the record says where
                self.failed_at = (name, step)
                raise
        entry: dict = {"name": name, "step": step, "completed": False, "seconds": None,
                       "tensor_peak_bytes": None, "tensor_end_bytes": None,
                       "max_allocated_bytes": None, "max_reserved_bytes": None, "max_active_bytes": None,
                       "end_allocated_bytes": None, "end_reserved_bytes": None,
                       "num_alloc_retries": None, "num_ooms": None,
                       "nvml_used_bytes": None, "nvml_peak_used_bytes": None, "paged_bytes": None}
        before = self._cuda_begin()
        if self.sampler is not None:
            self.sampler.window()  # drop what the previous phase saw
        if self.tracker is not None:
            self.tracker.start_window()
        tracker_phase = self.tracker.phase(name) if (self.tracker is not None and name != "load") else nullcontext()
        t0 = time.perf_counter()
        try:
            with tracker_phase:
                yield entry
            entry["completed"] = True
        except BaseException:
            self.failed_at = (name, step)
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 6)
            self._cuda_end(entry, before)
            if self.tracker is not None:
                entry["tensor_peak_bytes"] = self.tracker.window_peak_bytes
                entry["tensor_end_bytes"] = self.tracker.current_bytes
            if self.device == "cuda":
                used = self.nvml.used() if self.nvml is not None else None
                entry["nvml_used_bytes"] = used
                entry["nvml_peak_used_bytes"] = self.sampler.window(used) if self.sampler is not None else used
                entry["paged_bytes"] = paged_bytes(self.paged_start)
            self.phases.append(entry)
        self._check_budget(entry)

    def _check_budget(self, entry: dict) -> None:
        """Emulated out-of-memory: a tensor-level budget (CPU runs standing in for a smaller card)."""
        peak = entry.get("tensor_peak_bytes")
        if self.budget is not None and peak is not None and peak > self.budget:
            import torch

            self.failed_at = (entry["name"], entry["step"])
            raise torch.OutOfMemoryError(
                f"emulated out of memory: the tensor peak of {entry['name']} ({format_bytes(peak)}) exceeds the "
                f"budget of {format_bytes(self.budget)} (tensor_budget_bytes)")

    # -- the record --------------------------------------------------------------------------------------
    def summarize(self, record: RunRecord, context: dict | None = None) -> None:
        """Fill ``record.phases`` and ``record.peak`` from the phases and the tracker's result."""
        context = context or {}
        peak: dict = {"tensor_peak_bytes": None, "peak_phase": None, "peak_step": None,
                      "peak_estimate_phase": None, "components": None, "estimate_phase_peaks": None,
                      "final_bytes": None, "max_allocated_bytes": None, "max_reserved_bytes": None,
                      "max_active_bytes": None, "nvml_used_bytes": None,
                      "nvml_baseline_bytes": context.get("nvml_baseline_bytes"),
                      "cuda_context_bytes": context.get("cuda_context_bytes"),
                      "cuda_context_method": context.get("method"), "paged_bytes": None}
        phases = self.phases
        record.phases = phases
        if self.tracker is not None:
            try:
                res = self.tracker.result()
                peak.update(tensor_peak_bytes=res.peak_bytes, peak_phase=res.peak_phase, peak_step=res.peak_step,
                            peak_estimate_phase=res.peak_estimate_phase or None,
                            components=dict(res.peak_components), estimate_phase_peaks=dict(res.estimate_phase_peaks),
                            final_bytes=res.final_bytes)
            except Exception as exc:  # noqa: BLE001
                record.notes.append(f"tracker result unavailable: {type(exc).__name__}: {exc}")
        # the phase entry holding the tensor peak (by value): a clearer "where" than the tracker's phase name
        tp = [p for p in phases if p.get("tensor_peak_bytes") is not None]
        if tp and peak["tensor_peak_bytes"] is not None:
            best = max(tp, key=lambda p: p["tensor_peak_bytes"])
            if best["tensor_peak_bytes"] == peak["tensor_peak_bytes"]:
                peak["peak_phase"], peak["peak_step"] = best["name"], best["step"]

        def highest(key):
            vals = [p[key] for p in phases if p.get(key) is not None]
            return max(vals) if vals else None

        peak["max_allocated_bytes"] = highest("max_allocated_bytes")
        peak["max_reserved_bytes"] = highest("max_reserved_bytes")
        peak["max_active_bytes"] = highest("max_active_bytes")
        peak["nvml_used_bytes"] = highest("nvml_peak_used_bytes") or highest("nvml_used_bytes")
        peak["paged_bytes"] = highest("paged_bytes")
        record.peak = peak


def record_failure(record: RunRecord, recorder: StepRecorder | None, outcome: str, exc: BaseException) -> None:
    """Put an exception that ended a run into its record (outcome, message, phase and step; a traceback tail
    for unexpected errors), and release the step's tensors that the traceback's frames hold."""
    record.outcome = outcome
    record.error = str(exc) or type(exc).__name__
    record.error_type = type(exc).__name__
    if recorder is not None and recorder.failed_at is not None:
        record.error_phase, record.error_step = recorder.failed_at
    if outcome == "error":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        record.extra["traceback"] = tb[-4000:]
    # Frames in the traceback hold the step's tensors (activations, logits): drop them so memory is released.
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)


def keep_warnings(caught, notes: list[str], limit: int = 8) -> None:
    """Add the first ``limit`` distinct warnings a run raised to its notes."""
    seen = set()
    for w in caught:
        msg = f"warning: {w.category.__name__}: {str(w.message).strip().splitlines()[0][:240]}"
        if msg not in seen and len(seen) < limit:
            seen.add(msg)
            notes.append(msg)
