"""``MemplanCallback``: memplan inside a transformers ``Trainer``.

    from memplan.integrations import MemplanCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[MemplanCallback(seq_len=2048, record_dir="profiles/runs")])
    trainer.train()

At ``on_train_begin`` it runs ``memplan.preflight`` on the model and ``TrainingArguments`` the Trainer hands
it (with the callback's ``seq_len`` / ``gpu`` / ``budget_bytes`` / ``strict``): a run that will not fit stops
there with ``WontFitError``, before the first step.

With ``record_dir`` (opt-in) it also measures the run and writes one run record in ``memplan profile``'s
format (``memplan.measure.runs``, schema 1) when training ends, so every real training run becomes validation data for
``memplan validate``. The folder is created and checked at ``on_train_begin``, before the first step: one that is
a file or cannot be written is a ``ConfigError`` there, not after the run. What it records:

- phases per optimizer step, as ``memplan profile`` names them: ``forward`` (the model's forward: a forward
  pre-hook and hook on the model, training mode only, so evaluation is not counted), ``backward`` (from the end
  of the forward to ``on_pre_optimizer_step``; with gradient accumulation one forward / backward pair per
  micro-batch) and ``optimizer_step`` (to ``on_step_end``: the Trainer's zero_grad is inside it);
- on CUDA: the allocator's peaks (``max_memory_allocated`` / reserved / active), retries and OOM counts per
  phase, and NVML device memory; on CPU (and on CUDA with ``track_tensors=True``, which costs a Python call
  per aten op) the tensor-level peak of ``memplan.measure.tracker.MemoryTracker`` with its per-component breakdown;
- an out-of-memory error is a result: the Trainer does not call callbacks on exceptions, so the callback
  chains ``sys.excepthook`` while training (an uncaught ``torch.OutOfMemoryError`` is recorded as outcome
  ``oom``, Ctrl-C as ``interrupted``, anything else as ``error``, then the previous hook runs) and offers
  ``with callback.guard(): trainer.train()`` for code that catches exceptions itself (notebooks, sweeps).
  The record is written atomically; one run writes at most one record.

The preflight estimate is kept in the record (``preflight_estimate``) so that ``memplan validate`` and a reader
can see estimate ÷ measured directly. Importing this module imports transformers (for ``TrainerCallback``).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from transformers import TrainerCallback

from memplan.errors import ConfigError, MemplanError
from memplan.fileio import prepare_output_dir
from memplan.measure.runs import RunRecord, save_run
from memplan.plan.setup import describe_setup
from memplan.units import GiB, format_bytes, format_gib

__all__ = ["MemplanCallback"]


class MemplanCallback(TrainerCallback):
    """Pre-flight check at ``on_train_begin``; with ``record_dir``, a run record at the end (module docstring).

    ``seq_len``: the longest sequence the collator makes (memplan's default 512 otherwise, with a note);
    ``gpu`` / ``budget_bytes`` / ``headroom`` / ``strict``: as ``memplan.preflight``; ``setup_fields``: any
    other ``TrainSetup`` field to override (``attn="flash_attention_2"``, ...).
    """

    def __init__(self, *, seq_len: int | None = None, gpu=None, budget_bytes: int | None = None,
                 headroom: float | None = None, strict: bool = True, record_dir=None,
                 track_tensors: bool | None = None, profiles_dir=None, verbose: bool = True, **setup_fields):
        self.seq_len = seq_len
        self.gpu = gpu
        self.budget_bytes = budget_bytes
        self.headroom = headroom
        self.strict = strict
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.track_tensors = track_tensors
        self.profiles_dir = profiles_dir
        self.setup_fields = setup_fields
        self.verbose = verbose  # one line on stderr at the start (the plan) and the end (the record)
        self.estimate = None  # the preflight Estimate, once training began
        self.record: RunRecord | None = None  # the run record, once written
        self.record_path: Path | None = None
        self._run: _Recording | None = None
        self._prev_excepthook = None

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .preflight import check

        if model is None:
            raise MemplanError("MemplanCallback: the Trainer passed no model to on_train_begin")
        checked = check(model, training_args=args, seq_len=self.seq_len, gpu=self.gpu,
                        budget_bytes=self.budget_bytes, headroom=self.headroom, strict=self.strict,
                        profiles_dir=self.profiles_dir, **self.setup_fields)
        self.estimate = checked.estimate
        if self.verbose:
            e, budget = self.estimate, checked.budget
            if budget is None:
                verdict = "not checked (no device and no gpu= or budget_bytes=)"
            elif budget.fits(e.total_bytes):
                verdict = f"fits the {budget.describe()}, {format_gib(-budget.shortfall(e.total_bytes), 2)} to spare"
            else:
                verdict = f"does NOT fit the {budget.describe()}: {format_gib(budget.shortfall(e.total_bytes), 2)} over"
            self._say(f"estimated peak {format_gib(e.total_bytes, 2)} at {e.peak_phase.replace('_', ' ')} {verdict}; "
                      f"plan: {describe_setup(e.setup)}")
        if self.record_dir is not None:
            self._prepare_record_dir()  # now, not when training is over and the record cannot be written
            self._run = _Recording(self, model, args)
            self._run.start()
            self._run.watch_optimizer(kwargs.get("optimizer"))
            self._prev_excepthook = sys.excepthook
            sys.excepthook = self._excepthook

    def _prepare_record_dir(self) -> None:
        """Create ``record_dir`` and check that it is a folder this process can write into (ConfigError)."""
        where = f"MemplanCallback(record_dir={str(self.record_dir)!r})"
        if self.record_dir.exists() and not self.record_dir.is_dir():
            raise ConfigError(f"{where}: is a file, not a folder; give record_dir the folder to write run records in")
        try:
            self.record_dir = prepare_output_dir(self.record_dir)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.step = state.global_step + 1
            self._run.watch_optimizer(kwargs.get("optimizer"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.enter("optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.close_phase()
            self._run.steps_completed = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._run is not None:
            self._run.steps_completed = state.global_step
            self._finish("ok", None)

    # ------------------------------------------------------------------ failures
    @contextmanager
    def guard(self):
        """``with callback.guard(): trainer.train()``: record an exception (OOM, Ctrl-C, other) that escapes
        training, then re-raise it."""
        try:
            yield self
        except BaseException as exc:
            self._record_exception(exc)
            raise

    def _excepthook(self, exc_type, exc, tb):
        try:
            self._record_exception(exc)
        finally:
            prev = self._prev_excepthook or sys.__excepthook__
            prev(exc_type, exc, tb)

    def _record_exception(self, exc: BaseException) -> None:
        if self._run is None:
            return
        from memplan.measure.recorder import is_oom_error

        if isinstance(exc, KeyboardInterrupt):
            outcome = "interrupted"
        else:
            outcome = "oom" if is_oom_error(exc) else "error"
        self._finish(outcome, exc)

    def _finish(self, outcome: str, exc: BaseException | None) -> None:
        run, self._run = self._run, None
        if self._prev_excepthook is not None and sys.excepthook == self._excepthook:
            sys.excepthook = self._prev_excepthook
        self._prev_excepthook = None
        if run is None:
            return
        self.record = run.finish(outcome, exc)
        self.record_path = save_run(self.record, self.record_dir)
        if self.verbose:
            peak = self.record.peak or {}
            measured = ", ".join(f"{label} {_size(peak[key])}" for key, label in (
                ("max_reserved_bytes", "peak reserved"), ("max_allocated_bytes", "peak allocated"),
                ("tensor_peak_bytes", "tensor peak")) if peak.get(key))
            self._say(f"run record ({outcome}) {self.record_path}: {measured or 'no peak measured'}")

    @staticmethod
    def _say(text: str) -> None:
        print(f"memplan: {text}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    """``12.34 GiB``; below 0.01 GiB (a tiny model on the CPU) ``3.2 MiB``, not ``0.00 GiB``."""
    return format_gib(n, 2) if n >= GiB // 100 else format_bytes(n)


class _Recording:
    """The measurement of one Trainer run (see the module docstring), through ``memplan.measure``'s
    ``StepRecorder``: the recorder ``memplan profile`` and ``memplan simulate`` use."""

    def __init__(self, callback: MemplanCallback, model, args):
        self.cb = callback
        self.model = model
        self.args = args
        self.step = 0
        self.steps_completed = 0
        self._stack: ExitStack | None = None
        self._phase: str | None = None
        self._hooks: list = []
        self._optimizer_watched = False
        self._t0 = time.perf_counter()

    def start(self) -> None:
        from memplan.catalog.models import spec_from_config
        from memplan.measure.environment import collect_environment
        from memplan.measure.nvml import NvmlReader, paged_count
        from memplan.measure.recorder import StepRecorder

        from .live_model import read_live_model

        info = read_live_model(self.model)
        device = "cuda" if (info.device or "").startswith("cuda") else "cpu"
        spec = spec_from_config(info.config, name=info.name)
        est = self.cb.estimate
        self.record = RunRecord(outcome="ok", setup=est.setup.to_dict(), device=device,
                                steps=int(getattr(self.args, "max_steps", 0) or 0))
        self.record.model = {"name": spec.name, "model_type": spec.model_type, "hf_id": spec.hf_id}
        self.record.notes.append("recorded by memplan.integrations.MemplanCallback during a transformers Trainer run")
        # validate rebuilds the spec from it (JSON-safe: configs may hold torch dtypes)
        self.record.extra["model_config"] = json.loads(json.dumps(info.config, default=str))
        self.record.extra["preflight_estimate"] = {"total_bytes": est.total_bytes, "peak_phase": est.peak_phase,
                                                   "components": dict(est.components)}
        if device == "cuda" and (info.device or "cuda:0") not in ("cuda", "cuda:0"):
            # memplan.measure's collectors read cuda:0 (CUDA_VISIBLE_DEVICES makes any card that)
            self.record.notes.append(f"the model is on {info.device}; the allocator and NVML figures are cuda:0's")
        self.nvml = NvmlReader() if device == "cuda" else None
        self.record.environment, env_notes = collect_environment(device, self.nvml)
        self.record.notes += env_notes
        track = self.cb.track_tensors if self.cb.track_tensors is not None else device == "cpu"
        if not track:
            self.record.notes.append("tensor-level tracking off (track_tensors=False): allocator and NVML figures only")
        self.recorder = StepRecorder(device=device, vocab_size=spec.vocab_size, round_to=512 if device == "cuda" else 1,
                                     track_tensors=track, nvml=self.nvml, paged_start=paged_count())
        counts = self.recorder.register_model(self.model)
        self.record.model.update(counts.record_fields(), spec_params_total=spec.total_params())
        self.recorder.watch([p for p in self.model.parameters() if p.requires_grad])
        with self.recorder.phase("load", None):
            pass  # the model is loaded already: what is alive now
        self.recorder.__enter__()
        # prepend: the forward phase opens before any hook the script registered runs (one may fail)
        self._hooks = [self.model.register_forward_pre_hook(self._forward_begins, prepend=True),
                       self.model.register_forward_hook(self._forward_ends)]

    # -- phases
    def _forward_begins(self, module, args):
        if module.training:
            self.enter("forward")

    def _forward_ends(self, module, args, output):
        if module.training and self._phase == "forward":
            self.enter("backward")

    def enter(self, name: str) -> None:
        self.close_phase()
        self._stack = ExitStack()
        self._stack.enter_context(self.recorder.phase(name, self.step))
        self._phase = name

    def watch_optimizer(self, optimizer) -> None:
        """Tell the recorder which tensors are optimizer state (the Trainer hands its optimizer to callbacks;
        accelerate wraps it in an ``AcceleratedOptimizer`` whose ``.optimizer`` is the torch one)."""
        if optimizer is None or self._optimizer_watched:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        if hasattr(inner, "state") and hasattr(inner, "param_groups"):
            self.recorder.watch(optimizer=inner)
            self._optimizer_watched = True

    def close_phase(self, exc: BaseException | None = None) -> None:
        stack, self._stack, self._phase = self._stack, None, None
        if stack is not None:
            if exc is None:
                stack.close()
            else:
                try:
                    stack.__exit__(type(exc), exc, exc.__traceback__)
                except BaseException:  # noqa: BLE001 - the phase re-raises the run's exception: expected
                    pass

    def finish(self, outcome: str, exc: BaseException | None) -> RunRecord:
        from memplan.measure.recorder import record_failure

        self.close_phase(exc)
        for h in self._hooks:
            h.remove()
        self.recorder.__exit__(None, None, None)
        record = self.record
        record.steps_completed = self.steps_completed
        if exc is not None:
            record_failure(record, self.recorder, outcome, exc)
        record.notes += [n for n in self.recorder.notes if n not in record.notes]
        self.recorder.summarize(record)
        record.wall_seconds = round(time.perf_counter() - self._t0, 3)
        if self.nvml is not None:
            self.nvml.close()
        return record
