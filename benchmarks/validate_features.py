"""Simulate the validation grid's setups that ``reports/validation_matrix.csv`` does not hold yet (new rows, such as
memplan.measure.feature_matrix's, or rows whose simulation failed), re-estimate the ones it holds, and rewrite the
validation report.

    python benchmarks/validate_features.py [--jobs 2] [--csv reports/validation_matrix.csv] [--out reports]

The same as ``memplan validate --matrix`` for a grid that grew, without re-simulating the rows already there (the
simulations do not depend on the analytic model; ``memplan validate --rescore`` re-estimates them afterwards).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from memplan.catalog.models import load_model
    from memplan.measure.validate import MATRIX_MODELS, matrix_setups, rescore_matrix, run_matrix, validate_runs
    from memplan.plan.setup import resolve_setup
    from memplan.reports.validation import write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="reports/validation_matrix.csv")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--runs", default="profiles/runs")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    def key(setup: dict) -> tuple:
        return tuple(sorted((k, v) for k, v in setup.items() if k not in ("versions", "gpu")))

    rows = [r for r in rescore_matrix(args.csv) if not r.error]  # a failed simulation is tried again
    have = {key(r.setup) for r in rows}
    missing = [s for s in matrix_setups(MATRIX_MODELS)
               if key(resolve_setup(s, load_model(s.model)).to_dict()) not in have]
    print(f"{len(rows)} rows re-estimated; simulating {len(missing)} new setups with {args.jobs} jobs",
          file=sys.stderr)
    done = []

    def progress(row) -> None:
        done.append(row)
        ratio = f"{row.ratio:.4f}" if row.simulated_bytes else row.error
        print(f"[{len(done)}/{len(missing)}] {row.setup['model']} {ratio} ({row.sim_seconds:.0f} s)", file=sys.stderr,
              flush=True)

    new = run_matrix(missing, jobs=args.jobs, on_row=progress)
    runs = validate_runs(args.runs)
    paths = write_report(args.out, matrix=rows + new, runs=runs,
                         command="python benchmarks/validate_features.py` on the simulations of `memplan validate "
                                 "--matrix")
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
