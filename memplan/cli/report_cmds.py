"""The report subcommands: ``memplan report capacity`` (pandas and matplotlib: the ``report`` extra)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from memplan.plan.search import DEFAULT_PREFER, PREFERENCES
from memplan.reports.capacity import DEFAULT_GPUS, DEFAULT_MODELS, DEFAULT_SEQ_LENS, FITS, FORMATS, require

from .common import ProgressBar, spinner

__all__ = ["add_parsers"]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seq_lens_arg(text: str) -> list[int]:
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
    fmts = [f.lower() for f in _names(text)]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(bad) or text!r}; allowed: md, html "
                                         "(comma-separated; capacity.csv and the PNGs are always written)")
    return fmts


def add_parsers(subparsers) -> None:
    """Add ``memplan report`` and its ``capacity`` subcommand to the top-level subparsers."""
    report = subparsers.add_parser("report", help="planning reports over many models and cards (capacity)",
                                   description="Reports over many models and cards. Subcommand: capacity.")
    report.set_defaults(func=lambda args: (report.print_help(sys.stderr), 2)[1])
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
              $ memplan report capacity --models llama-3.1-8b,llama-3.1-70b --gpus 4090,a100 --format md,html --out cap
              wrote cap/capacity.md
              wrote cap/capacity.html
              wrote cap/capacity.csv
              wrote cap/capacity_heatmap_seq512.png
              wrote cap/capacity_breakdown_seq512.png
              wrote cap/capacity_heatmap_seq2048.png
              wrote cap/capacity_breakdown_seq2048.png
              wrote cap/capacity_curves.png
              8 model x card x sequence cells, 6 with a plan, in 1.9 s
            """))
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"catalog models, comma- or space-separated (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--gpus", nargs="+", default=None, metavar="GPU",
                   help=f"catalog cards or aliases; NxCARD (2x4090, 8xh100) plans N of them, one rank each "
                        f"(default: {','.join(DEFAULT_GPUS)})")
    p.add_argument("--seq-len", type=_seq_lens_arg, default=None, metavar="N[,N...]",
                   help="sequence lengths (default: 512,2048)")
    p.add_argument("--format", type=_formats_arg, default=["md"], metavar="md[,html]",
                   help="report documents to write: md, html or md,html (default md)")
    p.add_argument("--out", default=None, help="report folder (default: a new memplan-capacity-<time>/ here)")
    p.add_argument("--force", action="store_true", help="replace the report files --out already holds")
    p.add_argument("--headroom", type=float, default=None, help="fraction of each card kept free (default 0.05)")
    p.add_argument("--prefer", choices=PREFERENCES, default=DEFAULT_PREFER,
                   help=f"the ranking of each cell, as memplan fit --prefer (default {DEFAULT_PREFER})")
    p.add_argument("--curve-model", default=None, help="model of the peak-vs-batch/sequence figure (default: ~8B)")
    p.add_argument("--versions", default=None, metavar="PKG=VER[,...]",
                   help="library versions to plan for, as memplan fit --versions (default: the installed ones)")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="run records to list beside the estimates (default: the catalog's runs/)")
    p.add_argument("--profiles", metavar="DIR", help="catalog folder (default: MEMPLAN_PROFILES or the bundled one)")
    p.set_defaults(func=_run_capacity)


def _run_capacity(args) -> int:
    import shlex
    import time

    from memplan.reports.capacity import capacity_rows, card_count
    from memplan.reports.capacity_docs import write_capacity_report

    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.plan.budget import check_headroom

    models = [n for item in (args.models or [",".join(DEFAULT_MODELS)]) for n in _names(item)]
    gpus = [n for item in (args.gpus or [",".join(DEFAULT_GPUS)]) for n in _names(item)]
    seq_lens = args.seq_len or list(DEFAULT_SEQ_LENS)
    # Bad names and values first (their own message, with or without the report extra), then the extra,
    # then the search: nothing fails after minutes of work.
    for name in models + ([args.curve_model] if args.curve_model else []):
        load_model(name, profiles_dir=args.profiles)
    for name in gpus:
        load_gpu(card_count(name)[1], profiles_dir=args.profiles)
    check_headroom(args.headroom)
    from memplan.plan.versions import resolve_versions
    resolve_versions(args.versions)  # a bad --versions is reported before the report extra is needed
    require("matplotlib")
    from memplan.fileio import fresh_dir_name, prepare_output_dir
    from memplan.reports.capacity_docs import capacity_files

    out_dir = prepare_output_dir(args.out or fresh_dir_name("memplan-capacity"), force=args.force,
                                 produces=capacity_files(seq_lens, args.format))
    t0 = time.perf_counter()
    with ProgressBar("capacity: the fit search per cell") as bar:
        rows = capacity_rows(models, gpus, seq_lens, profiles_dir=args.profiles, headroom=args.headroom,
                             prefer=args.prefer, progress=bar.update, versions=args.versions)
    parts = ["memplan", "report", "capacity"]
    for flag, value in (("--models", args.models and ",".join(models)), ("--gpus", args.gpus and ",".join(gpus)),
                        ("--seq-len", args.seq_len and ",".join(map(str, seq_lens))),
                        ("--headroom", args.headroom),
                        ("--prefer", args.prefer if args.prefer != DEFAULT_PREFER else None),
                        ("--curve-model", args.curve_model), ("--versions", args.versions),
                        ("--format", ",".join(args.format)), ("--out", str(out_dir))):
        if value is not None:
            parts += [flag, str(value)]
    command = shlex.join(parts)
    with spinner(f"capacity: drawing the figures and writing {out_dir}"):
        paths = write_capacity_report(rows, out_dir, args.format, command=command, curve_model=args.curve_model,
                                      profiles_dir=args.profiles, runs_dir=args.runs)
    for path in paths:
        print(f"wrote {path}")
    fits = sum(r.status == FITS for r in rows)
    print(f"{len(rows)} model x card x sequence cells, {fits} with a plan, in {time.perf_counter() - t0:.1f} s")
    return 0
