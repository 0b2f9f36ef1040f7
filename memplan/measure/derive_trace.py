"""Activation terms of a derived architecture, traced: ``memplan simulate`` on 1 and 2 layers, fitted exactly.

For each analytic phase (forward_end, backward_start, backward, backward_end) and each dynamic component
(activations, logits_loss, gradients, transients), the bytes alive at the phase's peak are, for a fixed regime,

    L * (a*T + b*T*s + c + d*s) + (e*T + f*T*s + g + k*s)        T = batch x seq tokens, s = seq, L layers

(per-token tensors, materialised attention scores, per-layer constants such as a dequantized weight or LoRA
gradients, and batch-free (1, s, ...) tensors such as rotary tables). Four (batch, seq) points at L = 1 and
L = 2 determine the eight unknowns of each L exactly; the layer terms are the L = 2 fit minus the L = 1 fit.
A ninth run (L = 2, batch 3, a longer sequence) checks the prediction at a point that was not fitted. The sequences
are multiples of 64 so that the CUDA allocator's 512-byte rounding of per-token tensors stays linear.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from fractions import Fraction

from memplan.units import round_up

from memplan.plan.derived_terms import predict

from .simulate import simulate_for

__all__ = ["trace_regime", "spec_with_layers", "FITTED_PHASES", "FITTED_COMPONENTS", "predict"]

FITTED_PHASES = ("forward_end", "backward_start", "backward", "backward_end")
FITTED_COMPONENTS = ("activations", "logits_loss", "gradients", "transients")
_STEP = 64


def spec_with_layers(spec, n: int):
    """``spec`` with ``n`` decoder layers: config lists with one entry per layer (layer_types ...) truncated."""
    cfg = dict(spec.config)
    old = int(cfg.get("num_hidden_layers", spec.num_layers))
    cfg["num_hidden_layers"] = n
    for k, v in list(cfg.items()):
        if isinstance(v, list) and len(v) == old and old != n:
            cfg[k] = v[:n]
    return replace(spec, num_layers=n, config=cfg)


def _basis(b: int, s: int) -> tuple[int, int, int, int]:
    t = b * s
    return (t, t * s, 1, s)


def _solve(rows: list[tuple[int, int, int, int]], values: list[int]) -> list[Fraction]:
    """Exact 4x4 solve (Gauss-Jordan on fractions)."""
    m = [[Fraction(x) for x in r] + [Fraction(v)] for r, v in zip(rows, values)]
    n = len(m)
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _run(spec, setup, batch: int, seq: int) -> dict:
    st = replace(setup, batch_size=batch, seq_len=seq, grad_accum=1)
    return simulate_for(spec, st, steps=2, device_semantics="cuda").phase_components


def trace_regime(spec, setup, *, progress=True) -> dict:
    """The fitted coefficients of a resolved ``setup`` on a derived ``spec`` (see the module docstring), with the
    check: ``{"terms": {phase: {component: {"layer": [...], "base": [...]}}}, "check": {...}}``."""
    t0 = time.perf_counter()
    window = spec.sliding_window
    masked = bool(window) and setup.seq_len >= window
    s0 = round_up(window, _STEP) if masked else _STEP
    points = [(1, s0), (2, s0), (1, s0 + _STEP), (2, s0 + _STEP)]
    if progress:
        print(f"memplan: tracing {spec.name} once for this regime ({setup.method}, {setup.bits}-bit, rank "
              f"{setup.rank}, {setup.targets}, {'checkpointing' if setup.grad_ckpt else 'no checkpointing'}): "
              f"9 simulated steps on 1-2 layers ...", file=sys.stderr, flush=True)
    fits: dict[int, dict] = {}
    for n in (1, 2):
        sub = spec_with_layers(spec, n)
        runs = [_run(sub, setup, b, s) for b, s in points]
        rows = [_basis(b, s) for b, s in points]
        fits[n] = {p: {c: _solve(rows, [r.get(p, {}).get(c, 0) for r in runs]) for c in FITTED_COMPONENTS}
                   for p in FITTED_PHASES}
    terms = {p: {c: {"layer": [float(b - a) for a, b in zip(fits[1][p][c], fits[2][p][c])],
                     "base": [float(2 * a - b) for a, b in zip(fits[1][p][c], fits[2][p][c])]}
                 for c in FITTED_COMPONENTS} for p in FITTED_PHASES}
    # the check: a point that was not fitted
    cb, cs = 3, s0 + 2 * _STEP
    measured = _run(spec_with_layers(spec, 2), setup, cb, cs)
    predicted = predict(terms, 2, cb, cs)
    worst = 0.0
    for p in FITTED_PHASES:
        m = sum(measured.get(p, {}).get(c, 0) for c in FITTED_COMPONENTS)
        q = sum(predicted[p].values())
        if m:
            worst = max(worst, abs(q - m) / m)
    seconds = round(time.perf_counter() - t0, 2)
    if progress:
        print(f"memplan: traced in {seconds} s; the fit predicts an unfitted point within {worst:.2%}",
              file=sys.stderr, flush=True)
    return {"terms": terms, "check": {"batch": cb, "seq": cs, "layers": 2, "max_rel_error": worst},
            "seconds": seconds}
