"""Wall time of ``memplan fit opt-13b --gpu 3090``, the way a user runs it: a fresh process each time.

    python benchmarks/bench_fit.py [--runs 10] [-- extra memplan args]

Prints the median and worst wall time of the whole command (interpreter start-up, imports, catalog
loading, the search and rendering) and, separately, the in-process time of the search alone. The target
for the command is < 0.5 s on a 2-core machine without torch installed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("args", nargs="*", default=["fit", "opt-13b", "--gpu", "3090"])
    opts = ap.parse_args()

    # The console script installed next to this interpreter (the environment being measured).
    script = Path(sys.executable).with_name("memplan")
    cmd = [str(script), *opts.args] if script.exists() else [sys.executable, "-m", "memplan", *opts.args]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache and .pyc files
    walls = []
    for _ in range(opts.runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        walls.append(time.perf_counter() - t0)

    from memplan.fit import fit
    from memplan.setups import TrainSetup

    t0 = time.perf_counter()
    result = fit(TrainSetup("opt-13b"), "3090")
    search = time.perf_counter() - t0

    print(f"command: {' '.join(cmd)}")
    print(f"wall over {opts.runs} runs: median {statistics.median(walls):.3f} s, max {max(walls):.3f} s")
    print(f"in-process fit (first call, {result.evaluated} estimates): {search:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
