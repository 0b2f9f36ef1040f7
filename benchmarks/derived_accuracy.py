"""How well the traced terms of derived architectures extrapolate, at the real width: ``python
benchmarks/derived_accuracy.py [model ...]``.

For each catalog model without a hand-written family (default: one per architecture), the model cut to its first
8 layers (keeping the mix of layer kinds), and a few regimes, the terms are traced from scratch (fits at 256 and
512 tokens) and the estimate of the dynamic memory (activations, logits, gradients, transients at the peak phase)
is compared with ``memplan simulate`` on the same 8 layers at sequences and batches that were not fitted,
up to 8,192 tokens. A regime whose trace misses its own check point by more than ``CHECK_LIMIT`` is refused, as
memplan refuses it, and counted apart. Prints one row per (model, regime, point) with estimate / simulate, and
a summary line.
Needs torch, transformers and peft; a temporary cache, never the user's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

DEFAULT_MODELS = ("qwen3-8b", "qwen3-30b-a3b", "qwen3.5-27b", "gemma-3-27b-pt", "olmo-3-7b", "smollm3-3b",
                  "llama-4-scout-17b-16e", "gpt-oss-20b")
REGIMES = (  # (label, TrainSetup keywords)
    ("16-bit LoRA, default targets", dict(method="lora", bits=16, grad_ckpt=False)),
    ("4-bit QLoRA all-linear, checkpointing", dict(method="qlora", bits=4, targets="all-linear", grad_ckpt=True)),
)
POINTS = ((2, 512), (4, 256), (1, 2048), (1, 8192))
LAYERS = 8


def main(argv: list[str]) -> int:
    os.environ["MEMPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="memplan-accuracy-")
    from memplan.catalog.models import load_model
    from memplan.measure import derive_trace as trace
    from memplan.measure.simulate import simulate_for
    from memplan.plan.derived import CHECK_LIMIT
    from memplan.plan.setup import TrainSetup, resolve_setup

    ratios = []
    print("model,regime,batch,seq,estimate_mib,simulate_mib,estimate/simulate")
    for model in argv or DEFAULT_MODELS:
        spec = trace.spec_with_layers(load_model(model), LAYERS)
        for label, kw in REGIMES:
            # MoE models with fused experts: peft's target_parameters take no dropout
            kw = {**kw, "lora_dropout": 0.0} if spec.num_experts > 1 else kw
            traced: dict[bool, dict] = {}  # past a sliding window the model builds a mask: another regime
            for batch, seq in POINTS:
                masked = bool(spec.sliding_window) and seq >= spec.sliding_window
                try:
                    at = resolve_setup(TrainSetup(model=model, batch_size=batch, seq_len=seq, **kw), spec)
                    if masked not in traced:
                        t0 = time.perf_counter()
                        found = trace.trace_regime(spec, at, progress=False)
                        if found["check"]["max_rel_error"] > CHECK_LIMIT:  # memplan refuses such a regime
                            raise ValueError(f"the traced terms miss their check point by "
                                             f"{found['check']['max_rel_error']:.0%}")
                        traced[masked] = found["terms"]
                        print(f"# {model} {label}{' (masked)' if masked else ''}: traced in "
                              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                    measured = simulate_for(spec, at).phase_components
                except Exception as exc:  # noqa: BLE001 - a regime the model cannot run: say so
                    print(f"{model},{label},{batch},{seq},,,refused: {' '.join(str(exc).split())[:120]}")
                    continue
                predicted = trace.predict(traced[masked], LAYERS, batch, seq)
                m = max(sum(measured.get(p, {}).get(c, 0) for c in trace.FITTED_COMPONENTS)
                        for p in trace.FITTED_PHASES)
                e = max(sum(predicted[p].values()) for p in trace.FITTED_PHASES)
                ratios.append(e / m)
                print(f"{model},{label},{batch},{seq},{e / 2**20:.0f},{m / 2**20:.0f},{e / m:.4f}", flush=True)
    worst = max(ratios, key=lambda r: abs(r - 1)) if ratios else float("nan")
    within = sum(abs(r - 1) <= 0.02 for r in ratios)
    print(f"# {len(ratios)} points: worst {worst:.4f}, {within} within 2%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
