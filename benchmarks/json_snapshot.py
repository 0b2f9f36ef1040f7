"""Snapshot ``estimate`` and ``fit`` JSON over a broad grid, to prove a refactor changed no answer.

    python benchmarks/json_snapshot.py OUT_DIR            # writes OUT_DIR/0000.json ... and OUT_DIR/index.json
    diff -r BEFORE_DIR AFTER_DIR                           # empty: every answer is byte-identical

Runs ``memplan.cli.main`` in-process for every catalog model x five setups and five cards (~420 commands, about
15 s), capturing stdout, stderr and the exit status of each (an exception is recorded, not raised). It only uses
the command line, so it runs against any version of memplan: check out the old commit in a worktree, run it
there with that checkout on ``PYTHONPATH``, then here, and diff the two folders.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

SETUPS = (
    [],
    ["--bits", "4", "--grad-ckpt", "--targets", "all-linear", "--rank", "16"],
    ["--bits", "8", "--batch-size", "4", "--seq-len", "1024", "--gpu", "3090"],
    ["--method", "full", "--optimizer", "adafactor"],
    ["--attn", "eager", "--seq-len", "256", "--optimizer", "paged_adamw_8bit"],
)
FIT_CARDS = (["--gpu", "3090"], ["--gpu", "3060"], ["--gpu", "a100-80gb"], ["--gpu", "h100"],
             ["--gpu", "4090", "--seq-len", "2048"])
EXTRA = (["estimate", "opt-13b", "--rank", "16", "--targets", "q_proj,v_proj", "--dtype", "fp16"],
         ["estimate", "opt-13b", "--rank", "16", "--targets", "q_proj,v_proj", "--gpu", "3090"],
         ["fit", "llama-3.1-405b", "--gpu", "4090"],
         ["fit", "opt-13b", "--gpu", "3090", "--max-batch", "4"])


def commands(models: list[str]) -> list[list[str]]:
    out = []
    for m in models:
        out += [["estimate", m, *s] for s in SETUPS]
        out += [["fit", m, *c] for c in FIT_CARDS]
    return [[*c, "--json"] for c in out + list(EXTRA)]


def main() -> int:
    from memplan.cli import main as memplan_main

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    profiles = Path(__file__).resolve().parents[1] / "profiles" / "models"
    models = [p.stem for p in sorted(profiles.glob("*.json"))]
    index = {}
    for i, argv in enumerate(commands(models)):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = memplan_main(argv)
            except SystemExit as exc:
                rc = exc.code
            except Exception as exc:  # noqa: BLE001 - a crash is part of the snapshot
                rc = f"exception {type(exc).__name__}: {exc}"
        name = f"{i:04d}.json"
        (out / name).write_text(stdout.getvalue() + f"\n#rc={rc}\n#stderr={stderr.getvalue()}")
        index[name] = " ".join(argv)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(index)} commands -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
