"""Every decoder-only text model_type of the installed transformers: does memplan plan it, or why not?

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, a tiny config from its class defaults
(``memplan.measure.tiny_configs``) goes through ``spec_from_config`` (a hand-written family or the derived spec)
and one estimate of the default 16-bit LoRA setup (which traces its activation terms). The result is one row per
model type: ``plans`` with the estimate / simulate ratio at batch 2, seq 512, or ``refused`` with the one-line
reason. Writes profiles/derived/model_types.csv (or the path given). Takes about 5 s per model type.

    python benchmarks/derive_model_types.py [out.csv] [--only qwen3,gemma3_text]
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import warnings
from pathlib import Path


def main(argv: list[str]) -> int:
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = set(argv[i + 1].split(","))
        argv = argv[:i] + argv[i + 2:]
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "profiles" / "derived" / "model_types.csv"
    os.environ.setdefault("MEMPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="memplan-derive-"))
    warnings.simplefilter("ignore")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from memplan.errors import MemplanError
    from memplan.fileio import write_atomic

    rows = []
    for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if only and mt not in only:
            continue
        status, detail = plan_one(mt, MemplanError)
        rows.append({"model_type": mt, "status": status, "detail": detail})
        print(f"{mt:32s} {status:8s} {detail}", flush=True)

    def write(f):
        w = csv.DictWriter(f, fieldnames=["model_type", "status", "detail"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    write_atomic(out, write)
    plans = sum(r["status"] == "plans" for r in rows)
    print(f"{plans} plan, {len(rows) - plans} refused; wrote {out}", file=sys.stderr)
    return 0


def plan_one(mt: str, MemplanError) -> tuple[str, str]:
    from memplan.catalog.models import spec_from_config
    from memplan.measure.simulate import simulate_for
    from memplan.measure.tiny_configs import tiny_config
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    try:
        cfg = tiny_config(mt)
    except Exception as exc:  # noqa: BLE001
        return "refused", _line(f"no default config: {type(exc).__name__}: {exc}")
    try:
        spec = spec_from_config(cfg, name=mt)
        setup = resolve_setup(TrainSetup(model=mt, method="lora", bits=16, batch_size=2, seq_len=512), spec)
        est = estimate_for(spec, setup, include_runtime=False)
    except MemplanError as exc:
        return "refused", _line(str(exc).split(": ", 1)[-1])
    except Exception as exc:  # noqa: BLE001
        return "refused", _line(f"{type(exc).__name__}: {exc}")
    try:
        sim = simulate_for(spec, setup)
        return "plans", f"estimate/simulate {est.total_bytes / sim.total_bytes:.4f}"
    except Exception as exc:  # noqa: BLE001
        return "plans", _line(f"(simulate failed: {type(exc).__name__})")


def _line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
