"""The planning subcommands: ``estimate``, ``fit``, ``models`` and ``gpus``. Planning imports no torch."""

from __future__ import annotations

import argparse

from memplan.plan.search import DEFAULT_MAX_BATCH, DEFAULT_PREFER, PREFERENCES

from .common import add_config_args, add_knobs, console, print_config, print_json, setup_with_configs

__all__ = ["add_parsers"]

_MODEL_HELP = ("catalog name (memplan models), config.json path or local model folder (or --model, or a --config "
               "that names it)")


def add_parsers(sub) -> None:
    p = sub.add_parser("estimate", help="peak memory breakdown of one exact setup",
                       description="The breakdown of one setup. With --gpu, whether it fits that card: exit status "
                                   "0 when it fits (or no card is named), 1 when it does not, 2 for bad input.")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--gpu", help="card or budget to check it against (memplan gpus; 24GiB); also sets the CUDA "
                                 "context and dtype defaults")
    p.add_argument("--headroom", type=float, default=None,
                   help="fraction of the card's memory kept free (default 0.05)")
    add_knobs(p)
    add_config_args(p)
    p.add_argument("--phases", action="store_true", help="also show the total of every phase")
    p.set_defaults(func=run_estimate)

    p = sub.add_parser("fit", help="the best bits / rank / batch / checkpointing / optimizer that fit a card",
                       description="Search bits x rank x targets x checkpointing x optimizer x batch size; "
                                   "any setup flag pins that knob.")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--gpu", required=True, help="catalog card or alias (3090, a100-80g ...), or a size (24GiB)")
    p.add_argument("--headroom", type=float, default=None,
                   help="fraction of the card's memory kept free (default 0.05)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest micro-batch to consider (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--prefer", choices=PREFERENCES, default=DEFAULT_PREFER,
                   help="what the ranking puts first: balanced (QLoRA before LLM.int8, then the fastest step), "
                        "quality (the most precise weights, largest rank), speed (the shortest expected step "
                        f"time), memory (the lowest peak); default {DEFAULT_PREFER} (docs/step-time.md)")
    add_knobs(p, searched=True)
    add_config_args(p, fit=True)
    p.set_defaults(func=run_fit)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--profiles", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_models)

    p = sub.add_parser("gpus", help="list the GPU catalog")
    p.add_argument("--profiles", metavar="DIR")
    p.add_argument("--headroom", type=float, default=None, help="headroom used for the usable column")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_gpus)


def run_estimate(args: argparse.Namespace) -> int:
    from memplan.catalog.gpus import as_gpu
    from memplan.plan.budget import Budget, check_headroom
    from memplan.plan.estimate import estimate

    setup, _, report = setup_with_configs(args)
    headroom = check_headroom(args.headroom)
    gpu = as_gpu(setup.gpu, profiles_dir=args.profiles)
    e = estimate(setup, gpu=gpu, profiles_dir=args.profiles)
    budget = Budget.for_gpu(gpu, headroom) if gpu is not None else None
    status = 1 if budget is not None and not budget.fits(e.total_bytes) else 0
    if args.json:
        d = e.to_dict()
        if budget is not None:
            d["budget"] = {"gpu": gpu.id, "headroom": headroom, "budget_bytes": budget.limit_bytes,
                           "usable_bytes": budget.usable_bytes, "fits": status == 0,
                           "spare_bytes": -budget.shortfall(e.total_bytes), "derivation": budget.derivation}
        print_json({**d, **({"config": report.to_dict()} if report else {})})
        return status
    from memplan.reports.terminal import estimate_view

    out = console()
    if report:
        print_config(out, report)
    out.print(estimate_view(e, budget))
    if args.phases:
        from memplan.units import format_gib

        for phase, comps in e.phases.items():
            out.print(f"  {phase:<15} {format_gib(sum(comps.values()), 2)}")
    return status


def run_fit(args: argparse.Namespace) -> int:
    from memplan.plan.search import fit

    auto = args.gpus == "auto"  # the fewest cards that fit (memplan.plan.multi_fit)
    if auto:
        args.gpus = None
    setup, pinned, report = setup_with_configs(args)
    result = fit(setup, args.gpu, headroom=args.headroom, pinned=pinned, max_batch=args.max_batch,
                 prefer=args.prefer, profiles_dir=args.profiles, gpus_auto=auto)
    if args.json:
        print_json({**result.to_dict(), **({"config": report.to_dict()} if report else {})})
    else:
        from memplan.reports.terminal import fit_view

        out = console()
        if report:
            print_config(out, report)
        out.print(fit_view(result))
    return 0 if result.recommended is not None else 1


def run_models(args: argparse.Namespace) -> int:
    from memplan.catalog.models import list_models

    models = list_models(profiles_dir=args.profiles)
    if args.json:
        print_json([{"id": m.id, "hf_id": m.hf_id, "aliases": list(m.aliases), "family": m.family,
                     "params": m.exact_params, "source": m.source} for m in models])
        return 0
    from rich.table import Table

    out = console()
    wide = out.width >= 120  # aliases as a column only where they fit; --json always lists them
    t = Table(box=None, pad_edge=False)
    for col in ("id", "family", "params", "hf id", *(("aliases",) if wide else ())):
        t.add_column(col, justify="right" if col == "params" else "left", overflow="fold")
    for m in sorted(models, key=lambda m: (m.family, m.exact_params)):
        t.add_row(m.id, m.family, f"{m.exact_params / 1e9:.2f}B", m.hf_id or "",
                  *((", ".join(m.aliases),) if wide else ()))
    out.print(t)
    out.print("A model is named by its id, its hf id (with or without the org) or an alias, in any case"
              + ("" if wide else " (aliases: memplan models --json)") + "; or give a config.json path or folder.",
              style="dim")
    return 0


def run_gpus(args: argparse.Namespace) -> int:
    from memplan.catalog.gpus import list_gpus
    from memplan.plan.budget import Budget, check_headroom

    headroom = check_headroom(args.headroom)
    gpus = list_gpus(profiles_dir=args.profiles)
    if args.json:
        print_json([{"id": g.id, "name": g.name, "aliases": list(g.aliases), "total_bytes": g.total_bytes,
                     "budget_bytes": Budget.for_gpu(g, headroom).limit_bytes,
                     "usable_bytes": Budget.for_gpu(g, headroom).usable_bytes,
                     "cuda_context_bytes": g.cuda_context_bytes, "compute_capability": g.compute_capability,
                     "bf16": g.bf16, "family": g.family, "source": g.source} for g in gpus])
        return 0
    from rich.table import Table

    from memplan.units import GiB

    out = console()
    wide = out.width >= 120  # id and every alias as columns only where they fit; --json always lists them
    t = Table(box=None, pad_edge=False)
    cols = ("id", "card", "total", "budget", "context", "cc", "bf16", "aliases") if wide else \
        ("card", "--gpu", "total", "budget", "context", "cc", "bf16")
    for col in cols:
        t.add_column(col, justify="right" if col in ("total", "budget", "context") else "left", overflow="fold")
    for g in sorted(gpus, key=lambda g: g.total_bytes):
        budget = Budget.for_gpu(g, headroom)
        numbers = (f"{g.total_bytes / GiB:.2f}", f"{budget.limit_bytes / GiB:.2f}", f"{g.cuda_context_bytes / GiB:.2f}",
                   g.compute_capability, "yes" if g.bf16 else "no")
        if wide:
            t.add_row(g.id, g.label, *numbers, ", ".join(g.aliases))
        else:  # the shortest name that picks the card
            t.add_row(g.label, min((g.id, *g.aliases), key=len), *numbers)
    out.print(t)
    out.print(f"total, budget and CUDA context in GiB; budget: total - {headroom:.0%} headroom, what a plan's peak "
              "(its CUDA context included) may reach. --gpu takes the card's id, its name or any alias"
              + ("" if wide else " (memplan gpus --json)") + "; case, spaces, hyphens and underscores are ignored.",
              style="dim")
    return 0
