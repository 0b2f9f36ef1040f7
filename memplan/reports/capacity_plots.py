"""The figures of the capacity report: a heat map of the best plan per model x card, a stacked breakdown of the
chosen plans on one card, and peak-memory curves against batch size and sequence length. ``figures`` says what
to draw from ``memplan.reports.capacity``'s rows; ``draw`` draws one. matplotlib (the ``report`` extra) is
imported inside the functions, with the Agg backend; every PNG is written atomically (``fileio.write_atomic``).
GiB = 2**30 bytes on every axis."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from memplan.fileio import write_atomic
from memplan.plan.breakdown import COMPONENT_LABELS, COMPONENTS
from memplan.units import GiB

from .capacity import FITS, NO_FIT, CapacityRow, card_order, peak_curves, targets_short

__all__ = ["Figure", "figures", "draw", "BITS_COLOURS", "Exit", "PanelFit", "curve_limits", "curve_series",
           "exit_x", "panel_fit", "spread", "LABEL_GAP"]

DPI = 130
# Base-weight precision of the best plan. A sequential green-to-orange scale that stays distinct in grey
# scale and for red-green colour blindness (ColorBrewer PRGn / PuOr ends); grey: nothing fits.
BITS_COLOURS = {16: "#1b7837", 8: "#7fbf7b", 4: "#f1a340", "no-fit": "#d0d0d0", "n/a": "#f7f7f7"}
_BITS_TEXT = {16: "white", 8: "black", 4: "black", "no-fit": "#333333", "n/a": "#555555"}
# One colour per breakdown component (COMPONENTS order), Okabe-Ito first, then muted tab20 shades.
_COMPONENT_COLOURS = dict(zip(COMPONENTS, (
    "#0072B2", "#56B4E9", "#9ecae1", "#009E73", "#8c6d31", "#E69F00", "#D55E00", "#CC79A7", "#F0E442",
    "#882255", "#555555", "#bbbbbb")))  # (comm_buffers: wine, before the runtime greys)
_RC = {"font.size": 10, "axes.titlesize": 13, "axes.labelsize": 11, "xtick.labelsize": 9.5, "ytick.labelsize": 9.5,
       "legend.fontsize": 9, "axes.spines.top": False, "axes.spines.right": False}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw(fig: Figure) -> None:
    """Draw ``fig`` (one of ``figures``) to ``fig.path``."""
    plt = _plt()
    with plt.rc_context(_RC):
        mfig = {"heatmap": _heatmap, "breakdown": _breakdown, "curves": _curves}[fig.kind](plt, fig)
        try:
            write_atomic(fig.path, lambda f: mfig.savefig(f, format="png", dpi=DPI), binary=True)
        finally:
            plt.close(mfig)


def _short_plan(r: CapacityRow) -> tuple[str, str]:
    """Two lines for a heat-map cell or a bar: ``4b ×8`` and ``r64 all-lin ckpt`` (+ the engine on several cards)."""
    if r.status == FITS:
        targets = "all-lin" if r.targets == "all-linear" else targets_short(r.targets)
        extra = " ckpt" if r.grad_ckpt else ""
        extra += {"adamw_bnb_8bit": " adam8", "paged_adamw_8bit": " paged8"}.get(r.optimizer, "")
        engine = f"\n{r.strategy}{' + offload' if r.offload not in (None, 'none') else ''}" if r.gpu_count > 1 else ""
        return f"{r.bits}b ×{r.batch_size}", f"r{r.rank} {targets}{extra}{engine}"
    if r.status == NO_FIT:
        return "—", f"needs {r.smallest_gpu}" if r.smallest_gpu else "fits no card"
    return "n/a", "seq too long"


def _category(r: CapacityRow):
    return r.bits if r.status == "fits" else r.status


def _order(rows: list[CapacityRow]) -> tuple[list[str], list[CapacityRow]]:
    """Models by size, cards (one row each) by memory."""
    params = {r.model: r.model_params for r in rows}
    models = sorted(params, key=params.__getitem__)
    cards = sorted({r.gpu_id: r for r in rows}.values(), key=card_order)
    return models, cards


def _heatmap(plt, fig: Figure):
    from matplotlib.patches import Patch, Rectangle

    rows: list[CapacityRow] = fig.data["rows"]
    models, cards = _order(rows)
    by = {(r.model, r.gpu_id): r for r in rows}
    params = {r.model: r.model_params for r in rows}
    w, h = 1.5 * len(cards) + 3.8, 0.66 * len(models) + 2.2
    mfig, ax = plt.subplots(figsize=(max(w, 7.5), max(h, 3.5)))
    for i, m in enumerate(models):
        for j, c in enumerate(cards):
            r = by[m, c.gpu_id]
            cat = _category(r)
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=BITS_COLOURS[cat], edgecolor="white", lw=2))
            if cat == "n/a":  # hatch colour is the edge colour: a separate, borderless grey-hatched layer
                ax.add_patch(Rectangle((j + 0.02, i + 0.02), 0.96, 0.96, fill=False, edgecolor="#cccccc", lw=0,
                                       hatch="///"))
            top, bottom = _short_plan(r)
            colour = _BITS_TEXT[cat]
            if r.status == "fits":
                ax.text(j + 0.5, i + 0.42, top, ha="center", va="center", fontsize=11.5, fontweight="bold",
                        color=colour)
                ax.text(j + 0.5, i + 0.76, bottom, ha="center", va="center", fontsize=7.5, color=colour)
            else:  # "needs" / the card on its own line: card labels are up to ~15 characters
                head, _, card = bottom.partition(" ")
                text = f"{head}\n{card}" if r.status == "no-fit" and r.smallest_gpu else bottom
                text = "n/a\nseq > max positions" if r.status == "n/a" else text
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8.5, color=colour,
                        linespacing=1.25, bbox=dict(facecolor=BITS_COLOURS[cat], edgecolor="none", pad=1.5))
    ax.set_xlim(0, len(cards))
    ax.set_ylim(len(models), 0)
    ax.set_xticks([j + 0.5 for j in range(len(cards))])
    ax.set_xticklabels([f"{c.gpu}\n{c.gpu_total_bytes / GiB:.0f} GiB" for c in cards])
    ax.set_yticks([i + 0.5 for i in range(len(models))])
    ax.set_yticklabels([f"{m}  ({params[m] / 1e9:.1f}B)" for m in models])
    ax.tick_params(length=0)
    for side in ("left", "bottom", "top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("GPU (total memory, GiB)")
    ax.set_ylabel("model (parameters)")
    prefer = rows[0].prefer if rows else "balanced"
    ax.set_title(f"{fig.title}\ncell: bits ×micro-batch, LoRA rank and targets (ranked by --prefer {prefer})",
                 loc="left")
    kinds = ((16, "16-bit LoRA"), (8, "8-bit LoRA (LLM.int8)"), (4, "4-bit QLoRA (nf4)"), ("no-fit", "does not fit"))
    if any(r.status == "n/a" for r in rows):
        kinds += (("n/a", "n/a (sequence too long)"),)
    legend = [Patch(facecolor=BITS_COLOURS[k], edgecolor="#999999", label=label, hatch="///" if k == "n/a" else None)
              for k, label in kinds]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="best precision")
    mfig.tight_layout()
    return mfig


def _breakdown(plt, fig: Figure):

    rows: list[CapacityRow] = sorted(fig.data["rows"], key=lambda r: r.model_params)
    present = [c for c in COMPONENTS if any(r.components.get(c, 0) for r in rows)]
    mfig, ax = plt.subplots(figsize=(max(7.5, 1.15 * len(rows) + 4.2), 6.2))
    xs = range(len(rows))
    bottoms = [0.0] * len(rows)
    for comp in present:
        vals = [r.components.get(comp, 0) / GiB for r in rows]
        ax.bar(xs, vals, bottom=bottoms, width=0.68, color=_COMPONENT_COLOURS[comp], label=COMPONENT_LABELS[comp],
               edgecolor="white", linewidth=0.4)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for x, r in zip(xs, rows):
        if r.status != "fits" and r.components:  # the leanest plan, which does not fit: hatch it
            ax.bar(x, bottoms[x], width=0.68, facecolor="none", edgecolor="#b2182b", hatch="//", linewidth=1.2)
    card = rows[0]
    budget, total = card.budget_bytes / GiB, card.gpu_total_bytes / GiB
    ax.axhline(total, color="#555555", ls="--", lw=1.2, label=f"{card.gpu} total memory ({total:.1f} GiB)")
    ax.axhline(budget, color="#b2182b", ls="-", lw=1.8,
               label=f"limit for a plan's peak ({budget:.1f} GiB)\n= usable {card.usable_bytes / GiB:.1f} GiB "
                     "+ CUDA context")
    # A leanest plan many times the card (405B on a 24 GiB card) would flatten every other bar: clip it.
    top = max([b for b, r in zip(bottoms, rows) if r.status == "fits"] + [total]) * 1.08
    top = max(top, min(max(bottoms), 2.5 * top) * 1.08)
    for x, (b, r) in enumerate(zip(bottoms, rows)):
        if b > top:
            ax.text(x, top * 0.985, f"{b:,.0f} GiB ↑", ha="center", va="top", fontsize=9, fontweight="bold",
                    color="#b2182b", bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
    ticks = []
    for r in rows:
        line1, line2 = _short_plan(r)
        rank, targets, *extras = line2.split(" ")  # three short lines: neighbouring labels must not touch
        plan = f"{line1}\n{rank} {targets}\n{' '.join(extras)}"
        if r.status != "fits":
            plan = "does not fit:\nleanest plan" if r.status == "no-fit" else "n/a"
        ticks.append(f"{r.model}\n{r.model_params / 1e9:.1f}B\n\n{plan}")
    ax.set_ylim(0, top)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(ticks, fontsize=8.5)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("peak memory (GiB)")
    ax.set_xlabel("model (parameters) and its chosen plan")
    ax.set_title(f"{fig.title}\nplan: bits ×micro-batch, LoRA rank and targets", loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles[::-1], labels[::-1]
    if any(r.status == "no-fit" for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="#b2182b", hatch="//"))
        labels.append("nothing fits: the leanest plan")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="component (top to bottom)")
    mfig.tight_layout()
    return mfig


def _card_lines(cards: list[CapacityRow]) -> list[tuple[float, str]]:
    """(limit GiB, label) per distinct limit; cards within 0.5 GiB share a line and a label."""
    lines: list[tuple[float, list[str]]] = []
    for c in sorted(cards, key=lambda c: c.budget_bytes):
        gib = c.budget_bytes / GiB
        if lines and gib - lines[-1][0] < 0.5:
            lines[-1][1].append(c.gpu)
        else:
            lines.append((gib, [c.gpu]))
    return [(gib, f"{' / '.join(names)}  {gib:.1f} GiB") for gib, names in lines]


def spread(wanted: list[float], gap: float, widths: list[float] | None = None, lo: float = -math.inf,
           hi: float = math.inf) -> list[float]:
    """Label centres near ``wanted`` (ascending), neighbours' edges ``gap`` apart or more (``widths``: default 0),
    inside [``lo``, ``hi``] where there is room: pushed up, then back down from ``hi``; the gaps always hold."""
    ws = widths or [0.0] * len(wanted)
    out: list[float] = []
    for i, (c, w) in enumerate(zip(wanted, ws)):
        c = max(c, lo + w / 2)
        out.append(max(c, out[-1] + (ws[i - 1] + w) / 2 + gap) if out else c)
    for i in reversed(range(len(out))):
        out[i] = min(out[i], hi - ws[i] / 2 if i == len(out) - 1 else out[i + 1] - (ws[i] + ws[i + 1]) / 2 - gap)
    return out


# ---- peak curves: what the axes show (pure; the tests hold these) -------------------------------------------
Y_MARGIN = 1.08  # the curves' y axis ends 8% above the largest card's limit
LABEL_GAP = 6.0  # points between neighbouring exit labels
_CURVE_STYLE = {16: ("#1b7837", "16-bit LoRA"), 8: ("#7fbf7b", "8-bit LoRA"), 4: ("#e08214", "4-bit QLoRA")}


class Exit(NamedTuple):
    """Where line ``key`` (bits, checkpointing) leaves the top; ``above``: it starts above, labelled "4-bit ≥92 GiB"."""
    key: tuple[int, bool]
    x: float
    label: str
    above: bool = False


class PanelFit(NamedTuple):
    """A panel's x axis: ``ticks``, the x of points on the plot; ``x_max``, the last such or exit; ``exits`` by x."""
    axis: str
    ticks: list[int]
    x_max: float
    exits: list[Exit]


def curve_series(points, axis: str) -> dict[tuple[int, bool], list[tuple[int, float]]]:
    """The lines of one panel (``axis``: "batch" or "seq_len"): (bits, checkpointing) -> [(x, peak GiB)]."""
    series: dict[tuple[int, bool], list[tuple[int, float]]] = {}
    for p in (p for p in points if p.axis == axis):
        x = p.batch_size if axis == "batch" else p.seq_len
        series.setdefault((p.bits, p.grad_ckpt), []).append((x, p.peak_bytes / GiB))
    return {k: sorted(v) for k, v in series.items()}


def exit_x(xy: list[tuple[int, float]], top: float) -> float | None:
    """The x where the line ``xy`` first rises above ``top`` (straight between points on a log2 x axis, as
    drawn); its first x when it starts above; None when it stays at or under."""
    for i, (x, y) in enumerate(xy):
        if y > top:
            x0, y0 = xy[i - 1] if i else (x, top)  # from the point before; a line starting above: at its start
            return 2 ** (math.log2(x0) + (top - y0) / (y - y0) * (math.log2(x) - math.log2(x0)))
    return None


def panel_fit(points, axis: str, top: float) -> PanelFit:
    """Ticks only where a point is on the plot; the axis ends at the last such point or the last exit."""
    series = curve_series(points, axis)
    ticks = sorted({x for xy in series.values() for x, y in xy if y <= top})
    exits = []
    for (bits, ckpt), xy in series.items():
        if (x := exit_x(xy, top)) is not None:  # labelled with the legend's name, short (and how high, if above)
            low = f" ≥{math.floor(min(y for _, y in xy)):,} GiB" if (above := xy[0][1] > top) else ""
            exits.append(Exit((bits, ckpt), x, f"{bits}-bit{' ckpt' if ckpt else ''}{low}", above))
    if not ticks:  # nothing fits under the top: the whole grid, every line labelled at its start
        ticks = sorted({x for xy in series.values() for x, _ in xy})
    x_max = max([float(t) for t in ticks[-1:]] + [e.x for e in exits] or [1.0])
    return PanelFit(axis, ticks, x_max, sorted(exits, key=lambda e: (e.x, e.key)))


def curve_limits(points, cards: list[CapacityRow]) -> tuple[float, PanelFit, PanelFit]:
    """(y axis top in GiB: a little above the largest card's limit, or the highest peak; batch panel; seq panel)."""
    lines = _card_lines(cards)
    top = (lines[-1][0] if lines else max([p.peak_bytes / GiB for p in points] or [1.0])) * Y_MARGIN
    return top, panel_fit(points, "batch", top), panel_fit(points, "seq_len", top)


def _exit_labels(mfig, ax, fit: PanelFit, top: float) -> None:
    """Above ``ax``, after the layout (label widths measured): each exit's label near its exit, with a leader;
    over them, from the left, the lines that start above the plot. Neighbours at least LABEL_GAP points apart."""
    renderer = mfig.canvas.get_renderer()
    box, px = ax.get_window_extent(renderer), mfig.dpi / 72  # pixels per point
    exits, above = [e for e in fit.exits if not e.above], [e for e in fit.exits if e.above]
    for row, wanted, dy in ((exits, [ax.transData.transform((e.x, top))[0] for e in exits], 9),
                            (above, [box.x0] * len(above), 25 if exits else 9)):
        texts = [ax.text(0, 1 + dy * px / box.height, e.label, transform=ax.transAxes, fontsize=8.5, va="bottom",
                         fontweight="bold", ha="center", color=_CURVE_STYLE.get(e.key[0], ("#444444",))[0])
                 for e in row]
        widths = [t.get_window_extent(renderer).width for t in texts]
        if (k := (box.width - LABEL_GAP * px * (len(row) - 1)) / (sum(widths) or 1)) < 1:  # too long: smaller type
            widths = [w * k for w in widths]
            for t in texts:
                t.set_fontsize(8.5 * k)
        for t, e, c in zip(texts, row, spread(wanted, LABEL_GAP * px, widths, box.x0, box.x1)):
            t.set_x((c - box.x0) / box.width)
            if not e.above:
                ax.annotate("", xy=(e.x, top), xytext=t.get_position(), textcoords="axes fraction",
                            annotation_clip=False, arrowprops=dict(arrowstyle="-", color=t.get_color(), lw=0.9,
                                                                   shrinkA=0, shrinkB=0, ls="--" if e.key[1] else "-"))


def _curves(plt, fig: Figure):
    points = fig.data["points"]
    lines = _card_lines(fig.data["cards"])
    top, *fits = curve_limits(points, fig.data["cards"])
    mfig, axes = plt.subplots(1, 2, figsize=(14, 6.6), sharey=True)
    pad = 6 + 16 * max(len({e.above for e in f.exits}) for f in fits)  # rows: exit labels, lines above the plot
    for ax, fit in zip(axes, fits):
        for gib, _ in lines:
            ax.axhline(gib, color="#888888", ls=":", lw=1.1)
        for (bits, ckpt), xy in curve_series(points, fit.axis).items():
            colour, name = _CURVE_STYLE.get(bits, ("#444444", f"{bits}-bit"))
            ax.plot([x for x, _ in xy], [y for _, y in xy], color=colour, ls="--" if ckpt else "-", marker="o",
                    ms=4, lw=2, label=f"{name}, {'with' if ckpt else 'no'} checkpointing")
        ax.set_xscale("log", base=2)
        tilt = 30 if fit.axis == "seq_len" and len(fit.ticks) > 6 else 0  # long numbers, many ticks
        ax.set_xticks(fit.ticks, [f"{x:,}" for x in fit.ticks], rotation=tilt)
        ax.minorticks_off()
        ax.set_xlim(min(fit.ticks, default=fit.x_max) / 2 ** 0.3, fit.x_max * 2 ** 0.3)  # x_max >= every tick
        ax.set_ylim(0, top)
        ax.grid(alpha=0.25)
        if fit.exits and all(e.above for e in fit.exits):  # an empty panel: say why
            ax.text(0.5, 0.5, "every line is above the largest card's limit", transform=ax.transAxes, ha="center",
                    va="center", bbox=dict(facecolor="white", edgecolor="none"))
        ax.set_title(f"against {'batch size' if fit.axis == 'batch' else 'sequence length'}", loc="left", pad=pad)
        if fit.axis == "batch":
            seq = next((p.seq_len for p in points if p.axis == "batch"), 0)
            ax.set_xlabel(f"micro-batch size (sequences of {seq:,} tokens)")
            ax.set_ylabel("peak memory (GiB)")
        else:
            ax.set_xlabel("sequence length (tokens), batch size 1")
    # Card labels once, right of the right panel (both panels share the y axis).
    for (gib, label), y in zip(lines, spread([g for g, _ in lines], top * 0.035)):
        if gib <= top:
            axes[1].annotate(label, xy=(1.0, gib), xycoords=("axes fraction", "data"), xytext=(1.02, y),
                             textcoords=("axes fraction", "data"), va="center", fontsize=8.5, color="#444444",
                             arrowprops=dict(arrowstyle="-", color="#bbbbbb", lw=0.8), annotation_clip=False)
    handles, labels = axes[0].get_legend_handles_labels()
    mfig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9.5)
    mfig.suptitle(fig.title, x=0.01, y=0.985, ha="left", fontsize=14)
    mfig.text(0.01, 0.925, textwrap.fill(fig.caption, 150), ha="left", va="top", fontsize=10, color="#333333")
    mfig.tight_layout(rect=(0, 0.05, 0.86, 0.9))
    for ax, fit in zip(axes, fits):
        _exit_labels(mfig, ax, fit, top)
    return mfig


@dataclass
class Figure:
    """One PNG of the report: what to draw (``kind`` + ``data``), where, and its caption."""

    name: str
    kind: str  # "heatmap" | "breakdown" | "curves"
    title: str
    caption: str
    seq_len: int | None
    data: dict
    path: Path | None = None


def _representative_card(rows: Sequence[CapacityRow]) -> str:
    """The card id nearest 24 GiB (a 3090/4090 class card): the breakdown figure's card."""
    cards = {r.gpu_id: r.gpu_total_bytes for r in rows}
    return min(cards, key=lambda g: (abs(cards[g] - 24 * GiB), -cards[g]))


def figures(rows: Sequence[CapacityRow], curve_model: str | None, profiles_dir) -> list[Figure]:
    figs: list[Figure] = []
    card = _representative_card(rows)
    card_row = next(r for r in rows if r.gpu_id == card)
    for seq in dict.fromkeys(r.seq_len for r in rows):
        at_seq = [r for r in rows if r.seq_len == seq]
        figs.append(Figure(f"capacity_heatmap_seq{seq}.png", "heatmap",
                           f"Best plan per model and card, sequence length {seq:,}",
                           "Colour: the base-weight precision of the best plan; text: bits and the "
                           "micro-batch.",
                           seq, {"rows": at_seq}))
        figs.append(Figure(f"capacity_breakdown_seq{seq}.png", "breakdown",
                           f"Where the memory goes on the {card_row.gpu}, sequence length {seq:,}",
                           f"Each bar is the chosen plan of one model on the {card_row.gpu} (hatched: nothing fits, "
                           "the leanest plan is shown).", seq, {"rows": [r for r in at_seq if r.gpu_id == card]}))
    params = {r.model: r.model_params for r in rows}
    model = curve_model or min(params, key=lambda m: abs(params[m] - 8e9))
    cards = {r.gpu_id: r for r in rows}
    points = peak_curves(model, gpu=card, profiles_dir=profiles_dir)
    if not points:
        return figs
    name = points[0].model
    caption = ("LoRA r=64 on all linear layers, AdamW. Dotted lines: each card's limit for the peak (total memory "
               "− headroom); a line leaving the top is labelled where it leaves (≥ N GiB: above the whole panel). "
               "4-bit climbs faster: prepare_model_for_kbit_training keeps the hidden states in fp32.")
    figs.append(Figure("capacity_curves.png", "curves", f"Peak memory of {name} against batch size and sequence "
                       "length", caption, None, {"points": points, "cards": list(cards.values()), "model": name}))
    return figs

