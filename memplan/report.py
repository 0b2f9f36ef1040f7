"""Capacity-planning reports: the best ``memplan fit`` plan for every model x card x sequence length.

``capacity_rows`` runs the same search as ``memplan fit`` (``memplan.fit.fit_for``) over a grid and returns
plain frozen dataclasses; ``capacity_frame`` turns them into a pandas DataFrame; ``write_capacity_report``
writes ``capacity.md``, ``capacity.csv``, PNG figures and, on request, one self-contained ``capacity.html``.
The core imports only the standard library: pandas, matplotlib (``report_plots``) and rich are imported inside
the functions that need them, so ``import memplan.report`` stays cheap.

Example::

    $ memplan report capacity --models llama-3.1-8b,llama-3.1-70b --gpus 4090,a100 --seq-len 512,2048
    wrote reports/capacity.md
    ...
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidSetupError, MemplanError
from .estimate import COMPONENTS

__all__ = ["CapacityRow", "CurvePoint", "DEFAULT_MODELS", "DEFAULT_GPUS", "DEFAULT_SEQ_LENS", "FORMATS",
           "ReportDependencyError", "capacity_rows", "capacity_frame", "peak_curves", "measured_runs",
           "write_capacity_report",
           "add_report_parser"]

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


def _quant_label(setup) -> str:
    if setup.bits == 4:
        return f"{setup.quant_type}{'+dq' if setup.double_quant else ''}"
    if setup.bits == 8:
        return "int8"
    return setup.dtype


def _check_seq_len(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSetupError(f"invalid sequence length {value!r}; must be an integer >= 1")
    return value


def _fit_row(spec, gpu, seq_len: int, headroom: float, labels: dict[str, str], profiles_dir) -> CapacityRow:
    from .fit import fit_for
    from .setups import TrainSetup

    base = dict(model=spec.name, model_params=spec.total_params(), gpu=gpu.label, gpu_id=gpu.id, seq_len=seq_len,
                gpu_total_bytes=gpu.total_bytes, usable_bytes=gpu.usable_bytes(headroom),
                budget_bytes=gpu.total_bytes - gpu.headroom_bytes(headroom))
    limit = spec.max_seq_len or spec.max_position_embeddings
    if limit and seq_len > limit:
        return CapacityRow(status=NOT_APPLICABLE, reason=f"max {limit:,} tokens (max_position_embeddings)",
                           **base)
    try:
        # Same call as `memplan fit MODEL --gpu GPU --seq-len N` (the flag pins seq_len).
        r = fit_for(spec, TrainSetup(spec.name, seq_len=seq_len), gpu, headroom=headroom,
                    pinned=frozenset({"seq_len"}), profiles_dir=profiles_dir)
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
                       notes="; ".join(e.notes) or None, components=dict(e.components), **base)


def capacity_rows(models: Sequence[str], gpus: Sequence[str], seq_lens: Sequence[int], *, profiles_dir=None,
                  headroom: float | None = None) -> list[CapacityRow]:
    """The best plan (``memplan.fit.fit_for``) for every sequence length x model x card, in that order.

    Args:
        models: catalog names (or config.json paths) as ``memplan fit`` takes them.
        gpus: catalog cards, aliases or budgets (``24GiB``).
        seq_lens: tokens per sequence; a length beyond a model's ``max_position_embeddings`` gives an
            ``n/a`` row, not an error.
        profiles_dir: another catalog folder.
        headroom: fraction of each card kept free (default ``gpus.DEFAULT_HEADROOM``, as ``memplan fit``).

    Raises:
        UnknownModelError, UnknownGPUError: a name not in the catalog (with close matches).
        InvalidSetupError: an empty list, a sequence length < 1 or a headroom out of range.
    """
    from .gpus import DEFAULT_HEADROOM, list_gpus, load_gpu
    from .models import load_model

    for what, values in (("models", models), ("GPUs", gpus), ("sequence lengths", seq_lens)):
        if not values:
            raise InvalidSetupError(f"a capacity report needs at least one of {what}, got none")
    seqs = list(dict.fromkeys(_check_seq_len(s) for s in seq_lens))
    specs = list({spec.name: spec for spec in (load_model(m, profiles_dir=profiles_dir) for m in models)}.values())
    cards = list({g.id: g for g in (load_gpu(g, profiles_dir=profiles_dir) for g in gpus)}.values())
    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    cards[0].headroom_bytes(headroom)  # validates the headroom before the grid turns it into n/a cells
    labels = {g.name: g.label for g in list_gpus(profiles_dir=profiles_dir)}
    return [_fit_row(spec, gpu, seq, headroom, labels, profiles_dir) for seq in seqs for spec in specs for gpu in cards]


def capacity_frame(models: Sequence[str], gpus: Sequence[str], seq_lens: Sequence[int], *, profiles_dir=None,
                   headroom: float | None = None):
    """``capacity_rows`` as a pandas DataFrame: one row per cell, columns ``CSV_COLUMNS`` (bytes, not GiB).

    Raises:
        ReportDependencyError: pandas is not installed.
    """
    rows = capacity_rows(models, gpus, seq_lens, profiles_dir=profiles_dir, headroom=headroom)
    return _frame(rows)


def _frame(rows: Sequence[CapacityRow]):
    pd = _require("pandas")  # the `report` extra; imported here only
    df = pd.DataFrame([r.to_record() for r in rows], columns=list(CSV_COLUMNS))
    # Cells where nothing fits have no plan: nullable dtypes keep bytes exact integers (not NaN floats).
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    df["grad_ckpt"] = df["grad_ckpt"].astype("boolean")
    return df


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == module.split(".")[0]:
            raise ReportDependencyError(f"capacity reports need {module}, which is not installed; install it "
                                        "with: pip install 'memplan[report]'") from None
        raise


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
    from .estimate import estimate_for
    from .gpus import load_gpu
    from .models import load_model
    from .setups import TrainSetup, resolve_setup

    spec = load_model(model, profiles_dir=profiles_dir)
    card = load_gpu(gpu, profiles_dir=profiles_dir) if gpu else None
    limit = spec.max_seq_len or spec.max_position_embeddings or max(seq_lens)
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


# ---- writing ------------------------------------------------------------------------------------------------
def write_capacity_report(rows: Sequence[CapacityRow], out_dir: str | os.PathLike, formats: Sequence[str] = ("md",),
                          *, command: str | None = None, curve_model: str | None = None,
                          profiles_dir=None, runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``capacity.csv``, the PNG figures, and ``capacity.md`` / ``capacity.html`` per ``formats``.

    Args:
        rows: ``capacity_rows(...)``.
        out_dir: the report folder (created if missing); every file is replaced atomically.
        formats: any of ``md`` and ``html``.
        command: the command line shown in the report (default: a ``memplan report capacity`` equivalent).
        curve_model: the model of the peak-vs-batch / peak-vs-sequence figure (default: the one nearest 8B
            parameters).
        profiles_dir: the catalog the rows came from (for the curves).
        runs_dir: run records (``memplan profile`` / ``MemplanCallback``) to set beside the estimates: GPU runs
            of the report's models are listed with estimate ÷ measured (default: the catalog's ``runs/``).

    Returns:
        The paths written, the main document first.

    Raises:
        ReportDependencyError: matplotlib is not installed.
        InvalidSetupError: an unknown format or no rows.
    """
    from . import report_docs, report_plots
    from .fileio import write_atomic

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidSetupError(f"unknown report format {', '.join(unknown) or '(none)'!r}; allowed: "
                                f"{', '.join(FORMATS)} (capacity.csv and the PNGs are always written)")
    if not rows:
        raise InvalidSetupError("no rows to report")
    _require("matplotlib")
    out = Path(out_dir)
    command = command or _default_command(rows, formats, out)
    figures = _figures(rows, curve_model, profiles_dir)
    measured = measured_runs(rows, runs_dir if runs_dir is not None else _default_runs_dir(profiles_dir))
    written: list[Path] = []
    for fig in figures:
        fig.path = out / fig.name
        report_plots.draw(fig)
        written.append(fig.path)
    csv_path = out / "capacity.csv"
    write_atomic(csv_path, lambda f: f.write(_csv_text(rows)))
    written.insert(0, csv_path)
    docs = []
    if "md" in formats:
        md = out / "capacity.md"
        write_atomic(md, lambda f: f.write(report_docs.markdown(rows, figures, command, measured)))
        docs.append(md)
    if "html" in formats:
        html = out / "capacity.html"
        write_atomic(html, lambda f: f.write(report_docs.html(rows, figures, command, measured)))
        docs.append(html)
    return docs + written


def _default_runs_dir(profiles_dir) -> Path:
    from .catalog import profiles_dir as catalog_dir

    return Path(catalog_dir(profiles_dir)) / "runs"


def measured_runs(rows: Sequence[CapacityRow], runs_dir: str | os.PathLike) -> list:
    """The GPU run records (``memplan profile --device cuda``, ``MemplanCallback`` on a GPU) of the report's
    models, each with its analytic estimate (``memplan.validate.RunRow``: measured = peak reserved + CUDA
    context). CPU records are left out: they measure tensors on a CPU, not a card. Empty when the folder does
    not exist or holds none; unreadable records are skipped with a warning by ``validate_runs``."""
    from .validate import validate_runs

    if not Path(runs_dir).is_dir():
        return []
    models = {r.model for r in rows}
    return [row for row in validate_runs(runs_dir, simulate_runs=False)
            if row.device == "cuda" and row.setup.get("model") in models and row.measured_bytes]


def _csv_text(rows: Sequence[CapacityRow]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.to_record().items()})
    return buf.getvalue()


@dataclass
class Figure:
    """One PNG of the report: what to draw (``kind`` + ``data``), where, and its caption."""

    name: str
    kind: str  # "heatmap" | "breakdown" | "curves"
    title: str
    caption: str
    seq_len: int | None
    data: dict
    path: Path | None = None


def _representative_card(rows: Sequence[CapacityRow]) -> str:
    """The card id nearest 24 GiB (a 3090/4090 class card): the breakdown figure's card."""
    cards = {r.gpu_id: r.gpu_total_bytes for r in rows}
    return min(cards, key=lambda g: (abs(cards[g] - 24 * 2**30), -cards[g]))


def _figures(rows: Sequence[CapacityRow], curve_model: str | None, profiles_dir) -> list[Figure]:
    figs: list[Figure] = []
    card = _representative_card(rows)
    card_row = next(r for r in rows if r.gpu_id == card)
    for seq in dict.fromkeys(r.seq_len for r in rows):
        at_seq = [r for r in rows if r.seq_len == seq]
        figs.append(Figure(f"capacity_heatmap_seq{seq}.png", "heatmap",
                           f"Best plan per model and card, sequence length {seq:,}",
                           "Colour: the base-weight precision of the best plan; text: bits and the largest "
                           "micro-batch.",
                           seq, {"rows": at_seq}))
        figs.append(Figure(f"capacity_breakdown_seq{seq}.png", "breakdown",
                           f"Where the memory goes on the {card_row.gpu}, sequence length {seq:,}",
                           f"Each bar is the chosen plan of one model on the {card_row.gpu} (hatched: nothing fits, "
                           "the leanest plan is shown).", seq, {"rows": [r for r in at_seq if r.gpu_id == card]}))
    params = {r.model: r.model_params for r in rows}
    model = curve_model or min(params, key=lambda m: abs(params[m] - 8e9))
    cards = {r.gpu_id: r for r in rows}
    points = peak_curves(model, gpu=card, profiles_dir=profiles_dir)
    if not points:
        return figs
    name = points[0].model
    caption = ("LoRA r=64 on all linear layers, AdamW. Dotted lines: each card's limit for the peak (total memory "
               "− headroom). 4-bit climbs faster: prepare_model_for_kbit_training keeps the hidden states in fp32.")
    figs.append(Figure("capacity_curves.png", "curves", f"Peak memory of {name} against batch size and sequence "
                       "length", caption, None, {"points": points, "cards": list(cards.values()), "model": name}))
    return figs


def _default_command(rows: Sequence[CapacityRow], formats: Sequence[str], out: Path) -> str:
    models = ",".join(dict.fromkeys(r.model for r in rows))
    gpus = ",".join(dict.fromkeys(r.gpu_id for r in rows))
    seqs = ",".join(str(s) for s in dict.fromkeys(r.seq_len for r in rows))
    return (f"memplan report capacity --models {models} --gpus {gpus} --seq-len {seqs} --format {','.join(formats)} "
            f"--out {out}")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seq_lens_arg(text: str) -> list[int]:
    import argparse

    out = []
    for t in _names(text) or [text]:
        try:
            n = int(t.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid sequence length {t!r}; give integers >= 1 like 512,2048"
                                             ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"invalid sequence length {n}; must be >= 1")
        out.append(n)
    return out


def _formats_arg(text: str) -> list[str]:
    import argparse

    fmts = [f.lower() for f in _names(text)]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(bad) or text!r}; allowed: md, html "
                                         "(comma-separated; capacity.csv and the PNGs are always written)")
    return fmts


def add_report_parser(subparsers) -> None:
    """Add ``memplan report`` and its ``capacity`` subcommand to the top-level subparsers."""
    import argparse

    report = subparsers.add_parser("report", help="planning reports over many models and cards (capacity)",
                                   description="Reports over many models and cards. Subcommand: capacity.")
    report.set_defaults(func=lambda args: (report.print_help(), 2)[1])
    sub = report.add_subparsers(dest="report_command", parser_class=type(report))
    p = sub.add_parser(
        "capacity", help="the best fit plan for every model x card x sequence length: Markdown/HTML, CSV, PNGs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Runs the `memplan fit` search for every model x card x sequence length and writes capacity.md
            (and/or capacity.html), capacity.csv and PNG figures: a heat map of the best plan per sequence
            length, the memory breakdown of each chosen plan on a ~24 GiB card, and peak-memory curves."""),
        epilog=textwrap.dedent("""\
            example:
              $ memplan report capacity --models llama-3.1-8b,llama-3.1-70b --gpus 4090,a100 --format md,html
              wrote reports/capacity.md
              wrote reports/capacity.html
              wrote reports/capacity.csv
              wrote reports/capacity_heatmap_seq512.png
              wrote reports/capacity_breakdown_seq512.png
              wrote reports/capacity_heatmap_seq2048.png
              wrote reports/capacity_breakdown_seq2048.png
              wrote reports/capacity_curves.png
              8 model x card x sequence cells, 6 with a plan, in 1.9 s
            """))
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"catalog models, comma- or space-separated (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--gpus", nargs="+", default=None, metavar="GPU",
                   help=f"catalog cards or aliases (default: {','.join(DEFAULT_GPUS)})")
    p.add_argument("--seq-len", type=_seq_lens_arg, default=None, metavar="N[,N...]",
                   help="sequence lengths (default: 512,2048)")
    p.add_argument("--format", type=_formats_arg, default=["md"], metavar="md[,html]",
                   help="report documents to write: md, html or md,html (default md)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    p.add_argument("--headroom", type=float, default=None, help="fraction of each card kept free (default 0.05)")
    p.add_argument("--curve-model", default=None, help="model of the peak-vs-batch/sequence figure (default: ~8B)")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="run records to list beside the estimates (default: the catalog's runs/)")
    p.add_argument("--profiles", metavar="DIR", help="catalog folder (default: MEMPLAN_PROFILES or the bundled one)")
    p.set_defaults(func=_run_capacity)


def _run_capacity(args) -> int:
    import shlex
    import time

    _require("matplotlib")  # fail before the search, with the install hint
    models = [n for item in (args.models or [",".join(DEFAULT_MODELS)]) for n in _names(item)]
    gpus = [n for item in (args.gpus or [",".join(DEFAULT_GPUS)]) for n in _names(item)]
    seq_lens = args.seq_len or list(DEFAULT_SEQ_LENS)
    if args.curve_model:
        from .models import load_model

        load_model(args.curve_model, profiles_dir=args.profiles)  # an unknown name fails before the search
    t0 = time.perf_counter()
    rows = capacity_rows(models, gpus, seq_lens, profiles_dir=args.profiles, headroom=args.headroom)
    parts = ["memplan", "report", "capacity"]
    for flag, value in (("--models", args.models and ",".join(models)), ("--gpus", args.gpus and ",".join(gpus)),
                        ("--seq-len", args.seq_len and ",".join(map(str, seq_lens))),
                        ("--headroom", args.headroom), ("--curve-model", args.curve_model),
                        ("--format", ",".join(args.format)), ("--out", args.out)):
        if value is not None:
            parts += [flag, str(value)]
    command = shlex.join(parts)
    paths = write_capacity_report(rows, args.out, args.format, command=command, curve_model=args.curve_model,
                                  profiles_dir=args.profiles, runs_dir=args.runs)
    for path in paths:
        print(f"wrote {path}")
    fits = sum(r.status == FITS for r in rows)
    print(f"{len(rows)} model x card x sequence cells, {fits} with a plan, in {time.perf_counter() - t0:.1f} s")
    return 0
