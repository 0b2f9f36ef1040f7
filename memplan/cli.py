"""The ``memplan`` command: thin wiring over the library. One ``_add_<cmd>`` / ``_run_<cmd>`` pair per
subcommand. Bad input exits 2 with one line on stderr; ``fit`` exits 1 when nothing fits."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from .errors import MemplanError

__all__ = ["main", "build_parser"]

# Setup knobs shared by estimate and fit: (flag, TrainSetup field, argparse kwargs).
_KNOBS: list[tuple[str, str, dict]] = [
    ("--method", "method", dict(choices=["lora", "qlora", "full"], help="lora (default), qlora (= 4-bit), full")),
    ("--bits", "bits", dict(type=int, choices=[4, 8, 16, 32],
                            help="storage of the frozen base weights (default: 16 for lora, 4 for qlora)")),
    ("--quant", "quant_type", dict(choices=["nf4", "fp4"], help="4-bit data type (default nf4)")),
    ("--double-quant", "double_quant", dict(action=argparse.BooleanOptionalAction,
                                            help="quantize the 4-bit quantization constants (default on)")),
    ("--dtype", "dtype", dict(choices=["fp16", "bf16", "fp32"],
                              help="compute dtype (default bf16 where the card supports it, else fp16)")),
    ("--rank", "rank", dict(type=int, help="LoRA rank r (default 8)")),
    ("--alpha", "alpha", dict(type=int, help="LoRA alpha (no effect on memory; default 2r)")),
    ("--targets", "targets", dict(help="LoRA target modules: q_proj,v_proj | all-linear | a regex "
                                       "(default: peft's default for the architecture)")),
    ("--lora-dropout", "lora_dropout", dict(type=float, help="LoRA dropout (default 0.05)")),
    ("--adapter-dtype", "adapter_dtype", dict(choices=["fp32", "bf16", "fp16"],
                                              help="dtype of the LoRA weights (default fp32, as peft)")),
    ("--optimizer", "optimizer", dict(help="HF TrainingArguments.optim name: adamw_torch (default), "
                                           "adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, sgd, "
                                           "sgd_momentum, rmsprop, adafactor, ...")),
    ("--batch-size", "batch_size", dict(type=int, help="micro-batch size per step (default 1)")),
    ("--seq-len", "seq_len", dict(type=int, help="tokens per sequence (default 512)")),
    ("--grad-ckpt", "grad_ckpt", dict(action=argparse.BooleanOptionalAction,
                                      help="gradient checkpointing (default off)")),
    ("--attn", "attn", dict(choices=["auto", "eager", "sdpa", "flash_attention_2"],
                            help="attention implementation (default auto: sdpa where supported)")),
    ("--upcast", "upcast_non_quantized", dict(action=argparse.BooleanOptionalAction,
                                              help="prepare_model_for_kbit_training's fp32 upcast of the "
                                                   "non-quantized weights (default on at 4/8 bits)")),
]


# What simulate / profile / validate import lazily (the `profile` and `report` extras).
_HEAVY_PACKAGES = frozenset({"torch", "transformers", "peft", "bitsandbytes", "accelerate", "pynvml", "matplotlib",
                             "pandas"})


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        # prog is "memplan fit" or "memplan report capacity": name the whole command
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training setup")
    for flag, dest, kw in _KNOBS:
        g.add_argument(flag, dest=dest, default=None, **kw)
    p.add_argument("--profiles", metavar="DIR", help="catalog folder (default: MEMPLAN_PROFILES or the bundled one)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _setup_from_args(args: argparse.Namespace):
    """A ``TrainSetup`` from the flags, and the set of fields the user gave (pinned)."""
    from .setups import TrainSetup

    given = {dest: getattr(args, dest) for _, dest, _ in _KNOBS if getattr(args, dest) is not None}
    return TrainSetup(model=args.model, gpu=getattr(args, "gpu", None), **given), frozenset(given)


def _add_config_args(p: argparse.ArgumentParser, *, fit: bool = False) -> None:
    """estimate / fit: ``--model`` and ``--config FILE`` (training configs users already have)."""
    p.add_argument("--model", dest="model_opt", metavar="NAME", help="the model, when not given as MODEL")
    p.add_argument("--config", dest="configs", action="append", metavar="FILE",
                   help="a training config to plan from (repeatable; later files and then flags win): "
                        "TrainingArguments / TRL SFTConfig JSON, peft adapter_config.json, BitsAndBytesConfig "
                        "JSON, axolotl or TRL YAML")
    if fit:
        p.add_argument("--free", metavar="FIELDS",
                       help="comma-separated knobs a --config sets that the search may change "
                            "(e.g. batch_size,grad_ckpt,optimizer)")


def _setup_with_configs(args: argparse.Namespace):
    """estimate / fit: (setup, pinned, report) from MODEL / --model, the --config files and the flags;
    ``report`` is None without --config. Flags win over files; ``--free`` unpins what files set."""
    from .configs import load_training_config, merge_configs

    flags = {dest: getattr(args, dest) for _, dest, _ in _KNOBS}
    configs = [load_training_config(path) for path in args.configs or ()]
    setup, pinned, report = merge_configs(configs, {**flags, "gpu": getattr(args, "gpu", None)},
                                          model=args.model or args.model_opt)
    if getattr(args, "free", None):
        pinned -= _free_fields(args.free, flags)
    if report.model_source:  # say where a model name that does not resolve came from
        from .errors import UnknownModelError
        from .models import load_model

        try:
            load_model(setup.model, profiles_dir=args.profiles)
        except UnknownModelError as exc:
            raise UnknownModelError(f"{exc} (named in {report.model_source}; give MODEL or --model to plan "
                                    f"another)") from None
    return setup, pinned, (report if args.configs else None)


def _free_fields(text: str, flags: dict) -> frozenset[str]:
    """``--free``: knob names (``batch_size`` or ``batch-size``); bits and method are freed together."""
    from .errors import InvalidSetupError, suggestion_suffix

    by_name = {dest: dest for _, dest, _ in _KNOBS} | {flag[2:]: dest for flag, dest, _ in _KNOBS}
    free = set()
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in by_name:
            raise InvalidSetupError(f"unknown field {name!r} in --free{suggestion_suffix(name, by_name)}; allowed: "
                                    f"{', '.join(dest for _, dest, _ in _KNOBS)}")
        dest = by_name[name]
        if flags.get(dest) is not None:
            raise InvalidSetupError(f"--free {name} contradicts the flag that pins it ({dest}={flags[dest]})")
        free.add(dest)
    if free & {"bits", "method"}:
        free |= {"bits", "method"}  # the search picks the method from the bits (4 -> qlora)
    return frozenset(free)


def _print_config(console, report) -> None:
    """One line per config file (what it set), then its warnings (yellow) and notes (dim)."""
    from rich.text import Text

    styles = {"used": "", "warning": "yellow", "note": "dim"}
    for kind, line in report.lines():
        console.print(Text(line, style=styles[kind]))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memplan",
        description="Plan GPU memory for LoRA / QLoRA / full fine-tuning before anything is loaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              memplan fit opt-13b --gpu 3090
              memplan fit llama-2-7b --gpu 3060 --seq-len 2048 --bits 4
              memplan estimate opt-13b --rank 16 --targets q_proj,v_proj --batch-size 4 --json
              memplan models
              memplan gpus
              memplan fit --config axolotl.yml --gpu 4090 --free batch_size
              memplan report capacity --format md,html
            """),
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("estimate", help="peak memory breakdown of one exact setup")
    p.add_argument("model", nargs="?", help="catalog name (memplan models), config.json path or local model "
                                            "folder (or --model, or a --config that names it)")
    p.add_argument("--gpu", help="card for the CUDA context and dtype defaults (memplan gpus)")
    _add_knobs(p)
    _add_config_args(p)
    p.add_argument("--phases", action="store_true", help="also show the total of every phase")
    p.set_defaults(func=_run_estimate)

    p = sub.add_parser("fit", help="the best bits / rank / batch / checkpointing / optimizer that fit a card",
                       description="Search bits x rank x targets x checkpointing x optimizer x batch size; "
                                   "any setup flag pins that knob.")
    p.add_argument("model", nargs="?", help="catalog name (memplan models), config.json path or local model "
                                            "folder (or --model, or a --config that names it)")
    p.add_argument("--gpu", required=True, help="catalog card or alias (3090, a100-80g ...), or a size (24GiB)")
    p.add_argument("--headroom", type=float, default=None,
                   help="fraction of the card's memory kept free (default 0.05)")
    p.add_argument("--max-batch", type=int, default=64, help="largest micro-batch to consider (default 64)")
    _add_knobs(p)
    _add_config_args(p, fit=True)
    p.set_defaults(func=_run_fit)

    p = sub.add_parser("simulate", help="exact peak of one real training step on fake tensors (needs torch)",
                       description="Builds the real transformers + peft model from its config on fake tensors "
                                   "and runs training steps under a live-storage tracker: the exact tensor-level "
                                   "peak of any model size, on a CPU.")
    p.add_argument("model", help="catalog name, config.json path or local model folder")
    p.add_argument("--gpu", help="card for dtype defaults")
    _add_knobs(p)
    p.add_argument("--steps", type=int, default=2, help="training steps (default 2: step 2 has optimizer state)")
    p.add_argument("--device-semantics", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default): bool dropout masks, flash attention, 512-byte blocks; cpu: a CPU run")
    p.add_argument("--compare", action="store_true", help="also show the analytic estimate and estimate ÷ simulated")
    p.set_defaults(func=_run_simulate)

    p = sub.add_parser("profile", help="instrumented real training steps; writes run records (needs torch)",
                       description="Runs real training steps of a randomly initialised model on this machine and "
                                   "records per-phase peaks (tensor tracker; on CUDA also allocated / reserved / "
                                   "NVML and paged memory). An out-of-memory error is recorded as a result.")
    p.add_argument("model", help="catalog name, config.json path or local model folder")
    _add_knobs(p)
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="folder for run records (default: the catalog's runs/)")
    p.add_argument("--sweep", action="store_true", help="double the batch size from --batch-size until out of memory")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch a sweep tries (default 256)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process at a fraction of the GPU (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--tensor-budget", default=None, metavar="SIZE",
                   help="treat a tracked tensor peak above SIZE (e.g. 2GiB) as out of memory: lets a CPU sweep stop")
    p.set_defaults(func=_run_profile)

    p = sub.add_parser("validate", help="estimate ÷ measured for recorded runs and a simulated grid; writes a report",
                       description="Compares the analytic estimate with every recorded run and (with --matrix) with "
                                   "exact simulations over a grid of setups; writes validation.md, CSV and a plot.")
    p.add_argument("--runs", default=None, help="run records folder (default: the catalog's runs/)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    p.add_argument("--matrix", action="store_true", help="also simulate the grid of setups (minutes)")
    p.add_argument("--models", default=None, help="comma-separated catalog models for the matrix (default: 16)")
    p.add_argument("--jobs", type=int, default=1, help="parallel simulations for the matrix (default 1)")
    p.add_argument("--rescore", metavar="CSV", default=None,
                   help="re-estimate the setups of a matrix CSV (validation_matrix.csv) keeping its simulations")
    p.add_argument("--no-simulate-runs", action="store_true", help="do not simulate the recorded runs")
    p.set_defaults(func=_run_validate)

    from .report import add_report_parser  # stdlib-only at import; pandas/matplotlib load inside the run

    add_report_parser(sub)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--profiles", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_models)

    p = sub.add_parser("gpus", help="list the GPU catalog")
    p.add_argument("--profiles", metavar="DIR")
    p.add_argument("--headroom", type=float, default=None, help="headroom used for the usable column")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_gpus)
    return parser


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _run_estimate(args) -> int:
    from .estimate import estimate

    setup, _, report = _setup_with_configs(args)
    e = estimate(setup, profiles_dir=args.profiles)
    if args.json:
        _print_json({**e.to_dict(), **({"config": report.to_dict()} if report else {})})
        return 0
    from .render import estimate_view

    console = _console()
    if report:
        _print_config(console, report)
    console.print(estimate_view(e))
    if args.phases:
        from .units import format_gib

        for phase, comps in e.phases.items():
            console.print(f"  {phase:<15} {format_gib(sum(comps.values()), 2)}")
    return 0


def _run_fit(args) -> int:
    from .fit import fit

    setup, pinned, report = _setup_with_configs(args)
    result = fit(setup, args.gpu, headroom=args.headroom, pinned=pinned, max_batch=args.max_batch,
                 profiles_dir=args.profiles)
    if args.json:
        _print_json({**result.to_dict(), **({"config": report.to_dict()} if report else {})})
    else:
        from .render import fit_view

        console = _console()
        if report:
            _print_config(console, report)
        console.print(fit_view(result))
    return 0 if result.recommended is not None else 1


def _run_simulate(args) -> int:
    from .estimate import estimate_for
    from .gpus import load_gpu
    from .models import load_model
    from .setups import resolve_setup
    from .trace import simulate

    setup, _ = _setup_from_args(args)
    spec = load_model(setup.model, profiles_dir=args.profiles)
    gpu = load_gpu(args.gpu, profiles_dir=args.profiles) if args.gpu else None
    resolved = resolve_setup(setup, spec, gpu)
    result = simulate(resolved, steps=args.steps, device_semantics=args.device_semantics, gpu=gpu,
                      profiles_dir=args.profiles)
    analytic = estimate_for(spec, resolved, gpu, include_runtime=False) if args.compare else None
    if args.json:
        d = result.to_dict()
        if analytic is not None:
            d["analytic"] = analytic.to_dict()
            d["analytic_ratio"] = analytic.total_bytes / result.total_bytes
        _print_json(d)
        return 0
    from .render import simulation_view

    _console().print(simulation_view(result, analytic))
    return 0


def _run_profile(args) -> int:
    from .catalog import profiles_dir
    from .profiler import RunInterrupted, profile_run, profile_sweep

    setup, _ = _setup_from_args(args)
    out = args.out or str(profiles_dir(args.profiles) / "runs")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = None
    if args.tensor_budget:
        from .gpus import load_gpu

        budget = load_gpu(args.tensor_budget).total_bytes  # "2GiB", "1500MB" ... parsed like a card budget
    kw = dict(device=device, steps=args.steps, gpu_memory_fraction=args.memory_fraction,
              tensor_budget_bytes=budget, profiles_dir=args.profiles)
    try:
        if args.sweep:
            records = profile_sweep(setup, max_batch_size=args.max_batch, out_dir=out, progress=not args.json, **kw)
        else:
            records = [profile_run(setup, out_dir=out, **kw)]  # saved atomically as soon as it ends
    except RunInterrupted as exc:
        sys.stderr.write(f"memplan profile: interrupted; finished records are in {out}"
                         f" (the interrupted run: {getattr(exc.record, 'path', '') or 'not saved'})\n")
        return 130
    if args.json:
        _print_json([r.to_dict() for r in records])
        return 0
    from .render import runs_view

    _console().print(runs_view(records, out))
    return 0 if all(r.outcome == "ok" for r in records) or args.sweep else 1


def _run_validate(args) -> int:
    from .catalog import profiles_dir
    from .validate import MATRIX_MODELS, matrix_setups, rescore_matrix, run_matrix, validate_runs, write_report

    console = _console()
    runs_dir = args.runs or str(profiles_dir() / "runs")
    runs = validate_runs(runs_dir, simulate_runs=not args.no_simulate_runs)
    matrix = None
    if args.rescore:
        matrix = rescore_matrix(args.rescore)
    elif args.matrix:
        models = MATRIX_MODELS
        if args.models:
            models = tuple((m.strip(), {}) for m in args.models.split(",") if m.strip())
        setups = matrix_setups(models)
        done = [0]

        def progress(row):
            done[0] += 1
            status = f"error: {row.error}" if row.error else f"{row.ratio:.3f}"
            console.print(f"[{done[0]}/{len(setups)}] {row.setup['model']}: {status} ({row.sim_seconds:.1f} s)",
                          highlight=False)

        matrix = run_matrix(setups, jobs=args.jobs, on_row=progress)
    command = "memplan validate" + (" --matrix" if args.matrix else "") + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    if args.rescore:
        # write_report wraps the command in backticks: "Generated by `...` on the simulations of `...`."
        command = f"memplan validate --rescore {args.rescore}` on the simulations of `memplan validate --matrix"
    paths = write_report(args.out, matrix=matrix, runs=runs, command=command)
    for p in paths:
        console.print(f"wrote {p}")
    return 0


def _run_models(args) -> int:
    from .models import list_models

    models = list_models(profiles_dir=args.profiles)
    if args.json:
        _print_json([{"id": m.id, "hf_id": m.hf_id, "aliases": list(m.aliases), "family": m.family,
                      "params": m.exact_params, "source": m.source} for m in models])
        return 0
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("id", "family", "params", "hf id", "aliases"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for m in sorted(models, key=lambda m: (m.family, m.exact_params)):
        t.add_row(m.id, m.family, f"{m.exact_params / 1e9:.2f}B", m.hf_id or "", ", ".join(m.aliases))
    _console().print(t)
    return 0


def _run_gpus(args) -> int:
    from .gpus import DEFAULT_HEADROOM, list_gpus

    headroom = DEFAULT_HEADROOM if args.headroom is None else args.headroom
    gpus = list_gpus(profiles_dir=args.profiles)
    if args.json:
        _print_json([{"id": g.id, "name": g.name, "aliases": list(g.aliases), "total_bytes": g.total_bytes,
                      "usable_bytes": g.usable_bytes(headroom), "cuda_context_bytes": g.cuda_context_bytes,
                      "compute_capability": g.compute_capability, "bf16": g.bf16, "family": g.family,
                      "source": g.source} for g in gpus])
        return 0
    from rich.table import Table

    from .units import GiB

    t = Table(box=None, pad_edge=False)
    for col in ("id", "name", "total GiB", "usable GiB", "cc", "bf16", "aliases"):
        t.add_column(col, justify="right" if "GiB" in col else "left")
    for g in sorted(gpus, key=lambda g: g.total_bytes):
        t.add_row(g.id, g.name, f"{g.total_bytes / GiB:.1f}", f"{g.usable_bytes(headroom) / GiB:.1f}",
                  g.compute_capability, "yes" if g.bf16 else "no", ", ".join(g.aliases))
    _console().print(t)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MemplanError as exc:
        sys.stderr.write(f"memplan {args.command}: error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _HEAVY_PACKAGES:
            sys.stderr.write(f"memplan {args.command}: error: this command needs {exc.name.split('.')[0]}, which is "
                             f"not installed; install the measurement stack with: pip install 'memplan[profile]'\n")
            return 2
        raise
    except KeyboardInterrupt:
        sys.stderr.write("memplan: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
