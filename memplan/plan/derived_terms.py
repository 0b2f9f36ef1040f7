"""The fitted activation terms of a derived architecture, evaluated: pure arithmetic shared by the estimator
(``memplan.plan.derived``) and the tracer that fits them (``memplan.measure.derive_trace``)."""

from __future__ import annotations

__all__ = ["predict"]


def predict(terms: dict, layers: int, batch: int, seq: int) -> dict[str, dict[str, int]]:
    """{phase: {component: bytes}} of fitted terms at (layers, batch, seq): L * layer(T, s) + base(T, s)."""
    t = batch * seq
    x = (t, t * seq, 1, seq)
    out = {}
    for phase, comps in terms.items():
        out[phase] = {c: max(0, round(layers * sum(a * v for a, v in zip(f["layer"], x))
                                      + sum(a * v for a, v in zip(f["base"], x)))) for c, f in comps.items()}
    return out
