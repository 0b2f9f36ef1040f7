"""Holding the analytic model to account: estimate ÷ measured, per run and per component.

Two sources of truth, each compared with the analytic estimate for the same setup:

- **Matrix mode** (no run records needed): a grid of setups over the catalog (architectures × bits × rank ×
  targets × batch × sequence × checkpointing × attention × optimizer), each simulated exactly with
  ``memplan.measure.simulate`` (one real transformers + peft training step on fake tensors, CUDA semantics).
  Compared at tensor level: the analytic estimate without the runtime terms that no tensor tracker sees
  (CUDA context, allocator overhead, cuBLAS workspace).
- **Run records** (``profiles/runs/*.json`` from ``memplan profile``): on CPU the tracker's tensor peak, compared
  with the tensor-level estimate and with the simulation in CPU semantics; on CUDA the measured peak reserved
  plus the CUDA context, compared with the full estimate.

``memplan.reports.validation.write_report`` renders both. Heavy imports (torch through ``simulate``) happen
inside the functions that need them.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

from memplan.catalog.models import load_model
from memplan.plan.breakdown import COMPONENTS
from memplan.plan.estimate import estimate_for
from memplan.plan.setup import TrainSetup, resolve_setup

from .feature_matrix import FEATURE_KEY_DEFAULTS, FEATURE_KEYS, MATRIX_FEATURES
from .multi_gpu_matrix import MATRIX_MULTI_GPU, MULTI_GPU_KEY_DEFAULTS, MULTI_GPU_KEYS

__all__ = ["MatrixRow", "RunRow", "MATRIX_MODELS", "MATRIX_VARIATIONS", "MATRIX_SETUP_KEYS", "MATRIX_KEY_DEFAULTS",
           "matrix_setups", "compare_setup", "run_matrix", "rescore_matrix", "validate_runs"]

# The setup columns of validation_matrix.csv (written by memplan.reports.validation, read by rescore_matrix).
MATRIX_SETUP_KEYS = ("model", "method", "bits", "quant_type", "double_quant", "dtype", "rank", "targets",
                     "lora_dropout", "optimizer", "batch_size", "seq_len", "grad_ckpt", "attn", "autocast",
                     "upcast_non_quantized", "grad_accum", *FEATURE_KEYS, *MULTI_GPU_KEYS)
# Written before the precision knobs, a matrix CSV has neither column: those runs had no autocast and the
# default k-bit preparation; before gradient accumulation, one micro-batch per step; before the feature knobs
# (memplan.measure.feature_matrix), plain LoRA; before several GPUs (memplan.measure.multi_gpu_matrix), one.
MATRIX_KEY_DEFAULTS = {"autocast": "off", "upcast_non_quantized": None, "grad_accum": 1, **FEATURE_KEY_DEFAULTS,
                       **MULTI_GPU_KEY_DEFAULTS}


@dataclass(frozen=True)
class MatrixRow:
    """Analytic (tensor level) against the simulation for one setup."""

    setup: dict
    architecture: str
    analytic_bytes: int
    simulated_bytes: int
    analytic_components: dict[str, int]
    simulated_components: dict[str, int]
    analytic_phase: str
    simulated_phase: str
    sim_seconds: float
    error: str | None = None  # the simulation failed: why
    # the library stack the simulation ran on (memplan.plan.versions text); "" for rows simulated before the
    # column existed (transformers 5.23-5.24, peft 0.21, bitsandbytes 0.50, torch 2.13 in this repository's venv)
    simulated_with: str = ""

    @property
    def ratio(self) -> float:
        return self.analytic_bytes / self.simulated_bytes if self.simulated_bytes else float("nan")


@dataclass(frozen=True)
class RunRow:
    """The analytic estimate and the simulation against one measured run."""

    path: str
    setup: dict
    device: str
    outcome: str
    measured_bytes: int | None  # CPU: tensor peak; CUDA: peak reserved + CUDA context
    measured_kind: str
    analytic_bytes: int
    simulated_bytes: int | None
    notes: tuple[str, ...] = field(default=())
    device_name: str | None = None  # the card (CUDA) or CPU the run was recorded on

    @property
    def analytic_ratio(self) -> float | None:
        return self.analytic_bytes / self.measured_bytes if self.measured_bytes else None

    @property
    def simulated_ratio(self) -> float | None:
        if self.simulated_bytes is None or not self.measured_bytes:
            return None
        return self.simulated_bytes / self.measured_bytes


# ---- the matrix -----------------------------------------------------------------------------------------
# One row per architecture: (catalog model, extra knobs every variation of that model keeps). Sizes span
# 0.35B to 70B; every architecture memplan supports that transformers can simulate is here.
MATRIX_MODELS: tuple[tuple[str, dict], ...] = (
    ("opt-1.3b", {}),
    ("opt-13b", {}),
    ("llama-2-7b-hf", {}),
    ("llama-2-70b-hf", {}),
    ("llama-3.1-8b", {}),
    ("mistral-7b-v0.1", {}),
    ("qwen2.5-1.5b", {}),
    ("gemma-2-2b", {}),
    ("phi-2", {}),
    ("phi-3-mini-4k-instruct", {}),
    ("gpt2-medium", {}),
    ("falcon-7b", {}),
    ("bloom-560m", {}),
    ("stablelm-3b-4e1t", {}),
    ("santacoder", {}),
    ("bert-large-uncased", {}),
)

# Variations applied to each model: a base plan, then one knob at a time, then a few combinations. The base
# is a LoRA r=8 default-targets bf16 step at batch 1, sequence 512, sdpa, AdamW, no checkpointing.
MATRIX_VARIATIONS: tuple[dict, ...] = (
    {},
    {"rank": 64},
    {"targets": "all-linear"},
    {"batch_size": 4},
    {"seq_len": 1024},
    {"grad_ckpt": True},
    {"attn": "eager"},
    {"optimizer": "paged_adamw_8bit"},
    {"optimizer": "sgd"},
    {"bits": 4},
    {"bits": 4, "double_quant": False, "quant_type": "fp4"},
    {"bits": 4, "grad_ckpt": True, "targets": "all-linear", "rank": 16},
    {"bits": 4, "batch_size": 2, "seq_len": 1024, "optimizer": "paged_adamw_8bit"},
    {"targets": "all-linear", "rank": 64, "batch_size": 2, "grad_ckpt": True},
    {"dtype": "fp16", "lora_dropout": 0.0, "batch_size": 2},
)

# 70B simulations take longer: keep their variations to the informative few.
_LARGE_MODEL_VARIATIONS = (0, 2, 5, 9, 11)

# The precision regimes a script runs in (memplan.plan.precision; README, "Precision"), each on the base knobs;
# the variations above are the no-autocast reference. Models over 30B take the last two.
MATRIX_REGIMES: tuple[dict, ...] = (
    {"autocast": "bf16"},  # 16-bit weights under autocast (TRL / axolotl with bf16=True)
    {"autocast": "bf16", "grad_ckpt": True, "targets": "all-linear", "rank": 16},
    {"bits": 32, "autocast": "bf16"},  # fp32 master weights under autocast (the Trainer's classic AMP)
    {"bits": 32, "autocast": "bf16", "grad_ckpt": True},
    {"bits": 4, "upcast_non_quantized": False, "autocast": "bf16"},  # k-bit, no preparation, autocast
    {"bits": 4, "upcast_non_quantized": False, "autocast": "bf16", "grad_ckpt": True},
    {"bits": 4, "upcast_non_quantized": False},  # k-bit, no preparation, no autocast (FSDP-QLoRA style)
    {"bits": 4, "autocast": "bf16"},  # k-bit prepared, under autocast (QLoRA scripts)
    {"bits": 4, "autocast": "bf16", "grad_ckpt": True, "targets": "all-linear", "rank": 16},
)

# Setups where the estimate and the simulation once disagreed, kept in the grid so they stay fixed (each on top of
# the base knobs above; only for models in the grid).
MATRIX_REGRESSIONS: tuple[tuple[str, dict], ...] = (
    # Issue 13: at its sliding window Mistral's SDPA gets a materialised mask: memory-efficient kernel, k/v
    # repeated, no S x S probabilities (analytic was +70%).
    ("mistral-7b-v0.1", {"method": "qlora", "bits": 4, "rank": 16, "targets": "all-linear", "seq_len": 4096,
                         "grad_ckpt": True, "optimizer": "paged_adamw_32bit"}),
    ("mistral-7b-v0.1", {"seq_len": 4096, "grad_ckpt": True}),
    ("phi-3-mini-4k-instruct", {"seq_len": 2048}),
)


def matrix_setups(models: Sequence[tuple[str, dict]] = MATRIX_MODELS,
                  variations: Sequence[dict] = MATRIX_VARIATIONS) -> list[TrainSetup]:
    """The grid of setups compared in matrix mode (resolved later, per model). Invalid combinations (an
    architecture without sdpa asked for sdpa, a sequence beyond learned positions) are dropped."""
    setups: list[TrainSetup] = []
    seen: set[tuple] = set()
    for model, extra in models:
        spec = load_model(model)
        chosen = variations
        if spec.total_params() > 30e9 and variations is MATRIX_VARIATIONS:
            chosen = [variations[i] for i in _LARGE_MODEL_VARIATIONS]
        if variations is MATRIX_VARIATIONS:
            chosen = [*chosen, *(MATRIX_REGIMES[-2:] if spec.total_params() > 30e9 else MATRIX_REGIMES)]
        for var in chosen:
            knobs = {"lora_dropout": 0.05, "dtype": "bf16", "autocast": "off", "grad_ckpt": False, **extra, **var}
            if knobs.get("bits") == 4:
                knobs.setdefault("method", "qlora")
            setup = TrainSetup(model=model, **knobs)
            try:
                key = tuple(sorted(resolve_setup(setup, spec).to_dict().items()))
            except Exception:  # noqa: BLE001 - an impossible combination for this architecture: skip it
                continue
            if key not in seen:  # eager-only models: the "eager" variation is the base one
                seen.add(key)
                setups.append(setup)
    if variations is MATRIX_VARIATIONS:
        names = {m for m, _ in models}
        for model, knobs in (*MATRIX_REGRESSIONS, *MATRIX_FEATURES, *MATRIX_MULTI_GPU):
            if model in names:
                setups.append(TrainSetup(model=model, **{"lora_dropout": 0.05, "dtype": "bf16", "autocast": "off",
                                                         "grad_ckpt": False, **knobs}))
    return setups


def compare_setup(setup: TrainSetup, *, profiles_dir=None) -> MatrixRow:
    """Simulate one setup in CUDA semantics and estimate it at tensor level."""
    import time

    from .simulate import simulate

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    resolved = resolve_setup(setup, spec)
    analytic = estimate_for(spec, resolved, include_runtime=False)
    t0 = time.perf_counter()
    try:
        sim = simulate(resolved, device_semantics="cuda", profiles_dir=profiles_dir)
    except Exception as exc:  # noqa: BLE001 - a failed simulation is a row with its reason, not a crash
        return MatrixRow(resolved.to_dict(), spec.model_type, analytic.total_bytes, 0, analytic.components, {},
                         analytic.peak_phase, "", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    from memplan.plan.versions import resolve_versions

    return MatrixRow(resolved.to_dict(), spec.model_type, analytic.total_bytes, sim.total_bytes,
                     dict(analytic.components), dict(sim.components), analytic.peak_phase, sim.peak_phase,
                     time.perf_counter() - t0, simulated_with=resolve_versions(None))


def rescore_matrix(csv_path: str | os.PathLike, *, profiles_dir=None) -> list[MatrixRow]:
    """Re-estimate every setup of a matrix CSV (``validation_matrix.csv``), keeping its simulated numbers.

    The simulations do not depend on the analytic model, so after changing the model this re-scores the
    whole grid in a second instead of re-simulating it for half an hour. A file that is not such a CSV raises
    ``ConfigError`` naming it (and the line)."""
    from memplan.errors import ConfigError, MemplanError
    from memplan.fileio import read_text

    text = read_text(csv_path, missing="no such matrix CSV (validation_matrix.csv from memplan validate --matrix)",
                     what=" matrix CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    needed = [*(k for k in MATRIX_SETUP_KEYS if k not in MATRIX_KEY_DEFAULTS), "architecture", "simulated_bytes",
              "simulated_phase", "sim_seconds", "error",
              *(f"simulated_{c}" for c in COMPONENTS if c != "comm_buffers")]
    missing = [k for k in needed if k not in (reader.fieldnames or ())]
    if missing:
        raise ConfigError(f"{csv_path}: not a validation matrix CSV: it lacks the column(s) "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    rows: list[MatrixRow] = []
    for line, rec in enumerate(reader, start=2):
        try:
            knobs = {k: rec.get(k) or MATRIX_KEY_DEFAULTS.get(k) for k in MATRIX_SETUP_KEYS}
            for k in ("bits", "rank", "batch_size", "seq_len", "grad_accum", "trainable_tokens", "gpus", "nodes"):
                knobs[k] = int(knobs[k])
            knobs["lora_dropout"] = float(knobs["lora_dropout"])
            for k in ("double_quant", "grad_ckpt"):
                knobs[k] = knobs[k] == "True"
            knobs["upcast_non_quantized"] = {"True": True, "False": False}.get(knobs["upcast_non_quantized"])
            setup = TrainSetup(**knobs)
            spec = load_model(setup.model, profiles_dir=profiles_dir)
            resolved = resolve_setup(setup, spec)
            simulated = {c: int(rec.get(f"simulated_{c}") or 0) for c in COMPONENTS}  # (older: no comm_buffers)
            simulated_bytes, seconds = int(rec["simulated_bytes"]), float(rec["sim_seconds"])
        except (ValueError, TypeError, MemplanError) as exc:
            raise ConfigError(f"{csv_path}: line {line}: {exc}") from None
        analytic = estimate_for(spec, resolved, include_runtime=False)
        rows.append(MatrixRow(resolved.to_dict(), rec["architecture"], analytic.total_bytes, simulated_bytes,
                              dict(analytic.components), simulated, analytic.peak_phase, rec["simulated_phase"],
                              seconds, rec["error"] or None, simulated_with=rec.get("simulated_with") or ""))
    return rows


def _compare_in_worker(setup: TrainSetup) -> MatrixRow:
    return compare_setup(setup)


def run_matrix(setups: Iterable[TrainSetup], *, jobs: int = 1,
               on_row: Callable[[MatrixRow], None] | None = None) -> list[MatrixRow]:
    """Compare every setup; ``jobs`` worker processes (each simulation is single-threaded Python)."""
    setups = list(setups)
    rows: list[MatrixRow] = []
    if jobs <= 1:
        for s in setups:
            rows.append(compare_setup(s))
            if on_row:
                on_row(rows[-1])
        return rows
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # torch + fork is fragile
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for row in pool.map(_compare_in_worker, setups):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


# ---- run records ------------------------------------------------------------------------------------------
def validate_runs(runs_dir: str | os.PathLike, *, simulate_runs: bool = True) -> list[RunRow]:
    """Estimate (and simulate) every recorded run with outcome ok; measured is the tensor peak on CPU and
    peak reserved + CUDA context on a GPU."""
    from .runs import RunRecordWarning, list_runs

    rows: list[RunRow] = []
    for record in list_runs(runs_dir):
        if getattr(record, "outcome", None) != "ok":
            continue
        try:
            setup, spec, resolved = _record_setup(record)
        except _Unusable as exc:
            warnings.warn(f"{getattr(record, 'path', '')}: skipped: {exc}", RunRecordWarning, stacklevel=2)
            continue
        peak = record.peak or {}
        bad = [k for k in _PEAK_NUMBERS if peak.get(k) is not None and not _is_count(peak[k])]
        if bad:
            warnings.warn(f"{getattr(record, 'path', '')}: skipped: peak {bad[0]} is {peak[bad[0]]!r}, not a byte "
                          f"count", RunRecordWarning, stacklevel=2)
            continue
        notes: list[str] = []
        env = record.environment or {}
        if record.device == "cuda":
            reserved, context = peak.get("max_reserved_bytes"), peak.get("cuda_context_bytes")
            measured = reserved + context if reserved is not None and context is not None else None
            kind = "peak reserved + CUDA context"
            gpu = _record_gpu(env)  # the card's CUDA-context default and bf16 support, as a plan for it
            analytic = estimate_for(spec, resolve_setup(setup, spec, gpu), gpu).total_bytes
            semantics = "cuda"
        else:
            measured = peak.get("tensor_peak_bytes")
            kind = "tensor peak (CPU)"
            analytic = estimate_for(spec, resolved, include_runtime=False).total_bytes
            semantics = "cpu"
            notes.append("the analytic model follows CUDA semantics (bool dropout masks, flash attention)")
        simulated = None
        if simulate_runs:
            from .simulate import simulate_for

            try:
                simulated = simulate_for(spec, resolved, device_semantics=semantics).total_bytes
            except Exception as exc:  # noqa: BLE001
                notes.append(f"simulation failed: {type(exc).__name__}: {exc}")
        rows.append(RunRow(str(getattr(record, "path", "")), resolved.to_dict(), record.device, record.outcome,
                           measured, kind, analytic, simulated, tuple(notes), env.get("device_name")))
    return rows


class _Unusable(Exception):
    """A run record whose setup cannot be planned (validate skips it with a warning)."""


_PEAK_NUMBERS = ("tensor_peak_bytes", "max_reserved_bytes", "cuda_context_bytes")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _record_setup(record):
    """(setup, spec, resolved setup) of a run record, or ``_Unusable`` saying why not: an unknown or mistyped
    setup key, a model it cannot find, a setup memplan refuses (rank 0 ...)."""
    from memplan.errors import MemplanError

    unknown = sorted(set(record.setup) - {f.name for f in fields(TrainSetup)})
    if unknown:
        raise _Unusable(f"its setup has key(s) this memplan does not know: {', '.join(map(str, unknown))}")
    raw = dict(record.setup)
    if "autocast" not in raw:  # recorded before the knob: memplan profile ran autocast for fp32 weights only
        amp = raw.get("bits") == 32 and raw.get("dtype") in ("bf16", "fp16")
        raw["autocast"] = raw["dtype"] if amp else "off"
    try:
        setup = TrainSetup(**raw)
    except TypeError as exc:  # a required key missing
        raise _Unusable(f"its setup is incomplete ({exc})") from None
    try:
        spec = _record_spec(record, setup)
        return setup, spec, resolve_setup(setup, spec)
    except MemplanError as exc:
        raise _Unusable(str(exc)) from None


def _record_gpu(env: dict):
    """The GPUSpec of the card a CUDA run was recorded on (its environment block), or None."""
    from memplan.catalog.gpus import gpu_from_device
    from memplan.errors import MemplanError

    name, total, cc = env.get("device_name"), env.get("total_memory_bytes"), env.get("compute_capability")
    if not (name and total and cc):
        return None
    try:
        return gpu_from_device(str(name), int(total), str(cc), source=f"run record: {name}")
    except MemplanError:
        return None


def _record_spec(record, setup):
    """The model of a run record: its catalog name / config path, else the config.json values a
    ``MemplanCallback`` record carries (``model_config``: a model built from a config has no name to load)."""
    from memplan.catalog.models import spec_from_config

    config = (getattr(record, "extra", None) or {}).get("model_config")
    if isinstance(config, dict):
        return spec_from_config(config, name=setup.model)
    return load_model(setup.model)
