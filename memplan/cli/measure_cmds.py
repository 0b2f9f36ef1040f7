"""The measurement subcommands: ``simulate``, ``profile`` and ``validate`` (the ``profile`` extra: torch,
transformers, peft, bitsandbytes; imported inside the run functions)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .common import add_knobs, console, print_json, setup_from_args, spinner

__all__ = ["add_parsers"]

_MODEL_HELP = "catalog name, config.json path or local model folder"


def add_parsers(sub) -> None:
    p = sub.add_parser("simulate", help="exact peak of one real training step on fake tensors (needs torch)",
                       description="Builds the real transformers + peft model from its config on fake tensors "
                                   "and runs training steps under a live-storage tracker: the exact tensor-level "
                                   "peak of any model size, on a CPU.")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--gpu", help="card for dtype defaults")
    add_knobs(p)
    p.add_argument("--steps", type=int, default=2, help="training steps (default 2: step 2 has optimizer state)")
    p.add_argument("--device-semantics", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default): bool dropout masks, flash attention, 512-byte blocks; cpu: a CPU run")
    p.add_argument("--compare", action="store_true", help="also show the analytic estimate and estimate ÷ simulated")
    p.set_defaults(func=run_simulate)

    p = sub.add_parser("profile", help="instrumented real training steps; writes run records (needs torch)",
                       description="Runs real training steps of a randomly initialised model on this machine and "
                                   "records per-phase peaks (tensor tracker; on CUDA also allocated / reserved / "
                                   "NVML and paged memory). An out-of-memory error is recorded as a result.")
    p.add_argument("model", help=_MODEL_HELP)
    add_knobs(p)
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="memplan-runs",
                   help="folder for run records (default memplan-runs/ here; records are added, never replaced)")
    p.add_argument("--sweep", action="store_true", help="double the batch size from --batch-size until out of memory")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch a sweep tries (default 256)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process at a fraction of the GPU (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--tensor-budget", default=None, metavar="SIZE",
                   help="treat a tracked tensor peak above SIZE (e.g. 2GiB) as out of memory: lets a CPU sweep stop")
    p.set_defaults(func=run_profile)

    p = sub.add_parser("validate", help="estimate ÷ measured for recorded runs and a simulated grid; writes a report",
                       description="Compares the analytic estimate with every recorded run and (with --matrix) with "
                                   "exact simulations over a grid of setups; writes validation.md, CSV and a plot.")
    p.add_argument("--runs", default=None, help="run records folder (default: the catalog's runs/, the project's "
                                                "recorded runs)")
    p.add_argument("--out", default=None, help="report folder (default: a new memplan-validation-<time>/ here)")
    p.add_argument("--force", action="store_true", help="replace the report files --out already holds")
    p.add_argument("--matrix", action="store_true", help="also simulate the grid of setups (minutes)")
    p.add_argument("--models", default=None, help="comma-separated catalog models for the matrix (default: 16)")
    p.add_argument("--jobs", type=int, default=1, help="parallel simulations for the matrix (default 1)")
    p.add_argument("--rescore", metavar="CSV", default=None,
                   help="re-estimate the setups of a matrix CSV (validation_matrix.csv) keeping its simulations")
    p.add_argument("--no-simulate-runs", action="store_true", help="do not simulate the recorded runs")
    p.add_argument("--published", metavar="CSV", default=None,
                   help="score memplan against published measurements instead (profiles/published/measurements.csv); "
                        "writes published.md, .csv and .png; needs no torch")
    p.add_argument("--mapping", metavar="CSV", default=None,
                   help="the row-by-row setup mapping of --published (default: mapping.csv beside it)")
    p.set_defaults(func=run_validate)


def run_simulate(args: argparse.Namespace) -> int:
    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.errors import InvalidSetupError
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import resolve_setup

    # everything checkable without torch first: a bad value gets its own message in any install
    if args.steps < 1:
        raise InvalidSetupError(f"invalid --steps {args.steps}; must be >= 1")
    setup, _ = setup_from_args(args)
    spec = load_model(setup.model, profiles_dir=args.profiles)
    gpu = load_gpu(args.gpu, profiles_dir=args.profiles) if args.gpu else None
    resolved = resolve_setup(setup, spec, gpu)
    from memplan.measure.simulate import simulate

    with spinner(f"simulating {spec.name}: building the model on fake tensors and running {args.steps} step(s)"):
        result = simulate(resolved, steps=args.steps, device_semantics=args.device_semantics, gpu=gpu,
                          profiles_dir=args.profiles)
    analytic = estimate_for(spec, resolved, gpu, include_runtime=False) if args.compare else None
    if args.json:
        d = result.to_dict()
        if analytic is not None:
            d["analytic"] = analytic.to_dict()
            d["analytic_ratio"] = analytic.total_bytes / result.total_bytes
        print_json(d)
        return 0
    from memplan.reports.terminal import simulation_view

    console().print(simulation_view(result, analytic))
    return 0


def run_profile(args: argparse.Namespace) -> int:
    import signal
    import threading

    from memplan.catalog.gpus import load_gpu
    from memplan.catalog.models import load_model
    from memplan.fileio import prepare_output_dir
    from memplan.plan.setup import resolve_setup

    setup, _ = setup_from_args(args)
    # everything checkable without torch first, and the output folder before any run
    resolved = resolve_setup(setup, load_model(setup.model, profiles_dir=args.profiles))
    budget = None
    if args.tensor_budget:
        budget = load_gpu(args.tensor_budget).total_bytes  # "2GiB", "1500MB" ... parsed like a card budget
    out = str(prepare_output_dir(args.out))
    from memplan.measure.profile import RunControl, RunInterrupted, check_profile_args, profile_run
    from memplan.measure.runs import save_run
    from memplan.measure.sweep import profile_sweep

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_profile_args(device, args.steps, args.memory_fraction, budget)
    from memplan.measure.dist_profile import launch_ranks, launched

    if resolved.gpus * resolved.nodes > 1 and launched() is None:  # launch one process per rank (torchrun)
        if args.sweep:
            from memplan.errors import InvalidSetupError

            raise InvalidSetupError("--sweep profiles one GPU; give --gpus 1, or one --batch-size per launch")
        records = launch_ranks(resolved, list(args.argv)[args.argv.index("profile") + 1:], out)
        if args.json:
            print_json([r.to_dict() for r in records])
            return 0
        from memplan.reports.terminal import runs_view

        console().print(runs_view(records, out))
        return 0 if all(r.outcome == "ok" for r in records) else 1

    kw = dict(device=device, steps=args.steps, gpu_memory_fraction=args.memory_fraction,
              tensor_budget_bytes=budget, profiles_dir=args.profiles)
    control = RunControl(say=lambda text: sys.stderr.write(f"memplan profile: {text}\n"))
    result: dict = {}
    finished = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C can mark a live thread stopped

    def work() -> None:
        try:
            if args.sweep:
                result["records"] = profile_sweep(setup, max_batch_size=args.max_batch, out_dir=out,
                                                  progress=not args.json, control=control, **kw)
            else:
                result["records"] = [profile_run(setup, out_dir=out, control=control, **kw)]  # saved as it ends
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result["error"] = exc
        finally:
            finished.set()

    # The run goes on a worker thread so that Ctrl-C (always delivered to the main thread) takes effect at
    # once even while one long kernel runs: the run is asked to stop at its next phase; if it does not within
    # 2 s, what it measured is saved here and the process ends.
    worker = threading.Thread(target=work, name="memplan-profile", daemon=True)
    worker.start()
    try:
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not lose the record being saved
        control.stop.set()
        finished.wait(2.0 if control.record is not None else 65.0)  # an isolated child saves its own record
        if not finished.is_set():
            record = control.salvage()
            path = save_run(record, out).as_posix() if record is not None else "not saved"
            sys.stderr.write(f"memplan profile: interrupted; finished records are in {out} (the interrupted run: "
                             f"{path})\n")
            sys.stderr.flush()
            os._exit(130)  # the worker is inside a kernel: nothing to wait for
        if "error" not in result:
            result["error"] = KeyboardInterrupt()
    error = result.get("error")
    if isinstance(error, RunInterrupted) or isinstance(error, KeyboardInterrupt):
        path = getattr(getattr(error, "record", None), "path", "") or "not saved"
        sys.stderr.write(f"memplan profile: interrupted; finished records are in {out} (the interrupted run: "
                         f"{path})\n")
        return 130
    if error is not None:
        raise error
    records = result["records"]
    if launched() is not None:  # one rank of a launch: its parent prints every rank's record
        return 0 if all(r.outcome == "ok" for r in records) else 1
    if args.json:
        print_json([r.to_dict() for r in records])
        return 0
    from memplan.reports.terminal import runs_view

    console().print(runs_view(records, out))
    return 0 if all(r.outcome == "ok" for r in records) or args.sweep else 1


def run_validate(args: argparse.Namespace) -> int:
    from memplan.catalog.paths import profiles_dir
    from memplan.errors import InvalidSetupError
    from memplan.fileio import fresh_dir_name, prepare_output_dir

    if args.published:
        return _run_published(args)
    if args.mapping:
        raise InvalidSetupError("--mapping goes with --published")
    from memplan.measure.validate import MATRIX_MODELS, matrix_setups, rescore_matrix, run_matrix, validate_runs
    from memplan.reports.validation import VALIDATION_FILES, write_report

    out = console()
    if args.jobs < 1:
        raise InvalidSetupError(f"invalid --jobs {args.jobs}; must be >= 1")
    if args.runs is not None and not Path(args.runs).is_dir():
        raise InvalidSetupError(f"--runs {args.runs}: no such folder of run records")
    # the folder is checked before the work: a long matrix must not end unable to write its report
    report_dir = prepare_output_dir(args.out or fresh_dir_name("memplan-validation"), produces=VALIDATION_FILES,
                                    force=args.force)
    runs_dir = args.runs or str(profiles_dir() / "runs")
    # a bad --rescore file is reported before the run records are simulated (seconds each), not after
    matrix = rescore_matrix(args.rescore) if args.rescore else None
    with warnings.catch_warnings(record=True) as caught:  # skipped records: one line each, not a Python warning
        warnings.simplefilter("always")
        runs = validate_runs(runs_dir, simulate_runs=not args.no_simulate_runs)
    for w in caught:
        sys.stderr.write(f"memplan validate: warning: {w.message}\n")
    if args.matrix and not args.rescore:
        models = MATRIX_MODELS
        if args.models:
            models = tuple((m.strip(), {}) for m in args.models.split(",") if m.strip())
        setups = matrix_setups(models)
        done = [0]

        def progress(row):
            done[0] += 1
            status = f"error: {row.error}" if row.error else f"{row.ratio:.3f}"
            out.print(f"[{done[0]}/{len(setups)}] {row.setup['model']}: {status} ({row.sim_seconds:.1f} s)",
                      highlight=False)

        matrix = run_matrix(setups, jobs=args.jobs, on_row=progress)
    command = "memplan validate" + (" --matrix" if args.matrix else "")
    command += f" --jobs {args.jobs}" if args.jobs > 1 else ""
    if args.rescore:
        # write_report wraps the command in backticks: "Generated by `...` on the simulations of `...`."
        command = f"memplan validate --rescore {args.rescore}` on the simulations of `memplan validate --matrix"
    paths = write_report(report_dir, matrix=matrix, runs=runs, command=command)
    for p in paths:
        out.print(f"wrote {p}")
    return 0


def _run_published(args: argparse.Namespace) -> int:
    """``validate --published``: the scoreboard against other people's measurements (pure: no torch)."""
    from memplan.errors import InvalidSetupError
    from memplan.fileio import fresh_dir_name, prepare_output_dir
    from memplan.measure.published import load_published, score_published
    from memplan.reports.published import PUBLISHED_FILES, summarize, write_published_report

    if args.matrix or args.rescore:
        raise InvalidSetupError("--published cannot be combined with --matrix or --rescore")
    rows = load_published(args.published, args.mapping)  # read before the folder is made: a bad file makes nothing
    report_dir = prepare_output_dir(args.out or fresh_dir_name("memplan-published"), produces=PUBLISHED_FILES,
                                    force=args.force)
    results = score_published(rows)
    command = f"memplan validate --published {args.published}" + (f" --mapping {args.mapping}" if args.mapping else "")
    paths = write_published_report(report_dir, results, command=command)
    out = console()
    s = summarize(results)
    ab = s["ab"]
    if ab["n"]:
        out.print(f"{s['compared']} rows compared, {s['claims']} claims ({s['claims_right']} right), "
                  f"{s['skipped']} skipped; A/B rows: {ab['n']}, median |error| {100 * ab['median_abs_error']:.1f}%",
                  highlight=False)
    for p in paths:
        out.print(f"wrote {p}")
    return 0
