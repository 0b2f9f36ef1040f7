"""Capacity planning: the best ``memplan fit`` plan for every model x card x sequence length.

``capacity_rows`` runs the same search as ``memplan fit`` (``memplan.plan.search.fit_for``, same call, same
budget) over a grid and returns plain frozen dataclasses; ``capacity_frame`` turns them into a pandas DataFrame;
``peak_curves`` gives the peak of fixed plans against batch and sequence. The documents and pictures are
``capacity_docs`` and ``capacity_plots``. Standard library only here: pandas is imported inside
``capacity_frame``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memplan.errors import InvalidSetupError, MemplanError
from memplan.plan.breakdown import COMPONENTS
from memplan.plan.multi_fit import MAX_AUTO_GPUS

__all__ = ["CapacityRow", "CurvePoint", "DEFAULT_MODELS", "DEFAULT_GPUS", "DEFAULT_SEQ_LENS", "FORMATS",
           "FITS", "NO_FIT", "NOT_APPLICABLE", "CSV_COLUMNS", "ReportDependencyError", "capacity_rows",
           "capacity_frame", "peak_curves", "measured_runs", "require", "targets_short", "card_count",
           "card_order"]

# Popular open models from 1B to 70B (catalog ids, `memplan models`), smallest first.
DEFAULT_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "mistral-7b-v0.1", "llama-3.1-8b", "llama-2-13b-hf",
                  "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b")
# The cards people fine-tune on, one per memory class from 12 GB to 80 GB (catalog ids, `memplan gpus`).
DEFAULT_GPUS = ("rtx-3060-12gb", "rtx-4080", "rtx-4090", "a100-40gb", "l40s", "rtx-a6000", "a100-80gb",
                "h100-80gb")
# A short-instruction and a long-context fine-tuning length.
DEFAULT_SEQ_LENS = (512, 2048)
FORMATS = ("md", "html")  # capacity.csv and the PNGs are always written

FITS, NO_FIT, NOT_APPLICABLE = "fits", "no-fit", "n/a"


class ReportDependencyError(MemplanError):
    """A report needs pandas or matplotlib (the ``report`` extra), which is not installed."""


@dataclass(frozen=True)
class CapacityRow:
    """The outcome of ``memplan fit MODEL --gpu GPU --seq-len SEQ`` for one cell of the grid.

    ``status`` is ``fits`` (the plan fields describe the recommended plan), ``no-fit`` (nothing fits: see
    ``leanest_peak_bytes`` and ``smallest_gpu``) or ``n/a`` (the model cannot take the sequence length:
    ``reason``). ``headroom_left_bytes`` is ``memplan fit``'s "to spare": the card's budget (total minus
    headroom) minus the peak, i.e. usable memory minus what the plan asks of torch's allocator.
    """

    model: str
    model_params: int
    gpu: str  # short card label ("RTX 4090")
    gpu_id: str
    seq_len: int
    status: str
    gpu_total_bytes: int
    usable_bytes: int  # total - CUDA context - headroom
    budget_bytes: int  # total - headroom: what a peak (CUDA context included) may reach
    prefer: str = "balanced"  # the ranking the search used (memplan.plan.search.PREFERENCES)
    bits: int | None = None
    quant: str | None = None  # "bf16" / "fp16" (16-bit), "int8" (LLM.int8), "nf4+dq" / "nf4" / "fp4" (4-bit)
    rank: int | None = None
    targets: str | None = None
    batch_size: int | None = None
    grad_ckpt: bool | None = None
    optimizer: str | None = None
    peak_bytes: int | None = None
    headroom_left_bytes: int | None = None
    peak_phase: str | None = None
    max_seq_len_batch1: int | None = None  # longest sequence the plan's settings fit at batch 1
    leanest_peak_bytes: int | None = None  # when nothing fits: the leanest plan searched
    smallest_gpu: str | None = None  # when nothing fits: the smallest catalog card holding the leanest plan
    reason: str | None = None  # why the cell is n/a
    notes: str | None = None  # the estimate's caveats, "; "-joined (e.g. LLM.int8 not yet calibrated on a GPU)
    versions: str | None = None  # the library stack planned for (setup.versions, memplan.plan.versions)
    gpu_count: int = 1  # cards of the kind ("2x4090": 2), each rank's peak within one card
    strategy: str | None = None  # the engine the plan runs on several cards (memplan.plan.distributed)
    offload: str | None = None  # what that engine keeps in host memory
    # Breakdown of the plan (or, when nothing fits, of the leanest plan): COMPONENTS -> bytes.
    components: dict[str, int] = field(default_factory=dict, hash=False, repr=False)

    def to_record(self) -> dict:
        """A flat dict: the CSV / DataFrame row (components as ``<component>_bytes`` columns)."""
        rec = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        rec.update({f"{c}_bytes": self.components.get(c) for c in COMPONENTS})
        return rec


_SCALAR_FIELDS = tuple(f for f in CapacityRow.__dataclass_fields__ if f != "components")
CSV_COLUMNS = _SCALAR_FIELDS + tuple(f"{c}_bytes" for c in COMPONENTS)
_INT_COLUMNS = ("model_params", "seq_len", "gpu_total_bytes", "usable_bytes", "budget_bytes", "bits", "rank",
                "batch_size", "peak_bytes", "headroom_left_bytes", "max_seq_len_batch1", "leanest_peak_bytes",
                *(f"{c}_bytes" for c in COMPONENTS))


def card_order(r: CapacityRow) -> tuple:
    """How columns of cards sort: smaller cards first; one card before two of it before eight."""
    return r.gpu_total_bytes, r.gpu_id.split("x-", 1)[-1] if r.gpu_count > 1 else r.gpu_id, r.gpu_count


def _quant_label(setup) -> str:
    if setup.bits == 4:
        return f"{setup.quant_type}{'+dq' if setup.double_quant else ''}"
    if setup.bits == 8:
        return "int8"
    return setup.dtype


# The capacity grid plans plain steps: no fused or chunked loss, no activation offloading (memplan.plan.savers)
PLAIN_STEP = {"loss": "default", "activation_offload": "off"}

def _check_seq_len(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSetupError(f"invalid sequence length {value!r}; must be an integer >= 1")
    return value


def card_count(text: str) -> tuple[int, str]:
    """``2x4090`` / ``8xh100`` / ``4090``: (how many cards, the card's name)."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\S.*)", str(text))
    if not m:
        return 1, text
    count = int(m.group(1))
    if not 1 <= count <= MAX_AUTO_GPUS:
        raise InvalidSetupError(f"invalid card count {count} in {text!r}; allowed: 1 to {MAX_AUTO_GPUS}")
    return count, m.group(2)


def _fit_row(spec, gpu, seq_len: int, headroom: float, labels: dict[str, str], profiles_dir,
             prefer: str, versions: str | None = None, count: int = 1) -> CapacityRow:
    from memplan.plan.budget import Budget
    from memplan.plan.multi_fit import split_gpus
    from memplan.plan.search import fit_for
    from memplan.plan.setup import TrainSetup, sequence_limit

    budget = Budget.for_gpu(gpu, headroom)
    label, gpu_id = (gpu.label, gpu.id) if count == 1 else (f"{count}x {gpu.label}", f"{count}x-{gpu.id}")
    base = dict(model=spec.name, model_params=spec.total_params(), gpu=label, gpu_id=gpu_id, seq_len=seq_len,
                gpu_total_bytes=gpu.total_bytes, usable_bytes=budget.usable_bytes, budget_bytes=budget.limit_bytes,
                prefer=prefer, versions=versions, gpu_count=count)
    per_node, nodes = split_gpus(count)
    limit = sequence_limit(spec)  # fit refuses these too; the cell gets a short reason
    if limit and seq_len > limit:
        return CapacityRow(status=NOT_APPLICABLE, reason=f"max {limit:,} tokens (trained context)",
                           **base)
    try:
        # Same call as `memplan fit MODEL --gpu GPU --seq-len N --loss default --activation-offload off --prefer P`
        # (the flags pin them): a cell is a plain training step, as its columns say; the savers fit would add
        # (memplan.plan.savers) are for one model and card at a time.
        r = fit_for(spec, TrainSetup(spec.name, seq_len=seq_len, versions=versions, gpus=per_node, nodes=nodes,
                                     **PLAIN_STEP), gpu,
                    headroom=headroom, pinned=frozenset({"seq_len", "gpus", "nodes", *PLAIN_STEP}), prefer=prefer,
                    profiles_dir=profiles_dir)
    except InvalidSetupError as exc:  # e.g. an architecture that cannot run on this card at all
        return CapacityRow(status=NOT_APPLICABLE, reason=str(exc), **base)
    if r.recommended is None:
        smallest = labels.get(r.smallest_gpu, r.smallest_gpu) if r.smallest_gpu else None
        return CapacityRow(status=NO_FIT, leanest_peak_bytes=r.leanest.total_bytes, smallest_gpu=smallest,
                           components=dict(r.leanest.components), **base)
    e, s = r.recommended, r.recommended.setup
    return CapacityRow(status=FITS, bits=s.bits, quant=_quant_label(s), rank=s.rank, targets=s.targets,
                       batch_size=s.batch_size, grad_ckpt=s.grad_ckpt, optimizer=s.optimizer,
                       peak_bytes=e.total_bytes, headroom_left_bytes=r.budget_bytes - e.total_bytes,
                       peak_phase=e.peak_phase, max_seq_len_batch1=r.max_seq_len_batch1,
                       notes="; ".join(e.notes) or None, components=dict(e.components),
                       strategy=s.strategy if count > 1 else None, offload=s.offload if count > 1 else None, **base)


def capacity_rows(models: Sequence[str], gpus: Sequence[str], seq_lens: Sequence[int], *, profiles_dir=None,
                  headroom: float | None = None, prefer: str = "balanced",
                  progress: Callable[[int, int, str], None] | None = None,
                  versions: str | None = None) -> list[CapacityRow]:
    """The best plan (``memplan.plan.search.fit_for``) for every sequence length x model x card, in that order.

    Args:
        models: catalog names (or config.json paths) as ``memplan fit`` takes them.
        gpus: catalog cards, aliases or budgets (``24GiB``); ``2x4090`` plans two of them (one rank each).
        seq_lens: tokens per sequence; a length beyond a model's ``max_position_embeddings`` gives an
            ``n/a`` row, not an error.
        profiles_dir: another catalog folder.
        headroom: fraction of each card kept free (default ``memplan.plan.budget.DEFAULT_HEADROOM``, as
            ``memplan fit``).
        prefer: the ranking, as ``memplan fit --prefer`` (``memplan.plan.search.PREFERENCES``).
        progress: called after each cell with (cells done, cells in all, the cell just done).
        versions: the library stack to plan for, as ``memplan fit --versions`` (default: the installed one).

    Raises:
        UnknownModelError, UnknownGPUError: a name not in the catalog (with close matches).
        InvalidSetupError: an empty list, a sequence length < 1, a headroom out of range or an unknown
            preference.
    """
    from memplan.catalog.gpus import list_gpus, load_gpu
    from memplan.catalog.models import load_model
    from memplan.plan.budget import check_headroom

    for what, values in (("models", models), ("GPUs", gpus), ("sequence lengths", seq_lens)):
        if not values:
            raise InvalidSetupError(f"a capacity report needs at least one of {what}, got none")
    seqs = list(dict.fromkeys(_check_seq_len(s) for s in seq_lens))
    specs = list({spec.name: spec for spec in (load_model(m, profiles_dir=profiles_dir) for m in models)}.values())
    counted = [card_count(g) for g in gpus]  # "2x4090": two cards per plan, each rank within one
    cards = list({(n, g.id): (n, g) for n, g in ((n, load_gpu(name, profiles_dir=profiles_dir))
                                                 for n, name in counted)}.values())
    headroom = check_headroom(headroom)  # before the grid turns a bad value into n/a cells
    from memplan.plan.versions import resolve_versions
    versions = resolve_versions(versions)  # a bad --versions fails here, not as n/a cells
    from memplan.plan.search import PREFERENCES
    if prefer not in PREFERENCES:
        raise InvalidSetupError(f"invalid preference {prefer!r}; allowed: {', '.join(PREFERENCES)}")
    labels = {g.name: g.label for g in list_gpus(profiles_dir=profiles_dir)}
    cells = [(seq, spec, count, gpu) for seq in seqs for spec in specs for count, gpu in cards]
    rows = []
    for seq, spec, count, gpu in cells:
        rows.append(_fit_row(spec, gpu, seq, headroom, labels, profiles_dir, prefer, versions, count))
        if progress is not None:
            progress(len(rows), len(cells), f"{spec.name} on {rows[-1].gpu} at {seq:,} tokens")
    return rows


def capacity_frame(models: Sequence[str], gpus: Sequence[str], seq_lens: Sequence[int], *, profiles_dir=None,
                   headroom: float | None = None, prefer: str = "balanced"):
    """``capacity_rows`` as a pandas DataFrame: one row per cell, columns ``CSV_COLUMNS`` (bytes, not GiB).

    Raises:
        ReportDependencyError: pandas is not installed.
    """
    rows = capacity_rows(models, gpus, seq_lens, profiles_dir=profiles_dir, headroom=headroom, prefer=prefer)
    return _frame(rows)


def _frame(rows: Sequence[CapacityRow]):
    pd = require("pandas")  # the `report` extra; imported here only
    df = pd.DataFrame([r.to_record() for r in rows], columns=list(CSV_COLUMNS))
    # Cells where nothing fits have no plan: nullable dtypes keep bytes exact integers (not NaN floats).
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    df["grad_ckpt"] = df["grad_ckpt"].astype("boolean")
    return df


def require(module: str):
    """Import ``module`` of the ``report`` extra, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == module.split(".")[0]:
            raise ReportDependencyError(f"capacity reports need {module}, which is not installed; install it "
                                        "with: pip install 'memplan[report]'") from None
        raise



def measured_runs(rows: Sequence[CapacityRow], runs_dir: str | os.PathLike) -> list:
    """The GPU run records (``memplan profile --device cuda``, ``MemplanCallback`` on a GPU) of the report's
    models, each with its analytic estimate (``memplan.validate.RunRow``: measured = peak reserved + CUDA
    context). CPU records are left out: they measure tensors on a CPU, not a card. Empty when the folder does
    not exist or holds none; unreadable records are skipped with a warning by ``validate_runs``."""
    from memplan.measure.validate import validate_runs

    if not Path(runs_dir).is_dir():
        return []
    models = {r.model for r in rows}
    return [row for row in validate_runs(runs_dir, simulate_runs=False)
            if row.device == "cuda" and row.setup.get("model") in models and row.measured_bytes]



# ---- peak curves --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    """The peak of one fixed plan of ``model`` at one batch size and sequence length (``axis``: what varies)."""

    model: str
    axis: str  # "batch" or "seq_len"
    bits: int
    grad_ckpt: bool
    batch_size: int
    seq_len: int
    peak_bytes: int


def peak_curves(model: str, *, gpu: str | None = None, bits: Sequence[int] = (16, 4), rank: int = 64,
                targets: str = "all-linear", seq_len: int = 512, batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                seq_lens: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
                profiles_dir=None) -> list[CurvePoint]:
    """Peak memory of ``model`` (LoRA ``rank`` on ``targets``, AdamW) against the batch size at ``seq_len``,
    and against the sequence length at batch 1, for each of ``bits``, with and without checkpointing.
    ``gpu`` sets the CUDA context and dtype; sequence lengths past the model's positions are left out."""
    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup, sequence_limit

    spec = load_model(model, profiles_dir=profiles_dir)
    card = load_gpu(gpu, profiles_dir=profiles_dir) if gpu else None
    limit = sequence_limit(spec) or max(seq_lens)
    points: list[CurvePoint] = []
    for b in bits:
        for ckpt in (False, True):
            knobs = dict(method="qlora" if b == 4 else "lora", bits=b, rank=rank, targets=targets, grad_ckpt=ckpt)
            grid = [("batch", n, seq_len) for n in batches] + [("seq_len", 1, s) for s in seq_lens if s <= limit]
            for axis, n, s in grid:
                try:
                    setup = resolve_setup(TrainSetup(spec.name, batch_size=n, seq_len=s, **knobs), spec, card)
                except InvalidSetupError:  # e.g. all-linear on Mixtral's experts needs lora_dropout 0
                    continue
                points.append(CurvePoint(spec.name, axis, b, ckpt, n, s, estimate_for(spec, setup, card).total_bytes))
    return points



def targets_short(targets: str | None) -> str:
    """``all-linear`` stays; a list of modules loses ``_proj``: ``q_proj,v_proj`` -> ``q,v``."""
    if not targets or targets == "all-linear":
        return targets or ""
    return ",".join(t.removesuffix("_proj") for t in targets.split(","))
