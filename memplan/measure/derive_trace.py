"""Activation terms of a derived architecture, traced: ``memplan simulate`` on 1 and 2 layers, fitted exactly.

For each analytic phase (forward_end, backward_start, backward, backward_end) and each dynamic component
(activations, logits_loss, gradients, transients), the bytes alive at the phase's peak are, for a fixed regime,

    L * (a*T + b*T*s + c + d*s) + (e*T + f*T*s + g + k*s)        T = batch x seq tokens, s = seq, L layers

(per-token tensors, materialised attention scores, per-layer constants such as a dequantized weight or LoRA
gradients, and batch-free (1, s, ...) tensors such as rotary tables). Four (batch, seq) points at L = 1 and
L = 2 determine the eight unknowns of each L exactly; the layer terms are the L = 2 fit minus the L = 1 fit.
The sequences (``fit_sequences``: 256 and 512) are multiples of 64, so that the CUDA allocator's 512-byte rounding
of per-token tensors stays linear, and wide apart: fitted at 128 and 192, the per-chunk state of Qwen3.5's
chunked linear attention passed for a quadratic term and the estimate came out 23% over simulate at 2,048 tokens.

Hybrid stacks (a ``layer_types`` list with more than one kind: linear and full attention in Qwen3.5, sliding
and global attention in Gemma-3) are traced per kind, on models whose layers are all of that kind, and summed
by the count of each kind; the constant (one layer's recomputation and backward temporaries, the embeddings and
the loss) is the largest kind's, since the peak falls at that layer. A kind without any of the LoRA targets
(Qwen3.5's linear-attention layers have no q_proj / v_proj) is traced next to one layer of a kind that has them,
apart for the layers before the first adapted one (where nothing requires grad, so nothing is saved) and after.

A last run, on the model's own first layers (through the first of each kind, and one more) at batch 3 and a
longer sequence, neither of them fitted, checks the prediction of the peak (the largest phase total).

The LoRA rank stays part of the regime. Each phase's figure is the largest total over its moments, a maximum of
functions linear in the rank, and which moment is largest changes with the rank: interpolating between ranks 8
and 64 came out 20% over simulate at rank 32 on a tiny Qwen3 QLoRA. Tracing each rank keeps the terms exact.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from dataclasses import replace
from fractions import Fraction

from memplan.units import round_up

from memplan.plan.derived_terms import predict

from .simulate import simulate_for

__all__ = ["trace_regime", "spec_with_layers", "layer_kinds", "FITTED_PHASES", "FITTED_COMPONENTS", "predict"]

FITTED_PHASES = ("forward_end", "backward_start", "backward", "backward_end")
FITTED_COMPONENTS = ("activations", "logits_loss", "gradients", "transients")
_STEP = 64


def fit_sequences(window: int | None, masked: bool) -> tuple[int, int]:
    """The two fitted sequence lengths (the check runs at their sum): 256 and 512, wide apart and near the
    sequences people train at, so that a term that is not quite of the fitted form (a chunked kernel's per-chunk
    state) is not mistaken for a quadratic one; multiples of 64. Past a sliding window (``masked``) they start at
    the window; below one, the check stays under it (gpt-oss: 128)."""
    if masked:
        s0 = round_up(window, _STEP)
        return s0, 2 * s0
    if window and window <= 768:
        s0 = max(16, window // 4 // 16 * 16)
        return s0, 2 * s0
    return 4 * _STEP, 8 * _STEP


def spec_with_layers(spec, n: int, kinds: list[str] | None = None):
    """``spec`` with ``n`` decoder layers: config lists with one entry per layer (layer_types ...) truncated, or
    ``layer_types`` set to ``kinds`` (one per layer) when given."""
    cfg = copy.deepcopy(spec.config)
    old = int(cfg.get("num_hidden_layers", spec.num_layers))
    cfg["num_hidden_layers"] = n
    for k, v in list(cfg.items()):
        if isinstance(v, list) and len(v) == old and old != n:
            cfg[k] = v[:n]
    if kinds is not None:
        cfg["layer_types"] = list(kinds)
    return replace(spec, num_layers=n, config=cfg)


def _layer_types(spec) -> list[str] | None:
    """Each decoder layer's kind as transformers' config resolves ``layer_types`` (also from
    ``sliding_window_pattern`` / ``full_attention_interval``); None for a uniform stack."""
    from .derive_build import hf_config

    cfg = hf_config(spec.config, spec.name)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = getattr(text, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != spec.num_layers or len(set(types)) < 2:
        return None
    return list(types)


def layer_kinds(spec) -> list[tuple[str | None, int]]:
    """(kind, count) of each kind of decoder layer in the order they first appear; one ``(None, L)`` for a
    uniform stack."""
    types = _layer_types(spec)
    return [(None, spec.num_layers)] if types is None else list(Counter(types).items())


def _kinds_with_targets(spec, setup) -> set[str | None]:
    """The layer kinds in which peft finds one of ``setup.targets`` (linear-attention layers have no q_proj)."""
    types = _layer_types(spec)
    if types is None:
        return {None}
    names = spec.adapted_names(setup.targets)
    return {t for i, t in enumerate(types) if any(n.startswith(f"{spec.layer_prefix}.{i}.") for n in names)}


def _basis(b: int, s: int) -> tuple[int, int, int, int]:
    t = b * s
    return (t, t * s, 1, s)


def _solve(rows: list[tuple[int, ...]], values: list[int]) -> list[Fraction]:
    """Exact square solve (Gauss-Jordan on fractions)."""
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


def _get(run: dict, p: str, c: str) -> int:
    return run.get(p, {}).get(c, 0)


def _trace_kind(spec, setup, kind, seqs, anchor=None, before=False) -> dict:
    """{phase: {component: {"layer", "base"}}} of a stack of ``kind`` layers (None: the model's own layers).
    With an ``anchor`` kind, the stacks hold one ``anchor`` layer too (a stack of ``kind`` alone holds none of the
    LoRA targets, which peft refuses): after the ``kind`` layers when ``before``, else in front of them. Where a
    layer sits matters: before the first adapted layer nothing requires grad (unless the inputs are made to), so
    autograd saves nothing there. The "base" of an anchored trace includes the anchor layer and is not used."""
    s0, s1 = seqs
    points = [(1, s0), (2, s0), (1, s1), (2, s1)]
    rows = [_basis(b, s) for b, s in points]
    fits: dict[int, dict] = {}
    for n in (1, 2):
        if kind is None:
            sub = spec_with_layers(spec, n)
        else:
            kinds = [kind] * n if anchor is None else ([kind] * n + [anchor] if before else [anchor] + [kind] * n)
            sub = spec_with_layers(spec, len(kinds), kinds)
        runs = [_run(sub, setup, b, s) for b, s in points]
        fits[n] = {p: {c: _solve(rows, [_get(x, p, c) for x in runs]) for c in FITTED_COMPONENTS}
                   for p in FITTED_PHASES}
    return {p: {c: {"layer": [float(b - a) for a, b in zip(fits[1][p][c], fits[2][p][c])],
                    "base": [float(2 * a - b) for a, b in zip(fits[1][p][c], fits[2][p][c])]}
                for c in FITTED_COMPONENTS} for p in FITTED_PHASES}


def _parts(types: list[str], targeted: set, traced: dict) -> list[tuple[dict, int, bool]]:
    """(terms, count, own_base) of each traced kind for a stack of ``types`` (the model's, or the check's): a
    kind without targets counts apart before and after the first layer that has some."""
    first = next((i for i, t in enumerate(types) if t in targeted), len(types))
    out = []
    for kind in dict.fromkeys(types):
        if kind in targeted or not targeted:
            out.append((traced[(kind, None)], types.count(kind), True))
            continue
        pre = types[:first].count(kind)
        for count, where in ((pre, "before"), (types.count(kind) - pre, "after")):
            if count:
                out.append((traced[(kind, where)], count, False))
    return out


def _combine(per_kind: list[tuple[dict, int, bool]], layers: int) -> dict:
    """One set of terms for a hybrid stack: the layer terms weighted by each kind's count, the constant terms of
    the kind whose constant is largest at each phase (at the fitted reference point), among the kinds traced on
    their own (``own_base``)."""
    if len(per_kind) == 1 and per_kind[0][1] == layers:
        return per_kind[0][0]
    out = {}
    for p in FITTED_PHASES:
        def base_at(t):
            return sum(sum(a * v for a, v in zip(t[p][c]["base"], _basis(1, 512))) for c in FITTED_COMPONENTS)

        biggest = max((t for t, _, own in per_kind if own), key=base_at)
        out[p] = {}
        for c in FITTED_COMPONENTS:
            out[p][c] = {"layer": [sum(t[p][c]["layer"][i] * n for t, n, _ in per_kind) / layers for i in range(4)],
                         "base": list(biggest[p][c]["base"])}
    return out


def trace_regime(spec, setup, *, progress=True) -> dict:
    """The fitted coefficients of a resolved ``setup`` on a derived ``spec`` (see the module docstring), with the
    check: ``{"terms": {phase: {component: {...}}}, "kinds": ..., "check": {...}}``."""
    t0 = time.perf_counter()
    window = spec.sliding_window
    masked = bool(window) and setup.seq_len >= window
    seqs = fit_sequences(window, masked)
    types = _layer_types(spec)
    kinds = layer_kinds(spec)
    targeted = _kinds_with_targets(spec, setup)
    anchor = next((k for k, _ in kinds if k in targeted), None)
    if types is None:
        check_types = None
    else:  # the model's own first layers, through the first layer of each kind, and one more
        last_new = max(types.index(k) for k, _ in kinds)
        check_types = types[:min(len(types), last_new + 2)]
    # what to trace: each kind with targets on its own; each other kind behind an anchor, and in front of one
    # where the model has some before its first adapted layer
    wanted = []
    for kind, _ in kinds:
        if types is None or kind in targeted or anchor is None:
            wanted.append((kind, None))
        else:
            first = next(i for i, t in enumerate(types) if t in targeted)
            ahead = kind in types[:first] or (check_types is not None and kind in check_types[:first])
            wanted += [(kind, "after")] + ([(kind, "before")] if ahead else [])
    if progress:
        each = "" if len(wanted) == 1 else f" of {len(kinds)} layer kinds"
        print(f"memplan: tracing {spec.name} once for this regime ({setup.method}, {setup.bits}-bit, {setup.targets}, "
              f"rank {setup.rank}, {'checkpointing' if setup.grad_ckpt else 'no checkpointing'}): "
              f"{len(wanted) * 8 + 1} simulated steps on 1-3 layers{each} ...", file=sys.stderr, flush=True)
    traced = {(kind, where): _trace_kind(spec, setup, kind, seqs, anchor=anchor if where else None,
                                         before=where == "before") for kind, where in wanted}
    if types is None:
        terms = traced[(None, None)]
        check_spec, check_terms, check_layers = spec_with_layers(spec, 2), terms, 2
    else:
        terms = _combine(_parts(types, targeted, traced), spec.num_layers)
        check_spec = spec_with_layers(spec, len(check_types), check_types)
        check_layers = len(check_types)
        check_terms = _combine(_parts(check_types, targeted, traced), check_layers)
    # the check: the model's first layers, at a batch and sequence that were not fitted
    cb, cs = 3, sum(seqs)
    measured = _run(check_spec, setup, cb, cs)
    predicted = predict(check_terms, check_layers, cb, cs)
    peak_m = max(sum(_get(measured, p, c) for c in FITTED_COMPONENTS) for p in FITTED_PHASES)
    peak_p = max(sum(predicted[p].values()) for p in FITTED_PHASES)
    error = abs(peak_p - peak_m) / peak_m if peak_m else 0.0
    seconds = round(time.perf_counter() - t0, 2)
    if progress:
        print(f"memplan: traced in {seconds} s; the fit predicts the peak of an unfitted point within {error:.2%}",
              file=sys.stderr, flush=True)
    return {"terms": terms, "kinds": [[k, n] for k, n in kinds],
            "check": {"batch": cb, "seq": cs, "layers": check_layers, "max_rel_error": error},
            "seconds": seconds}
