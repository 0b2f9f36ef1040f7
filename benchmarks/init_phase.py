"""Time the LoRA initialisations (PiSSA, OLoRA, LoftQ) on CPU and fit the scaling rule memplan.plan.init_phase uses.

    python benchmarks/init_phase.py           # about 1-2 minutes on 2 CPU cores
    python benchmarks/init_phase.py --quick   # the two smaller sizes only

1. The per-layer kernels of each init on fp32 matrices (m x n): ``torch.linalg.svd(full_matrices=False)`` (PiSSA,
   LoftQ), ``torch.linalg.qr`` (OLoRA), ``torch.svd_lowrank(q=r, niter=4)`` (pissa_niter_4), and bitsandbytes' NF4
   quantize + dequantize (LoftQ, once per loftq_iter). Fits c in t = c * m*n*min(m,n) (svd, qr),
   c * m*n*r*(2q+2) (svd_lowrank) and c * m*n (quantize), through the origin, and prints measured beside fitted.
2. peft's real initialisation of a small llama (hidden 512, 2 layers; memplan.measure.init_measure) for each init:
   measured seconds beside ``init_phase_for(...).seconds_estimate`` (the rule with the constants in
   memplan/plan/init_phase.py), and the measured device / host peaks beside the analytic ones.
3. The rule's prediction for llama-2-7b-hf and llama-2-70b-hf (all-linear, r=16): EXTRAPOLATED, CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from memplan.units import format_bytes  # noqa: E402

RANK = 16


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _quant(w):
    import bitsandbytes as bnb

    q = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    return bnb.functional.dequantize_4bit(q.data, q.quant_state)


def kernels(sizes) -> dict[str, float]:
    rows: dict[str, list[tuple[float, float, str]]] = {"svd": [], "qr": [], "svd_lowrank": [], "nf4": []}
    for m, n in sizes:
        w = torch.randn(m, n)
        k = min(m, n)
        rep = 2 if m * n <= 1024 * 1024 else 1
        rows["svd"].append((m * n * k, _time(lambda: torch.linalg.svd(w, full_matrices=False), rep), f"{m}x{n}"))
        rows["qr"].append((m * n * k, _time(lambda: torch.linalg.qr(w), rep), f"{m}x{n}"))
        rows["svd_lowrank"].append((m * n * RANK * 10, _time(lambda: torch.svd_lowrank(w, q=RANK, niter=4), rep),
                                    f"{m}x{n}"))
        rows["nf4"].append((m * n, _time(lambda: _quant(w), rep), f"{m}x{n}"))
    fitted = {}
    print("1. per-layer kernels, fp32 on CPU (torch %s, %d threads)" % (torch.__version__, torch.get_num_threads()))
    for name, pts in rows.items():
        c = sum(x * t for x, t, _ in pts) / sum(x * x for x, _, _ in pts)  # least squares through the origin
        fitted[name] = c
        unit = {"svd": "m*n*k", "qr": "m*n*k", "svd_lowrank": "m*n*r*(2q+2)", "nf4": "m*n"}[name]
        print(f"  {name:12s} c = {c:.3g} s per {unit}")
        for x, t, label in pts:
            print(f"    {label:>11s}: measured {t:8.3f} s, rule {c * x:8.3f} s")
    return fitted


def small_model() -> None:
    from memplan.catalog.models import spec_from_config
    from memplan.measure.init_measure import measure_init
    from memplan.plan.init_phase import init_phase_for
    from memplan.plan.setup import TrainSetup, resolve_setup

    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1376,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8}
    spec = spec_from_config(cfg, name="small-llama-512")
    print("\n2. peft's initialisation of a llama (hidden 512, intermediate 1376, 2 layers), all-linear r=16, on CPU")
    print(f"  {'init':14s} {'path':15s} {'measured s':>10s} {'rule s':>8s} {'device peak':>12s} {'analytic':>10s} "
          f"{'host peak':>10s} {'analytic':>10s}")
    cases = [("pissa", "lora", 1, None), ("pissa_niter_4", "lora", 1, None), ("olora", "lora", 1, None),
             ("olora", "qlora", 1, "kbit_model"), ("loftq", "qlora", 1, "full_precision"),
             ("loftq", "qlora", 2, "full_precision"), ("loftq", "qlora", 1, "kbit_model")]
    for init, method, it, path in cases:
        setup = resolve_setup(TrainSetup(spec.name, method=method, rank=RANK, targets="all-linear", dtype="bf16",
                                         init=init), spec)
        ph = init_phase_for(spec, setup, path=path, loftq_iter=it, semantics="cpu")
        got = measure_init(spec, setup, path=path, loftq_iter=it)
        label = init + (f" x{it}" if init == "loftq" else "")
        print(f"  {label:14s} {ph.path_id:15s} {got.seconds:10.2f} {ph.seconds_estimate:8.2f} "
              f"{format_bytes(got.device_peak_bytes):>12s} {format_bytes(ph.tensor_peak_bytes):>10s} "
              f"{format_bytes(got.host_peak_bytes):>10s} {format_bytes(ph.host_peak_bytes):>10s}")


def extrapolate() -> None:
    from memplan.catalog.models import load_model
    from memplan.plan.init_phase import init_paths
    from memplan.plan.setup import TrainSetup, resolve_setup

    print("\n3. EXTRAPOLATED with the rule (CPU seconds; GPU peaks with CUDA semantics), all-linear r=16, QLoRA")
    for name in ("llama-2-7b-hf", "llama-2-70b-hf"):
        spec = load_model(name)
        for init in ("pissa", "olora", "loftq"):
            setup = resolve_setup(TrainSetup(name, method="qlora", rank=RANK, targets="all-linear", init=init), spec)
            for ph in init_paths(spec, setup):
                print(f"  {name:15s} {init:6s} {ph.path_id:15s} ~{ph.seconds_estimate / 60:7.1f} min CPU, GPU peak "
                      f"{format_bytes(ph.gpu_peak_bytes)}, host peak {format_bytes(ph.host_peak_bytes)}, "
                      f"largest layer {ph.largest_layer}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the two smaller kernel sizes only")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    sizes = [(512, 512), (1376, 512), (1024, 1024), (2752, 1024)]
    if not args.quick:
        sizes += [(2048, 2048)]
    kernels(sizes)
    small_model()
    extrapolate()


if __name__ == "__main__":
    main()
