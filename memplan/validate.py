"""Holding the analytic model to account: estimate ÷ measured, per run and per component.

Two sources of truth, each compared with the analytic estimate for the same setup:

- **Matrix mode** (no run records needed): a grid of setups over the catalog (architectures × bits × rank ×
  targets × batch × sequence × checkpointing × attention × optimizer), each simulated exactly with
  ``memplan.trace.simulate`` (one real transformers + peft training step on fake tensors, CUDA semantics).
  Compared at tensor level: the analytic estimate without the runtime terms that no tensor tracker sees
  (CUDA context, allocator overhead, cuBLAS workspace).
- **Run records** (``profiles/runs/*.json`` from ``memplan profile``): on CPU the tracker's tensor peak, compared
  with the tensor-level estimate and with the simulation in CPU semantics; on CUDA the measured peak reserved
  plus the CUDA context, compared with the full estimate.

``write_report`` renders both into ``reports/validation.md`` (+ CSV files and a predicted-vs-measured plot).
Heavy imports (torch through ``trace``, matplotlib) happen inside the functions that need them.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .estimate import COMPONENTS, estimate_for
from .fileio import write_atomic
from .models import load_model
from .setups import TrainSetup, resolve_setup

__all__ = ["MatrixRow", "RunRow", "matrix_setups", "compare_setup", "run_matrix", "rescore_matrix",
           "validate_runs", "write_report"]


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


def matrix_setups(models: Sequence[tuple[str, dict]] = MATRIX_MODELS,
                  variations: Sequence[dict] = MATRIX_VARIATIONS) -> list[TrainSetup]:
    """The grid of setups compared in matrix mode (resolved later, per model). Invalid combinations (an
    architecture without sdpa asked for sdpa, a sequence beyond learned positions) are dropped."""
    setups: list[TrainSetup] = []
    for model, extra in models:
        spec = load_model(model)
        chosen = variations
        if spec.total_params() > 30e9 and variations is MATRIX_VARIATIONS:
            chosen = [variations[i] for i in _LARGE_MODEL_VARIATIONS]
        for var in chosen:
            knobs = {"lora_dropout": 0.05, "dtype": "bf16", **extra, **var}
            if knobs.get("bits") == 4:
                knobs.setdefault("method", "qlora")
            setup = TrainSetup(model=model, **knobs)
            try:
                resolve_setup(setup, spec)
            except Exception:  # noqa: BLE001 - an impossible combination for this architecture: skip it
                continue
            setups.append(setup)
    return setups


def compare_setup(setup: TrainSetup, *, profiles_dir=None) -> MatrixRow:
    """Simulate one setup in CUDA semantics and estimate it at tensor level."""
    import time

    from .trace import simulate

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    resolved = resolve_setup(setup, spec)
    analytic = estimate_for(spec, resolved, include_runtime=False)
    t0 = time.perf_counter()
    try:
        sim = simulate(resolved, device_semantics="cuda", profiles_dir=profiles_dir)
    except Exception as exc:  # noqa: BLE001 - a failed simulation is a row with its reason, not a crash
        return MatrixRow(resolved.to_dict(), spec.model_type, analytic.total_bytes, 0, analytic.components, {},
                         analytic.peak_phase, "", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return MatrixRow(resolved.to_dict(), spec.model_type, analytic.total_bytes, sim.total_bytes,
                     dict(analytic.components), dict(sim.components), analytic.peak_phase, sim.peak_phase,
                     time.perf_counter() - t0)


def rescore_matrix(csv_path: str | os.PathLike, *, profiles_dir=None) -> list[MatrixRow]:
    """Re-estimate every setup of a matrix CSV written by ``write_report``, keeping its simulated numbers.

    The simulations do not depend on the analytic model, so after changing the model this re-scores the
    whole grid in a second instead of re-simulating it for half an hour."""
    rows: list[MatrixRow] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            knobs = {k: rec[k] for k in _SETUP_KEYS}
            for k in ("bits", "rank", "batch_size", "seq_len"):
                knobs[k] = int(knobs[k])
            knobs["lora_dropout"] = float(knobs["lora_dropout"])
            for k in ("double_quant", "grad_ckpt"):
                knobs[k] = knobs[k] == "True"
            setup = TrainSetup(**knobs)
            spec = load_model(setup.model, profiles_dir=profiles_dir)
            resolved = resolve_setup(setup, spec)
            analytic = estimate_for(spec, resolved, include_runtime=False)
            simulated = {c: int(rec[f"simulated_{c}"]) for c in COMPONENTS}
            rows.append(MatrixRow(resolved.to_dict(), rec["architecture"], analytic.total_bytes,
                                  int(rec["simulated_bytes"]), dict(analytic.components), simulated,
                                  analytic.peak_phase, rec["simulated_phase"], float(rec["sim_seconds"]),
                                  rec["error"] or None))
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
    from .runs import list_runs

    rows: list[RunRow] = []
    for record in list_runs(runs_dir):
        if getattr(record, "outcome", None) != "ok":
            continue
        setup = TrainSetup(**record.setup)
        spec = _record_spec(record, setup)
        if spec is None:
            continue
        resolved = resolve_setup(setup, spec)
        peak = record.peak or {}
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
            from .trace import simulate_for

            try:
                simulated = simulate_for(spec, resolved, device_semantics=semantics).total_bytes
            except Exception as exc:  # noqa: BLE001
                notes.append(f"simulation failed: {type(exc).__name__}: {exc}")
        rows.append(RunRow(str(getattr(record, "path", "")), resolved.to_dict(), record.device, record.outcome,
                           measured, kind, analytic, simulated, tuple(notes), env.get("device_name")))
    return rows


def _record_gpu(env: dict):
    """The GPUSpec of the card a CUDA run was recorded on (its environment block), or None."""
    from .errors import MemplanError
    from .gpus import gpu_from_device

    name, total, cc = env.get("device_name"), env.get("total_memory_bytes"), env.get("compute_capability")
    if not (name and total and cc):
        return None
    try:
        return gpu_from_device(str(name), int(total), str(cc), source=f"run record: {name}")
    except MemplanError:
        return None


def _record_spec(record, setup):
    """The model of a run record: its catalog name / config path, else the config.json values a
    ``MemplanCallback`` record carries (``model_config``: a model built from a config has no name to load).
    None (with a warning) when neither works: one unreadable record must not stop the report."""
    import warnings

    from .errors import MemplanError
    from .models import spec_from_config

    config = (getattr(record, "extra", None) or {}).get("model_config")
    try:
        if isinstance(config, dict):
            return spec_from_config(config, name=setup.model)
        return load_model(setup.model)
    except MemplanError as exc:
        warnings.warn(f"{getattr(record, 'path', '')}: skipped: {exc}", stacklevel=3)
        return None


# ---- the report -------------------------------------------------------------------------------------------
def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def _summary(ratios: list[float]) -> dict:
    errs = sorted(abs(r - 1) for r in ratios)
    return {
        "n": len(ratios),
        "median_abs_error": statistics.median(errs) if errs else float("nan"),
        "worst_abs_error": errs[-1] if errs else float("nan"),
        "within_2pct": sum(e <= 0.02 for e in errs),
        "within_5pct": sum(e <= 0.05 for e in errs),
    }


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def _csv_text(header: list[str], rows: list[list]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


_SETUP_KEYS = ("model", "method", "bits", "quant_type", "double_quant", "dtype", "rank", "targets", "lora_dropout",
               "optimizer", "batch_size", "seq_len", "grad_ckpt", "attn")


def _setup_label(s: dict) -> str:
    bits = f"{s['bits']}b" + (f"-{s['quant_type']}{'-dq' if s['double_quant'] else ''}" if s["bits"] == 4 else "")
    return (f"{s['model']} {bits} {s['dtype']} r{s['rank']} {s['targets']} bs{s['batch_size']} s{s['seq_len']}"
            f"{' ckpt' if s['grad_ckpt'] else ''} {s['attn']} {s['optimizer']}")


def write_report(out_dir: str | os.PathLike, *, matrix: list[MatrixRow] | None = None,
                 runs: list[RunRow] | None = None, command: str = "memplan validate") -> list[Path]:
    """Write ``validation.md`` (+ ``validation_matrix.csv``, ``validation_runs.csv``, ``validation.png``)."""
    out = Path(out_dir)
    written: list[Path] = []
    lines = ["# memplan validation: analytic estimate ÷ measured", "",
             f"Generated by `{command}`. Ratios are estimate ÷ measured (1.00 = exact; above 1 the estimate is "
             "conservative).", ""]
    matrix = matrix or []
    runs = runs or []

    ok = [r for r in matrix if r.error is None and r.simulated_bytes]
    if matrix:
        s = _summary([r.ratio for r in ok])
        archs = sorted({r.architecture for r in ok})
        biggest = max((r.simulated_components.get("weights", 0) + r.simulated_components.get("quantized_weights", 0)
                       for r in ok), default=0)
        lines += [
            "## Matrix: analytic vs simulated (CUDA semantics, tensor level)", "",
            "Each setup is simulated exactly by `memplan simulate` (a real transformers + peft training step on fake "
            "tensors, with CUDA semantics: bool dropout masks, the flash-attention kernel, 512-byte blocks) and "
            "compared with the analytic estimate without the runtime terms no tensor tracker sees (CUDA context, "
            "allocator overhead, cuBLAS workspace). 8-bit (LLM.int8) is left out: its CUDA path cannot be "
            "simulated on a CPU.", "",
            f"- setups: **{s['n']}** over **{len(archs)} architectures** ({', '.join(archs)}); "
            f"largest weights simulated {biggest / 2**30:.0f} GiB",
            f"- median |error|: **{100 * s['median_abs_error']:.2f}%**, worst: **{100 * s['worst_abs_error']:.2f}%**",
            f"- within 2%: {s['within_2pct']}/{s['n']}; within 5%: {s['within_5pct']}/{s['n']}",
        ]
        failed = [r for r in matrix if r.error is not None]
        if failed:
            lines.append(f"- simulations that failed: {len(failed)} (listed at the end)")
        lines += ["", "| architecture | setups | median error | worst error |", "|---|---:|---:|---:|"]
        for arch in archs:
            rs = [r.ratio for r in ok if r.architecture == arch]
            sa = _summary(rs)
            worst = max(rs, key=lambda x: abs(x - 1))
            lines.append(f"| {arch} | {sa['n']} | {100 * sa['median_abs_error']:.2f}% | {_pct(worst)} |")
        lines += ["", "Per component (median estimate ÷ simulated over the setups where both are above 1 MiB):", "",
                  "| component | setups | median ratio | worst ratio |", "|---|---:|---:|---:|"]
        for comp in COMPONENTS:
            rs = [r.analytic_components[comp] / r.simulated_components[comp] for r in ok
                  if r.simulated_components.get(comp, 0) > 2**20 and r.analytic_components.get(comp, 0) > 2**20]
            if rs:
                worst = max(rs, key=lambda x: abs(x - 1))
                lines.append(f"| {comp} | {len(rs)} | {statistics.median(rs):.3f} | {worst:.3f} |")
        lines += ["", "Worst 15 setups:", "", "| setup | analytic GiB | simulated GiB | ratio | phases (analytic / sim) |",
                  "|---|---:|---:|---:|---|"]
        for r in sorted(ok, key=lambda r: -abs(r.ratio - 1))[:15]:
            lines.append(f"| {_setup_label(r.setup)} | {r.analytic_bytes / 2**30:.3f} | {r.simulated_bytes / 2**30:.3f} "
                         f"| {r.ratio:.3f} | {r.analytic_phase} / {r.simulated_phase} |")
        header = [*_SETUP_KEYS, "architecture", "analytic_bytes", "simulated_bytes", "ratio", "analytic_phase",
                  "simulated_phase", "sim_seconds", "error"]
        header += [f"analytic_{c}" for c in COMPONENTS] + [f"simulated_{c}" for c in COMPONENTS]
        rows = [[r.setup[k] for k in _SETUP_KEYS] + [r.architecture, r.analytic_bytes, r.simulated_bytes,
                                                     f"{r.ratio:.5f}", r.analytic_phase, r.simulated_phase,
                                                     f"{r.sim_seconds:.2f}", r.error or ""]
                + [r.analytic_components.get(c, 0) for c in COMPONENTS]
                + [r.simulated_components.get(c, 0) for c in COMPONENTS] for r in matrix]
        p = out / "validation_matrix.csv"
        _write_atomic(p, _csv_text(header, rows))
        written.append(p)
        if failed:
            lines += ["", "Simulations that failed:", ""]
            lines += [f"- {_setup_label(r.setup)}: {r.error}" for r in failed]

    lines += ["", "## Recorded runs (profiles/runs)", ""]
    if not runs:
        lines.append("No run records with outcome `ok` yet. `memplan profile MODEL --device cpu|cuda` adds them.")
    else:
        ar = [r.analytic_ratio for r in runs if r.analytic_ratio is not None]
        s = _summary(ar)
        lines += [f"- runs: **{s['n']}**; analytic median |error| **{100 * s['median_abs_error']:.2f}%**, worst "
                  f"**{100 * s['worst_abs_error']:.2f}%**", "",
                  "| run | device | measured | measured GiB | analytic ÷ measured | simulated ÷ measured |",
                  "|---|---|---|---:|---:|---:|"]
        for r in runs:
            meas = f"{r.measured_bytes / 2**30:.4f}" if r.measured_bytes else "n/a"
            ar_s = f"{r.analytic_ratio:.3f}" if r.analytic_ratio is not None else "n/a"
            sr_s = f"{r.simulated_ratio:.4f}" if r.simulated_ratio is not None else "n/a"
            lines.append(f"| {_setup_label(r.setup)} | {r.device} | {r.measured_kind} | {meas} | {ar_s} | {sr_s} |")
        header = [*_SETUP_KEYS, "path", "device", "measured_kind", "measured_bytes", "analytic_bytes",
                  "simulated_bytes", "analytic_ratio", "simulated_ratio"]
        rows = [[r.setup[k] for k in _SETUP_KEYS] + [r.path, r.device, r.measured_kind, r.measured_bytes,
                                                     r.analytic_bytes, r.simulated_bytes, r.analytic_ratio,
                                                     r.simulated_ratio] for r in runs]
        p = out / "validation_runs.csv"
        _write_atomic(p, _csv_text(header, rows))
        written.append(p)

    png = _plot(out / "validation.png", ok, runs)
    if png is not None:
        lines += ["", "## Predicted vs measured", "", "![analytic vs measured](validation.png)", ""]
        written.append(png)
    md = out / "validation.md"
    _write_atomic(md, "\n".join(lines) + "\n")
    return [md, *written]


def _plot(path: Path, matrix: list[MatrixRow], runs: list[RunRow]) -> Path | None:
    """Predicted vs measured, one point per setup (log-log), the identity line and a ±5% band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not matrix and not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    gib = 2**30
    archs = sorted({r.architecture for r in matrix})
    cmap = plt.get_cmap("tab20")
    for i, arch in enumerate(archs):
        pts = [r for r in matrix if r.architecture == arch]
        ax.scatter([r.simulated_bytes / gib for r in pts], [r.analytic_bytes / gib for r in pts], s=18,
                   color=cmap(i % 20), label=arch, alpha=0.85, edgecolors="none")
    measured = [r for r in runs if r.measured_bytes and r.analytic_bytes]
    if measured:
        ax.scatter([r.measured_bytes / gib for r in measured], [r.analytic_bytes / gib for r in measured], s=40,
                   marker="x", color="black", label="recorded runs")
    values = [r.simulated_bytes / gib for r in matrix] + [r.measured_bytes / gib for r in measured]
    lo, hi = min(values) * 0.8, max(values) * 1.25
    xs = [lo, hi]
    ax.plot(xs, xs, color="black", lw=1, label="estimate = measured")
    ax.fill_between(xs, [x * 0.95 for x in xs], [x * 1.05 for x in xs], color="grey", alpha=0.2, label="±5%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured peak (simulated or recorded), GiB")
    ax.set_ylabel("analytic estimate, GiB")
    ax.set_title("memplan: analytic estimate vs measured peak")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)
    finally:
        plt.close(fig)
    return path

