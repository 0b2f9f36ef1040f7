"""memplan against other people's measurements: published peak-memory figures, each mapped to a setup.

``profiles/published/measurements.csv`` holds peak-memory figures published by others (official docs and
READMEs, benchmark tables, papers, issue threads; profiles/published/README.md). ``mapping.csv`` next to it
says, row by row, which memplan setup reproduces each figure, which assumptions that takes, and why a row
cannot be mapped. This module joins the two, estimates every mapped setup and compares it with the figure in
the figure's own metric:

- ``alloc`` (torch ``max_memory_allocated``, and ``active`` peaks): the estimate without the CUDA context and
  without the caching allocator's overhead;
- ``reserved`` (``max_memory_reserved``): with the allocator overhead;
- ``nvml`` (nvidia-smi): the whole estimate, CUDA context included;
- a claim (``OOM on X GB``, ``fits in X GB``): the whole estimate against the card's total memory, without
  memplan's planning headroom (the claim is about the card, not about a plan).

Pure Python like the estimator: no torch import, so the scoreboard runs wherever ``fit`` does.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from memplan.errors import MemplanError

__all__ = ["PublishedRow", "PublishedResult", "load_published", "score_published", "STATUSES",
           "MAPPING_COLUMNS", "default_mapping_path"]

GIB = 2**30
GB = 10**9
# One word per outcome (issue 14): a compared figure, a claim answered right or wrong, or a skipped row.
STATUSES = ("compared", "oom_ok", "oom_missed", "fits_ok", "fits_missed", "skipped")
MAPPING_COLUMNS = ("id", "framework", "model", "method", "bits", "quant_type", "double_quant", "dtype", "rank",
                   "targets", "optimizer", "batch_size", "grad_accum", "seq_len", "grad_ckpt", "attn", "autocast",
                   "upcast_non_quantized", "adapter_dtype", "gpu", "versions", "loss", "activation_offload",
                   "compare_as", "context_gib", "skip", "assumptions", "gpus", "nodes", "strategy", "fsdp_sharding",
                   "offload")
_COMPARE_AS = ("alloc", "reserved", "nvml", "fit")
_INT_FIELDS = ("bits", "rank", "batch_size", "grad_accum", "seq_len", "gpus", "nodes")
_BOOL_FIELDS = ("double_quant", "grad_ckpt", "upcast_non_quantized")
_STR_FIELDS = ("method", "quant_type", "dtype", "targets", "optimizer", "attn", "autocast", "adapter_dtype",
               "versions", "loss", "activation_offload", "strategy", "fsdp_sharding", "offload")


@dataclass(frozen=True)
class PublishedRow:
    """One published figure and the memplan setup it maps to (``mapping`` is the row of mapping.csv)."""

    id: str
    source: str
    framework: str  # the mapping's framework group: hf, litgpt or torchtune
    source_framework: str  # the framework in the source's words
    reliability: str  # A, B, C, E (profiles/published/README.md)
    metric_code: str
    outcome: str
    measured_gib: float | None
    gpu_text: str
    mapping: dict
    mapping_dir: str = "."  # where the mapping's relative config paths start

    @property
    def model_label(self) -> str:
        """The mapped model as the report shows it: a catalog id, or a config file's stem."""
        model = self.mapping.get("model", "")
        return Path(model).stem if model.endswith(".json") else model

    @property
    def skip_reason(self) -> str:
        return self.mapping.get("skip", "")


@dataclass(frozen=True)
class PublishedResult:
    row: PublishedRow
    status: str  # one of STATUSES; "skipped" carries its reason in ``reason``
    predicted_gib: float | None = None
    error: float | None = None  # predicted / measured - 1 (compared rows)
    capacity_gib: float | None = None  # the card's memory a claim is about
    reason: str = ""
    setup_label: str = ""
    peak_phase: str = ""
    stack_note: str = ""  # the source's stack is older than memplan models: what was planned instead

    @property
    def status_text(self) -> str:
        return f"skipped:{self.reason}" if self.status == "skipped" else self.status

    @property
    def ratio(self) -> float | None:
        return None if self.error is None else 1 + self.error


def default_mapping_path(measurements: str | os.PathLike) -> Path:
    """mapping.csv beside the measurements file."""
    return Path(measurements).with_name("mapping.csv")


def _read_csv(path: Path, what: str) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise MemplanError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MemplanError(f"{what} {str(path)!r} cannot be read: {e}") from None


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load_published(measurements: str | os.PathLike, mapping: str | os.PathLike | None = None) -> list[PublishedRow]:
    """The published rows joined with their mapping; every measurement row must have one mapping row."""
    measurements = Path(measurements)
    mapping_path = Path(mapping) if mapping is not None else default_mapping_path(measurements)
    data = _read_csv(measurements, "published measurements")
    maps = _read_csv(mapping_path, "published mapping")
    if data and not {"id", "source", "reliability", "metric_code", "value_gib", "outcome"} <= set(data[0]):
        raise MemplanError(f"{str(measurements)!r} lacks the columns id, source, reliability, metric_code, value_gib "
                           "and outcome (profiles/published/README.md)")
    if maps and set(MAPPING_COLUMNS) - set(maps[0]):
        missing = ", ".join(sorted(set(MAPPING_COLUMNS) - set(maps[0])))
        raise MemplanError(f"{str(mapping_path)!r} lacks the columns {missing}")
    by_id = {m["id"]: m for m in maps}
    unmapped = [r["id"] for r in data if r["id"] not in by_id]
    if unmapped:
        raise MemplanError(f"{str(mapping_path)!r} has no row for {', '.join(unmapped[:5])}"
                           f"{' ...' if len(unmapped) > 5 else ''}: every figure needs a mapping or a skip reason")
    return [PublishedRow(id=r["id"], source=r["source"], framework=by_id[r["id"]]["framework"] or "hf",
                         source_framework=r.get("framework", ""), reliability=r["reliability"],
                         metric_code=r["metric_code"], outcome=r["outcome"],
                         measured_gib=_float_or_none(r["value_gib"]), gpu_text=r.get("gpu", ""),
                         mapping=by_id[r["id"]], mapping_dir=str(mapping_path.resolve().parent)) for r in data]


def _setup_from_mapping(m: dict, base: str | os.PathLike = "."):
    from memplan.plan.setup import TrainSetup

    known = {f.name for f in fields(TrainSetup)}
    kwargs = {}
    for key in _INT_FIELDS:
        if m.get(key):
            kwargs[key] = int(m[key])
    for key in _BOOL_FIELDS:
        if m.get(key):
            if m[key] not in ("True", "False"):
                raise MemplanError(f"{m['id']}: {key} {m[key]!r} is not True or False")
            kwargs[key] = m[key] == "True"
    for key in _STR_FIELDS:
        if m.get(key) and key in known:
            kwargs[key] = m[key]
    note = _stack_note(kwargs["versions"]) if kwargs.get("versions") else ""
    model = m["model"]
    if model.endswith(".json") and not os.path.isabs(model):
        model = str(Path(base) / model)  # config paths in a mapping are relative to the mapping file
    return TrainSetup(model=model, gpu=m.get("gpu") or None, **kwargs), note


def _stack_note(versions: str) -> str:
    """What the report says of a row whose stack predates the releases memplan's version rules were read
    against: it is planned with the oldest rules (memplan.plan.versions.OLDEST_MODELLED)."""
    from memplan.plan.versions import OLDEST_MODELLED, older_than_modelled, stack_of

    old = older_than_modelled(stack_of(versions))
    if not old:
        return ""
    shown = ", ".join(f"{p} {getattr(stack_of(versions), p)} (rules read from {getattr(OLDEST_MODELLED, p)})"
                      for p in old)
    return f"planned with the oldest rules memplan has: {shown}"


_CLAIM = re.compile(r"(?i)^(oom|fits)\s+(?:on|in)\s+(\d+(?:\.\d+)?)\s*gb")


def _claim(row: PublishedRow, gpu) -> tuple[str, float] | None:
    """("oom" | "fits", capacity in GiB) for a claim row, from the outcome text or the mapped card."""
    if gpu is not None:  # the card itself: "48GB" and "24GB" are nominal (an RTX A6000 has 47.99 GiB)
        kind = "oom" if row.outcome.lower().startswith(("oom", "outofmemory")) else "fits"
        return kind, gpu.total_bytes / GIB
    m = _CLAIM.match(row.outcome.strip())
    if m:
        return m.group(1).lower(), float(m.group(2)) * GB / GIB
    return None


def _score_one(row: PublishedRow, profiles_dir) -> PublishedResult:
    from memplan.catalog.gpus import load_gpu
    from memplan.plan.estimate import estimate
    from memplan.plan.setup import describe_setup

    if row.skip_reason:
        return PublishedResult(row, "skipped", reason=row.skip_reason)
    compare_as = row.mapping.get("compare_as", "")
    if compare_as not in _COMPARE_AS:
        raise MemplanError(f"{row.id}: compare_as {compare_as!r} is not one of {', '.join(_COMPARE_AS)}")
    try:
        setup, stack_note = _setup_from_mapping(row.mapping, row.mapping_dir)
        est = estimate(setup, profiles_dir=profiles_dir)
    except MemplanError as e:
        return PublishedResult(row, "skipped", reason=f"memplan cannot plan it: {e}")
    c = est.components
    label, phase = describe_setup(est.setup), est.peak_phase
    if compare_as == "fit":
        gpu = load_gpu(row.mapping["gpu"], profiles_dir=profiles_dir) if row.mapping.get("gpu") else None
        claim = _claim(row, gpu)
        if claim is None:
            return PublishedResult(row, "skipped", reason=f"no OOM / fits claim in outcome {row.outcome!r}")
        kind, capacity_gib = claim
        # bitsandbytes' paged optimizer state lives in CUDA managed memory, which the driver evicts to the host
        # when the card is full: the least the card must hold is the rest.
        predicted = (est.total_bytes - est.paged_bytes) / GIB
        over = predicted > capacity_gib
        status = ("oom_ok" if over else "oom_missed") if kind == "oom" else ("fits_missed" if over else "fits_ok")
        return PublishedResult(row, status, predicted_gib=predicted, capacity_gib=capacity_gib,
                               setup_label=label, peak_phase=phase, stack_note=stack_note)
    if row.measured_gib is None:
        return PublishedResult(row, "skipped", reason="no measured value")
    # the source's own CUDA-context measurement (nvidia-smi before any tensor), where it made one, replaces
    # memplan's documented default
    context = int(float(row.mapping["context_gib"]) * GIB) if row.mapping.get("context_gib") else c["cuda_context"]
    predicted_bytes = est.total_bytes - c["cuda_context"] + context
    if compare_as in ("alloc", "reserved"):
        # neither the CUDA context nor bitsandbytes' paged state (cudaMallocManaged) goes through torch's allocator
        predicted_bytes -= context + est.paged_bytes
    if compare_as == "alloc":
        predicted_bytes -= c["allocator_overhead"]
    predicted = predicted_bytes / GIB
    return PublishedResult(row, "compared", predicted_gib=predicted, error=predicted / row.measured_gib - 1,
                           setup_label=label, peak_phase=phase, stack_note=stack_note)


def score_published(rows: Iterable[PublishedRow], *, profiles_dir=None,
                    progress: Callable[[int, int], None] | None = None) -> list[PublishedResult]:
    """Estimate every mapped row and compare it in its metric."""
    rows = list(rows)
    out = []
    for i, row in enumerate(rows):
        out.append(_score_one(row, profiles_dir))
        if progress is not None:
            progress(i + 1, len(rows))
    return out
