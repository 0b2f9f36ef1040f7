"""Terminal views of estimates, fit results, simulations and run records, with rich. The core returns
dataclasses; the views turn bytes into text (GiB, labelled)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from memplan.reports.feature_view import estimate_extras, fit_extras
from memplan.catalog.gpus import card_label
from memplan.plan.breakdown import COMPONENT_LABELS, COMPONENTS
from memplan.plan.setup import describe_setup
from memplan.plan.speed import step_time
from memplan.plan.versions import describe_versions
from memplan.units import GiB, format_gib

if TYPE_CHECKING:
    from memplan.plan.budget import Budget
    from memplan.plan.estimate import Estimate
    from memplan.plan.search import FitResult

__all__ = ["breakdown_table", "estimate_view", "fit_view", "verdict", "simulation_view", "runs_view"]

_BAR_WIDTH = 30


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def breakdown_table(e: Estimate, *, title: str | None = None, compare: Estimate | None = None,
                    compare_label: str = "estimate") -> Table:
    """Components at the peak (of an ``Estimate``, or anything with ``components`` and ``total_bytes``), largest
    first, with a bar scaled to the largest one. ``compare`` adds a column of another breakdown and the ratio."""
    comps, total = e.components, e.total_bytes
    table = Table(title=title, title_justify="left", show_footer=True, box=None, pad_edge=False)
    table.add_column("component", footer="total", overflow="fold")
    table.add_column("GiB", justify="right", footer=_gib(total))
    if compare is not None:
        table.add_column(f"{compare_label} GiB", justify="right", footer=_gib(compare.total_bytes))
        table.add_column("ratio", justify="right", footer=f"{compare.total_bytes / total:.3f}" if total else "")
    table.add_column("share", justify="right", footer="100%")
    table.add_column("", footer="")
    largest = max(comps.values()) or 1
    dominant = max(comps, key=comps.__getitem__)
    for name in sorted(COMPONENTS, key=lambda c: -comps.get(c, 0)):
        n = comps.get(name, 0)
        other = compare.components.get(name, 0) if compare is not None else 0
        if n == 0 and other == 0:
            continue
        bar = "█" * max(1, round(_BAR_WIDTH * n / largest)) if n else ""
        style = "bold magenta" if name == dominant else "cyan"
        cells = [COMPONENT_LABELS[name], _gib(n)]
        if compare is not None:
            cells += [_gib(other), f"{other / n:.3f}" if n else "-"]
        cells += [f"{100 * n / total:.0f}%" if total else "-", Text(bar, style=style)]
        table.add_row(*cells)
    return table


def _headline(e: Estimate) -> Text:
    t = Text()
    t.append(f"peak {format_gib(e.total_bytes, 2)}", style="bold")
    t.append(f" at {e.peak_phase.replace('_', ' ')}; ")
    t.append(f"largest: {COMPONENT_LABELS[e.dominant]} ({100 * e.components[e.dominant] / e.total_bytes:.0f}%)")
    p = e.params
    t.append(f"\nparams {p.total:,} total, {p.trainable:,} trainable ({100 * p.trainable / p.total:.2f}%)")
    if p.quantized:
        t.append(f", {p.quantized:,} quantized")
    return t


def verdict(e: Estimate, budget: Budget) -> Text:
    """``fits the 22.80 GiB budget (RTX 3090: 24.00 GiB total - 5% headroom), 0.64 GiB to spare``, or how much it
    is over."""
    over = budget.shortfall(e.total_bytes)
    if over <= 0:
        return Text.assemble(("fits", "bold green"), f" the {budget.describe()}, {format_gib(-over, 2)} to spare")
    return Text.assemble(("does not fit", "bold red"), f" the {budget.describe()}: {format_gib(over, 2)} over")


def estimate_view(e: Estimate, budget: Budget | None = None) -> Group:
    """One setup's breakdown; with ``budget`` (a card was named), whether it fits and by how much."""
    parts = [Text(f"{e.setup.model}: {describe_setup(e.setup)}", style="bold"), _versions_line(e.setup), _headline(e)]
    if budget is not None:
        parts.append(verdict(e, budget))
    parts += estimate_extras(e, budget)
    parts += [Text(""), breakdown_table(e)]
    parts += [Text(f"note: {n}", style="yellow") for n in e.notes]
    return Group(*parts)


def _versions_line(setup) -> Text:
    """``versions: transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2, torch 2.13.0 (installed)``: the library
    stack the plan assumed (``setup.versions``, memplan.plan.versions)."""
    return Text(f"versions: {describe_versions(setup.versions)}", style="dim")


def _plan_bits(s) -> str:
    if s.bits == 4:
        return f"4 {s.quant_type}"
    return "8 int8" if s.bits == 8 else str(s.bits)


def fit_view(r: FitResult) -> Group:
    shown = (r.recommended or r.leanest).setup
    count = shown.gpus * shown.nodes
    cards = f"{count} x {r.gpu.label}" if count > 1 or r.gpus_tried is not None else r.gpu.label
    per_card = " per card" if count > 1 else ""
    parts: list = [Text(f"{r.model} on {cards}: {r.budget.describe(source=False)}{per_card}", style="bold"),
                   _versions_line(shown),
                   Text(f"Every peak includes the {format_gib(r.budget.context_bytes, 2)} CUDA context.")]
    if r.gpus_tried is not None:  # --gpus auto (memplan.plan.multi_fit)
        tried = ", ".join(str(n) for n in r.gpus_tried)
        parts.append(Text(f"--gpus auto: {count} {'cards are' if count > 1 else 'card is'} the fewest with a plan"
                          + (f" (tried without one: {tried})" if tried else "")
                          if r.recommended is not None else f"--gpus auto: no plan up to {count} cards",
                          style="bold"))
    if r.recommended is None:
        lean = r.leanest
        parts.append(Text(
            f"Nothing fits. The leanest plan searched ({describe_setup(lean.setup)}) needs "
            f"{format_gib(lean.total_bytes, 2)}, {format_gib(r.budget.shortfall(lean.total_bytes), 2)} over the "
            f"budget.", style="bold red"))
        parts.append(Text(f"Smallest catalog card that fits it: "
                          f"{card_label(r.smallest_gpu) if r.smallest_gpu else 'none in the catalog'}"))
        if r.changes:
            parts.append(Text("Or change one pinned knob (the flag, or --free it when a --config sets it):"))
            parts += [Text(f"  - {c.description}: {format_gib(c.estimate.total_bytes, 2)}") for c in r.changes]
        parts += [Text(""), breakdown_table(lean, title="Leanest plan")]
        parts += fit_extras(r)
        parts += [Text(f"note: {n}", style="yellow") for n in (*lean.notes, *r.notes)]
        return Group(*parts)

    rec = r.recommended
    parts.append(Text.assemble((f"Recommended ({r.prefer}): ", "bold green"), describe_setup(rec.setup)))
    parts.append(Text(f"peak {format_gib(rec.total_bytes, 2)} at {rec.peak_phase.replace('_', ' ')}, "
                      f"{format_gib(-r.budget.shortfall(rec.total_bytes), 2)} to spare; "
                      f"{step_time(rec.setup).describe()}"))
    parts += [Text(""), breakdown_table(rec, title="Where the memory goes (recommended plan)"), Text("")]

    # one space between columns: ten columns with paged_adamw_8bit fit 80 columns without folding
    alt = Table(title="Alternatives", title_justify="left", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    # several cards: the engine (and what it offloads) in place of the step time, which does not model it
    last = "engine" if count > 1 else "time"
    for col, justify in (("", "left"), ("bits", "left"), ("rank", "right"), ("targets", "left"),
                         ("batch", "right"), ("ckpt", "left"), ("optimizer", "left"), ("peak", "right"),
                         ("spare", "right"), (last, "right")):
        alt.add_column(col, justify=justify, overflow="fold")
    for e in (rec, *r.alternatives):
        s = e.setup
        tail = (s.strategy + ("" if s.offload == "none" else f"+{s.offload[:3]}") if count > 1
                else f"{step_time(s).factor:.2f}x")
        alt.add_row("*" if e is rec else "", _plan_bits(s), "-" if s.method == "full" else str(s.rank),
                    s.targets or "all (full)", str(s.batch_size), "yes" if s.grad_ckpt else "no", s.optimizer,
                    _gib(e.total_bytes), _gib(-r.budget.shortfall(e.total_bytes)), tail,
                    style="green" if e is rec else None)
    legend = ("engine: +opt / +par = optimizer / parameters in host memory" if count > 1
              else "time: step time vs 16-bit, no checkpointing")
    parts += [alt, Text(f"* recommended; peak, spare in GiB per card; {legend}", style="dim")]
    nb = r.next_batch
    if nb is not None:
        b, need = nb.estimate.setup.batch_size, format_gib(nb.estimate.total_bytes, 2)
        if nb.fits:
            why = ("--prefer memory keeps the smallest batch" if r.prefer == "memory"
                   else f"the search stops at --max-batch {r.max_batch}")
            parts.append(Text(f"\nBatch {b} would fit too ({need}, {format_gib(-nb.shortfall_bytes, 2)} to spare): "
                              f"{why}."))
        else:
            where = (f"the smallest card it fits: {card_label(nb.smallest_gpu)}" if nb.smallest_gpu
                     else "it fits no catalog card")
            parts.append(Text(f"\nNext size up (batch {b}): needs {need}, {format_gib(nb.shortfall_bytes, 2)} over "
                              f"the budget; {where}."))
    for alt_regime in r.regimes:
        e = alt_regime.estimate
        parts.append(Text(f"Another precision regime of the same script: {alt_regime.change}: batch "
                          f"{e.setup.batch_size} fits ({format_gib(e.total_bytes, 2)}, "
                          f"{format_gib(-r.budget.shortfall(e.total_bytes), 2)} to spare)."))
    if r.max_seq_len_batch1 is not None:
        limit = {"learned": " (the model's learned position embeddings, max_position_embeddings)",
                 "trained": " (the model's trained context, max_position_embeddings; --allow-long-context plans "
                            "longer)"}.get(r.max_seq_len_limit, "")
        parts.append(Text(f"Longest sequence at batch 1 with these settings: {r.max_seq_len_batch1:,} tokens{limit}."))
    parts += fit_extras(r)
    parts += [Text(f"note: {n}", style="yellow") for n in (*rec.notes, *r.notes)]
    return Group(*parts)


def simulation_view(sim, analytic: Estimate | None = None) -> Group:
    """A ``memplan simulate`` result: the tracked breakdown at the peak, per-phase peaks, and optionally the
    tensor-level analytic estimate beside it (estimate ÷ simulated)."""
    s = sim.setup if isinstance(sim.setup, dict) else sim.setup.to_dict()
    head = Text(f"{s['model']}: simulated {sim.device_semantics}-semantics step(s) in {sim.wall_seconds:.1f} s",
                style="bold")
    parts: list = [head, Text(f"peak {format_gib(sim.total_bytes, 3)} at {sim.peak_phase.replace('_', ' ')} "
                              f"(tensor level: no CUDA context or allocator overhead)"), Text("")]
    parts.append(breakdown_table(sim, title="Tracked storages at the peak", compare=analytic,
                                 compare_label="analytic"))
    phases = Table(title="Peak per phase", title_justify="left", box=None, pad_edge=False)
    phases.add_column("phase")
    phases.add_column("GiB", justify="right")
    for phase, n in sim.phase_peaks.items():
        phases.add_row(phase, _gib(n))
    parts += [Text(""), phases]
    parts += [Text(f"note: {n}", style="yellow") for n in sim.notes]
    return Group(*parts)


def runs_view(records, out_dir) -> Group:
    """One line per recorded run (outcome, peak), then the file each was written to."""
    t = Table(title=f"Run records in {out_dir}", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("#", "right"), ("outcome", "left"), ("batch", "right"), ("seq", "right"),
                         ("steps", "right"), ("tensor peak GiB", "right"), ("reserved GiB", "right"),
                         ("phase", "left")):
        t.add_column(col, justify=justify, overflow="fold")
    for i, r in enumerate(records, start=1):
        peak = r.peak or {}
        tp, rv = peak.get("tensor_peak_bytes"), peak.get("max_reserved_bytes")
        t.add_row(str(i), r.outcome, str(r.setup.get("batch_size")), str(r.setup.get("seq_len")),
                  f"{r.steps_completed}/{r.steps}", _gib(tp) if tp is not None else "-",
                  _gib(rv) if rv is not None else "-", str(peak.get("peak_phase") or "-"),
                  style="red" if r.outcome != "ok" else None)
    files = [Text(f"{i}: {getattr(r, 'path', '') or 'not saved'}", overflow="fold")
             for i, r in enumerate(records, start=1)]
    return Group(t, *files)
