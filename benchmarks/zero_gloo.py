"""DeepSpeed ZeRO with real processes (gloo on CPU) against memplan's analytic ZeRO model, rank by rank.

    python benchmarks/zero_gloo.py [--world 2,4] [--logs DIR] [--out reports/multi_gpu_gloo.csv]

Runs ``benchmarks/zero_gloo_worker.py`` under ``torchrun --nproc_per_node N`` for every ZeRO stage x LoRA / full
fine-tuning x fp32 / bf16 x offload (none, optimizer; ZeRO-3 also parameters + optimizer), with the HF Trainer's
``auto`` bucket values, on a tiny Llama (hidden 256, 2 layers; the worker's docstring), and compares what each rank
holds before its second step (parameters, gradient buffers, master weights, optimizer state, buckets; device and,
with offload, host) with the analytic ZeRO model (memplan.plan.zero_memory). ``--logs DIR`` reads earlier runs'
``RESULT`` lines instead (one ``*.log`` per run). Needs ``pip install -e ".[deepspeed]"``; DeepSpeedCPUAdam
compiles once (minutes) for the offload runs.

What it does not check, and why: the step's peak. A CPU run's activations come from CPU kernels (memplan plans CUDA
ones: ``memplan simulate`` swaps them in), gloo copies a reduce-scatter's input (NCCL does not), and offload
moves nothing on a CPU. The peaks are written beside the persistent state for reference.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
        "vocab_size": 1000, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "head_dim": 64}
COLUMNS = ("world", "rank", "stage", "method", "dtype", "offload", "measured_persistent_bytes",
           "analytic_persistent_bytes", "ratio", "measured_peak_bytes", "measured_peak_phase")


def configs(worlds):
    for world in worlds:
        for stage in (1, 2, 3):
            for method in ("lora", "full"):
                for dtype in ("fp32", "bf16"):
                    for offload in ("none", "optimizer") + (("both",) if stage == 3 else ()):
                        yield world, stage, method, dtype, offload


def run(world, stage, method, dtype, offload) -> str:
    cmd = ["torchrun", "--nproc_per_node", str(world), "--master_port", str(29500 + 7 * stage + world),
           str(ROOT / "benchmarks" / "zero_gloo_worker.py"), "--stage", str(stage), "--method", method,
           "--dtype", dtype, "--offload", offload, "--world", str(world), "--hf-auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900).stdout


def analytic_persistent(spec, world, stage, method, dtype, offload) -> int:
    """What the analytic model says a rank holds before a step: the static components, the host bytes, and the
    buffers DeepSpeed keeps (ZeRO-3's bucket and gradient partition, ZeRO-1/2's offload staging buffer)."""
    from memplan.plan.estimate import estimate_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    knobs = dict(model=spec.name, method=method, bits=16 if dtype == "bf16" else 32, dtype=dtype, autocast="off",
                 batch_size=1, seq_len=64, gpus=world, strategy=f"zero{stage}", grad_ckpt=False,
                 offload={"both": "params"}.get(offload, offload))
    if method == "lora":
        knobs.update(rank=8, targets="q_proj,v_proj", lora_dropout=0.0)
    e = estimate_for(spec, resolve_setup(TrainSetup(**knobs), spec), include_runtime=False)
    static = sum(e.components[c] for c in ("weights", "quantized_weights", "quant_constants", "lora_params",
                                           "optimizer_state"))
    kept_grads = -(-e.params.trainable // world) * (2 if dtype == "bf16" else 4) if stage == 3 and \
        offload == "none" else 0
    return static + sum(e.host_bytes.values()) + e.phases["optimizer_step"]["comm_buffers"] + kept_grads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="2,4")
    ap.add_argument("--logs", default=None, help="read RESULT lines of earlier runs (*.log) instead of running")
    ap.add_argument("--out", default="reports/multi_gpu_gloo.csv")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from memplan.catalog.models import load_model
    from memplan.fileio import write_atomic

    folder = Path(tempfile.mkdtemp(prefix="memplan-zero-"))
    (folder / "config.json").write_text(json.dumps(TINY))
    spec = load_model(str(folder))
    if args.logs:
        texts = [p.read_text() for p in sorted(Path(args.logs).glob("*.log"))]
    else:
        todo = list(configs(int(w) for w in args.world.split(",")))
        texts = []
        for i, c in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] world {c[0]} zero{c[1]} {c[2]} {c[3]} offload {c[4]}", file=sys.stderr,
                  flush=True)
            texts.append(run(*c))
    rows = []
    for text in texts:
        for line in text.splitlines():
            if not line.startswith("RESULT ") or '"hf_auto": true' not in line:
                continue
            d = json.loads(line[7:])
            if d["offload"] == "params":  # (offload_param alone: memplan's params offload is both)
                continue
            est = analytic_persistent(spec, d["world"], d["stage"], d["method"], d["dtype"], d["offload"])
            rows.append((d["world"], d["rank"], d["stage"], d["method"], d["dtype"], d["offload"],
                         d["pre_step_bytes"], est, f"{est / d['pre_step_bytes']:.5f}", d["peak_bytes"],
                         d["peak_phase"]))
    rows.sort()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    text = buf.getvalue()
    write_atomic(ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out), lambda f: f.write(text))
    errors = sorted(abs(float(r[8]) - 1) for r in rows)
    if errors:
        print(f"{len(rows)} ranks: persistent state median |error| {errors[len(errors) // 2]:.4%}, worst "
              f"{errors[-1]:.4%}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
