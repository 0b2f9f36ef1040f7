"""Run records: what ``memplan profile`` measured in one instrumented training run, as one JSON file.

A record holds the full resolved ``TrainSetup``, the model's parameter counts, the software and hardware
environment, and per-phase memory peaks (``load``, then ``forward`` / ``backward`` / ``optimizer_step`` for
every step). Records are the "measured" level of the design (README, "How memplan is built"): ``memplan
validate`` compares them with the analytic estimate and the simulation, so they must stay
readable as the schema grows. Hence:

- ``schema_version`` on every record; ``from_dict`` refuses versions it does not know (naming the file), and
  keeps keys it does not know in ``extra`` so that a round trip through an older reader loses nothing;
- one file per run, written atomically (temporary file in the same folder, ``fsync``, ``os.replace``): a crash
  or Ctrl-C mid-write never leaves a truncated record, only the old state or the new one;
- ``list_runs`` skips (and reports) files it cannot read instead of failing the whole folder.

Stdlib only: reading records must not import torch (``memplan validate`` on a laptop).

Schema (version 1); byte counts are integers, ``null`` where a collector was unavailable (all CUDA fields on
CPU). Top level: ``schema_version, run_id, created (UTC ISO 8601), outcome (ok | oom | error | interrupted),
error, error_type, error_phase, error_step, setup (TrainSetup.to_dict() of the resolved setup), model (name,
model_type, hf_id, params_total / params_trainable / params_quantized (logical values), param_bytes,
buffer_bytes, spec_params_total), environment (python, platform, versions{torch, transformers, peft,
bitsandbytes, accelerate, ...}, env vars that steer the allocator, device_kind, device_name, driver_version,
total_memory_bytes, compute_capability, cuda_version, ...), device, steps, steps_completed, phases, peak,
wall_seconds, notes`` (+ ``traceback`` for errors).

``phases[i]`` (``load``, then ``forward`` / ``backward`` / ``optimizer_step`` per step; zero_grad runs inside
``optimizer_step``): ``name, step (null for load), completed, seconds, tensor_peak_bytes, tensor_end_bytes,
max_allocated_bytes, max_reserved_bytes, max_active_bytes, end_allocated_bytes, end_reserved_bytes,
num_alloc_retries, num_ooms`` (increase during the phase), ``nvml_used_bytes`` (at the phase end),
``nvml_peak_used_bytes`` (highest 5 ms sample), ``paged_bytes``.

``peak``: ``tensor_peak_bytes, peak_phase, peak_step, peak_estimate_phase, components (memplan.estimate
COMPONENTS -> bytes at the tensor peak), estimate_phase_peaks, final_bytes, max_allocated_bytes,
max_reserved_bytes, max_active_bytes, nvml_used_bytes, nvml_baseline_bytes, cuda_context_bytes,
cuda_context_method, paged_bytes``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.fileio import read_json, write_atomic

__all__ = [
    "SCHEMA_VERSION",
    "OUTCOMES",
    "PHASE_NAMES",
    "RunRecord",
    "RunRecordError",
    "RunRecordWarning",
    "RunList",
    "new_run_id",
    "utc_now",
    "record_filename",
    "save_run",
    "load_run",
    "list_runs",
]

SCHEMA_VERSION = 1
OUTCOMES = ("ok", "oom", "error", "interrupted")
PHASE_NAMES = ("load", "forward", "backward", "optimizer_step")


class RunRecordError(MemplanError):
    """A run record that cannot be written or read (the message names the file)."""


class RunRecordWarning(UserWarning):
    """``list_runs`` skipped a file it could not read."""


def utc_now() -> str:
    """The current UTC time, ISO 8601 with seconds and a ``Z``-free ``+00:00`` offset."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A unique, time-sortable id: ``20250102T030405Z-1a2b3c4d``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


@dataclass
class RunRecord:
    """One instrumented run. ``path`` is where it was saved or loaded from (not part of the JSON)."""

    outcome: str  # one of OUTCOMES
    setup: dict  # the resolved TrainSetup.to_dict(): TrainSetup(**setup) rebuilds it
    device: str  # "cpu" | "cuda"
    model: dict = field(default_factory=dict)  # name, model_type, params_total / _trainable / _quantized
    environment: dict = field(default_factory=dict)
    steps: int = 0  # steps requested
    steps_completed: int = 0
    phases: list[dict] = field(default_factory=list)
    peak: dict = field(default_factory=dict)
    wall_seconds: float | None = None
    error: str | None = None  # the exception message for oom / error / interrupted
    error_type: str | None = None  # its class name
    error_phase: str | None = None  # the phase it happened in ("load", "forward", ...)
    error_step: int | None = None
    notes: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)
    created: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # keys of a newer minor writer this reader does not know
    path: str | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``path`` left out, ``extra`` merged back at the top level)."""
        d = asdict(self)
        d.pop("path")
        extra = d.pop("extra")
        for k, v in extra.items():
            d.setdefault(k, v)
        return d

    @classmethod
    def from_dict(cls, data: Any, *, source: str | os.PathLike | None = None) -> RunRecord:
        """Validate and build; ``RunRecordError`` (naming ``source``) for anything that is not a v1 record."""
        where = f"{source}: " if source is not None else ""
        if not isinstance(data, dict):
            raise RunRecordError(f"{where}a run record must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version is None:
            raise RunRecordError(f"{where}not a memplan run record (no schema_version)")
        if version != SCHEMA_VERSION:
            raise RunRecordError(
                f"{where}run record schema_version {version!r} is not supported by this memplan "
                f"(it reads version {SCHEMA_VERSION}); upgrade memplan to read it"
            )
        for key in ("outcome", "setup", "device"):
            if key not in data:
                raise RunRecordError(f"{where}run record lacks the required key {key!r}")
        if data["outcome"] not in OUTCOMES:
            raise RunRecordError(f"{where}invalid outcome {data['outcome']!r}; allowed: {', '.join(OUTCOMES)}")
        if not isinstance(data["setup"], dict):
            raise RunRecordError(f"{where}'setup' must be an object")
        known = {f.name for f in fields(cls)} - {"path", "extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key, typ in (("phases", list), ("notes", list), ("peak", dict), ("model", dict), ("environment", dict)):
            if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], typ):
                raise RunRecordError(f"{where}'{key}' must be a JSON {'array' if typ is list else 'object'}")
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        rec = cls(**kwargs, extra=extra)
        if source is not None:
            rec.path = str(source)
        return rec

    # ---------------------------------------------------------------- convenience
    @property
    def tensor_peak_bytes(self) -> int | None:
        return (self.peak or {}).get("tensor_peak_bytes")

    def phase(self, name: str, step: int | None = None) -> dict | None:
        """The first phase entry called ``name`` (at ``step`` when given)."""
        for p in self.phases:
            if p.get("name") == name and (step is None or p.get("step") == step):
                return p
        return None


# ------------------------------------------------------------------------------------------------ file names
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _model_label(name: str) -> str:
    """``opt-13b`` for a catalog id; the folder (or file stem) for a config path; filesystem-safe."""
    s = str(name or "model")
    if "/" in s or "\\" in s or s.endswith(".json"):
        p = Path(s)
        s = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    s = _UNSAFE.sub("_", s).strip("._-")
    return s[:60] or "model"


def record_filename(record: RunRecord) -> str:
    """``<model>__<device>__<bits>b-r<rank>-bs<batch>-s<seq>__<run id>.json``; ``-full`` instead of
    ``-r<rank>`` for full fine-tuning. The run id starts with the UTC time, so names sort by time."""
    s = record.setup or {}
    bits = s.get("bits")
    adapter = "full" if s.get("method") == "full" else f"r{s.get('rank')}"
    knobs = f"{bits}b-{adapter}-bs{s.get('batch_size')}-s{s.get('seq_len')}"
    rid = _UNSAFE.sub("_", str(record.run_id or new_run_id()))
    return f"{_model_label(s.get('model', ''))}__{_UNSAFE.sub('_', str(record.device))}__{knobs}__{rid}.json"


# ------------------------------------------------------------------------------------------------ I/O
def save_run(record: RunRecord, out_dir: str | os.PathLike) -> Path:
    """Write ``record`` as one JSON file in ``out_dir`` (created if needed), atomically, and return its path.

    The JSON goes to a hidden temporary file in the same folder (same filesystem, so the rename is atomic),
    is flushed and fsynced, then ``os.replace``-d onto the final name. Any failure, Ctrl-C included, removes the
    temporary file: the folder holds either no new file or the complete record. Sets ``record.path``.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunRecordError(f"{out}: cannot create the run records folder: {exc}") from exc
    name = record_filename(record)
    path = out / name
    n = 1
    while path.exists():  # the run id makes this rare; never overwrite an earlier record
        path = out / f"{name[:-5]}-{n}.json"
        n += 1
    try:
        write_atomic(path, lambda f: (json.dump(record.to_dict(), f, indent=2, allow_nan=False), f.write("\n")))
    except Exception as exc:  # KeyboardInterrupt / SystemExit propagate unchanged (the temp file is gone)
        raise RunRecordError(f"{path}: cannot write run record: {type(exc).__name__}: {exc}") from exc
    record.path = str(path)
    return path


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read and validate one record; ``RunRecordError`` naming the file for anything wrong with it."""
    p = Path(path)
    data = read_json(p, error=RunRecordError, missing="no such run record", what=" run record")
    try:
        return RunRecord.from_dict(data, source=p)
    except TypeError as exc:  # a field of the wrong shape reaching the dataclass
        raise RunRecordError(f"{p}: malformed run record: {exc}") from None


class RunList(list):
    """``list_runs``'s result: the records, plus ``skipped``: ``(path, reason)`` for each unreadable file."""

    def __init__(self, records=(), skipped=()):
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


def list_runs(runs_dir: str | os.PathLike, *, warn: bool = True) -> RunList:
    """Every readable record in ``runs_dir`` (``*.json``, hidden temporaries ignored), oldest first.

    A missing folder is an empty list (no run recorded yet). A file that cannot be read or is not a v1 record
    is skipped: it is listed in the result's ``skipped`` and, with ``warn``, reported as a
    ``RunRecordWarning``. ``runs_dir`` being a file raises ``RunRecordError``.
    """
    d = Path(runs_dir)
    if not d.exists():
        return RunList()
    if not d.is_dir():
        raise RunRecordError(f"{d}: not a folder of run records")
    records: list[RunRecord] = []
    skipped: list[tuple[str, str]] = []
    for p in sorted(d.glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            records.append(load_run(p))
        except RunRecordError as exc:
            skipped.append((str(p), str(exc)))
            if warn:
                warnings.warn(f"skipping unreadable run record: {exc}", RunRecordWarning, stacklevel=2)
    records.sort(key=lambda r: (str(r.created), str(r.path)))
    return RunList(records, skipped)
