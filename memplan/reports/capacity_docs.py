"""The capacity report's files: ``capacity.md``, the self-contained ``capacity.html`` (inline CSS, images as
data: URIs, no external URL), ``capacity.csv`` and the PNGs, from ``memplan.reports.capacity``'s rows and
``capacity_plots``' figures. The documents share the tables. ``write_capacity_report`` writes them all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from memplan.errors import InvalidSetupError
from memplan.fileio import write_atomic
from memplan.units import GiB

from .capacity import (CSV_COLUMNS, FITS, FORMATS, NO_FIT, NOT_APPLICABLE, CapacityRow, card_order, measured_runs,
                       require, targets_short)
from .capacity_plots import BITS_COLOURS, Figure, draw, figures

__all__ = ["markdown", "html", "write_capacity_report", "capacity_files"]


_OPT_SHORT = {"adamw_torch": "", "adamw_bnb_8bit": "adam8", "paged_adamw_8bit": "paged8"}


def _gib(n: int | None, precision: int = 2) -> str:
    return "—" if n is None else f"{n / GiB:.{precision}f}"


def _cell(r: CapacityRow) -> str:
    """``4b r64 all-linear ×8 ckpt``, ``— (needs A100 80GB)`` or ``n/a: ...``."""
    if r.status == FITS:
        parts = [f"{r.bits}b", f"r{r.rank}", targets_short(r.targets), f"×{r.batch_size}"]
        parts += ["ckpt"] if r.grad_ckpt else []
        parts.append(_OPT_SHORT.get(r.optimizer, r.optimizer))  # "" for the default, torch AdamW
        if r.gpu_count > 1:  # the engine, and what it offloads (memplan.plan.distributed)
            parts.append(r.strategy + ("" if r.offload in (None, "none") else f"+{r.offload}-offload"))
        return " ".join(p for p in parts if p)
    if r.status == NO_FIT:
        return f"— (needs {r.smallest_gpu})" if r.smallest_gpu else "— (fits no catalog card)"
    return f"n/a: {r.reason}" if r.reason and len(r.reason) <= 48 else "n/a (see plan details)"


def _note(r: CapacityRow) -> str:
    if r.status == FITS:
        engine = (f"{r.gpu_count} ranks under {r.strategy}" + ("" if r.offload in (None, "none") else
                                                               f", {r.offload} in host memory") + "; "
                  if r.gpu_count > 1 else "")
        return engine + (f"longest sequence at batch 1: {r.max_seq_len_batch1:,}" if r.max_seq_len_batch1 else "")
    if r.status == NO_FIT:
        where = f"smallest card that holds it: {r.smallest_gpu}" if r.smallest_gpu else "no catalog card holds it"
        return f"nothing fits; the leanest plan needs {_gib(r.leanest_peak_bytes)} GiB; {where}"
    return f"n/a: {r.reason}"


def _matrix_table(at_seq: list[CapacityRow]) -> tuple[list[str], list[list[tuple[str, int | None]]], list[str]]:
    """Header, rows of (cell text, bits or None for the colour), and the row labels, for one sequence length."""
    models = sorted(dict.fromkeys(r.model for r in at_seq), key=lambda m: _params(at_seq)[m])
    cards = sorted({r.gpu_id: r for r in at_seq}.values(), key=card_order)
    by = {(r.model, r.gpu_id): r for r in at_seq}
    header = ["model"] + [f"{c.gpu} ({c.gpu_total_bytes / GiB:.0f} GiB)" for c in cards]
    body = [[(_cell(by[m, c.gpu_id]), by[m, c.gpu_id].bits if by[m, c.gpu_id].status == FITS else None)
             for c in cards] for m in models]
    labels = [f"{m} ({_params(at_seq)[m] / 1e9:.1f}B)" for m in models]
    return header, body, labels


def _params(rows: Sequence[CapacityRow]) -> dict[str, int]:
    return {r.model: r.model_params for r in rows}


_DETAIL_HEADER = ["model", "card", "bits", "quant", "rank", "targets", "batch", "ckpt", "optimizer", "peak GiB",
                  "headroom GiB", "note"]
_NUMERIC = ("bits", "rank", "batch", "peak GiB", "headroom GiB")


def _detail_rows(at_seq: list[CapacityRow]) -> list[list[str]]:
    params = _params(at_seq)
    out = []
    for r in sorted(at_seq, key=lambda r: (params[r.model], *card_order(r))):
        if r.status == FITS:
            plan = [str(r.bits), r.quant, str(r.rank), r.targets, str(r.batch_size), "yes" if r.grad_ckpt else "no",
                    r.optimizer, _gib(r.peak_bytes), _gib(r.headroom_left_bytes)]
        else:
            peak = f"{_gib(r.leanest_peak_bytes)} (leanest)" if r.status == NO_FIT else "—"
            plan = ["—"] * 7 + [peak, "—"]
        out.append([r.model, r.gpu, *plan, _note(r)])
    return out


def _summary(rows: Sequence[CapacityRow]) -> str:
    n = {s: sum(r.status == s for r in rows) for s in (FITS, NO_FIT, NOT_APPLICABLE)}
    models, cards = len({r.model for r in rows}), len({r.gpu_id for r in rows})
    seqs = len({r.seq_len for r in rows})
    return (f"{models} models × {cards} cards × {seqs} sequence length{'s' if seqs > 1 else ''} = {len(rows)} cells: "
            f"{n[FITS]} with a plan, {n[NO_FIT]} where nothing fits, {n[NOT_APPLICABLE]} n/a")


def _how_to_read(rows: Sequence[CapacityRow]) -> list[str]:
    from memplan.plan.search import PREFERENCE_RULES

    prefer = rows[0].prefer if rows else "balanced"
    return [
        "Each cell is the plan `memplan fit MODEL --gpu CARD --seq-len N` recommends (run it for the full breakdown "
        "and the alternatives). Cell text: base-weight bits (`16b` = bf16/fp16 LoRA, `8b` = LLM.int8, `4b` = QLoRA "
        "nf4 + double quant), LoRA rank (`r64`), adapter targets (`all-linear`, or the architecture's peft default "
        "such as `q,v` for q_proj,v_proj), the micro-batch (`×8`, powers of two up to 64), `ckpt` when "
        "gradient checkpointing is on, and `adam8` / `paged8` for bitsandbytes' 8-bit / paged 8-bit AdamW "
        "(no mark: torch AdamW).",
        "A plan fits when its estimated peak, CUDA context and allocator overhead included, is at most the card's "
        "total memory minus the headroom (5% by default). *headroom GiB* is what is left below that limit: the "
        "card's usable memory (total − CUDA context − headroom) minus what the plan asks of torch's allocator.",
        f"Among the plans that fit, the search ranks by `--prefer {prefer}`: {PREFERENCE_RULES[prefer]}. Each "
        "combination is taken at the largest micro-batch that fits (at the smallest with `--prefer memory`). The "
        "expected step time multiplies memplan's cited factors (its docs/step-time.md): 1.5x for gradient "
        "checkpointing with LoRA (one more forward per step), 1.3x for 8-bit or 4-bit base weights.",
        "`— (needs X)`: nothing fits; X is the smallest catalog card (of all of `memplan gpus`, not only the "
        "columns) on which the leanest plan searched fits (usually 4-bit, r8, default targets, batch 1, "
        "checkpointing, an 8-bit optimizer); *peak GiB* then shows that leanest plan's peak. `n/a`: the model "
        "cannot take the sequence length (its max_position_embeddings is shorter).",
        "The peaks are memplan's analytic estimates, within a few percent of exact tensor-level simulations "
        "(reports/validation.md). The CUDA context and the allocator overhead are documented defaults not yet "
        "calibrated on GPUs, one reason for the headroom.",
    ]


_MEASURED_HEADER = ["run", "card", "outcome", "measured GiB", "estimate GiB", "estimate ÷ measured"]


def _measured(measured: Sequence) -> tuple[list[str], list[list[str]], str]:
    """The GPU run records of the report's models (``memplan.report.measured_runs``): header, rows, intro."""
    if not measured:
        return _MEASURED_HEADER, [], (
            "No GPU run records of these models yet in the run records folder. The estimates are held "
            "to exact tensor-level simulations instead (reports/validation.md). Record a run with `memplan profile "
            "MODEL --device cuda` or `MemplanCallback(record_dir=...)` in a training script, and regenerate.")
    body = []
    for row in measured:
        s = row.setup
        name = (f"{s['model']} {s['bits']}b r{s['rank']} {targets_short(s.get('targets'))} ×{s['batch_size']} "
                f"s{s['seq_len']}{' ckpt' if s.get('grad_ckpt') else ''}")
        card = row.device_name or ""
        body.append([name, card, row.outcome, _gib(row.measured_bytes), _gib(row.analytic_bytes),
                     f"{row.analytic_bytes / row.measured_bytes:.3f}"])
    return _MEASURED_HEADER, body, (
        f"{len(body)} GPU run record(s) of these models: measured = peak reserved by torch's allocator + the "
        "measured CUDA context; estimate = memplan's analytic total for the same setup on that card.")


def _md_table(header: list[str], body: list[list[str]], right: Sequence[str] = ()) -> list[str]:
    """A Markdown table; the columns named in ``right`` are right-aligned."""

    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    sep = ["---:" if h in right else "---" for h in header]
    return ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(map(esc, row)) + " |" for row in body)]


def markdown(rows: Sequence[CapacityRow], figs: list[Figure], command: str, measured: Sequence = ()) -> str:
    from memplan import __version__

    lines = ["# memplan capacity report: which LoRA / QLoRA plan fits which card", "",
             f"{_summary(rows)}. Generated by memplan {__version__} with:", "", "```bash", command, "```", "",
             "Peaks include the CUDA context; a plan fits when its peak is at most the card's total memory minus "
             f"{_headroom_pct(rows)} headroom. See [How to read](#how-to-read) at the end.", ""]
    lines += [f"Note: {n.rstrip('.')}." for n in _notes(rows)] + ([""] if _notes(rows) else [])
    for seq in dict.fromkeys(r.seq_len for r in rows):
        at_seq = [r for r in rows if r.seq_len == seq]
        header, body, labels = _matrix_table(at_seq)
        lines += [f"## Sequence length {seq:,}", "", "Best plan per model (rows) and card (columns):", ""]
        lines += _md_table(header, [[label, *(t for t, _ in row)] for label, row in zip(labels, body)])
        for fig in figs:
            if fig.seq_len == seq and fig.kind == "heatmap":
                lines += ["", f"![{fig.title}]({fig.name})"]
        lines += ["", f"### Plan details, sequence length {seq:,}", ""]
        lines += _md_table(_DETAIL_HEADER, _detail_rows(at_seq), right=_NUMERIC)
        for fig in figs:
            if fig.seq_len == seq and fig.kind == "breakdown":
                lines += ["", f"![{fig.title}]({fig.name})", "", fig.caption]
        lines.append("")
    for fig in figs:
        if fig.kind == "curves":
            lines += [f"## {fig.title}", "", f"![{fig.title}]({fig.name})", "", fig.caption, ""]
    header, body, intro = _measured(measured)
    lines += ["## Measured on GPUs", "", intro, ""]
    if body:
        lines += _md_table(header, body, right=("measured GiB", "estimate GiB", "estimate ÷ measured")) + [""]
    lines += ["## How to read", ""]
    for para in _how_to_read(rows):
        lines += [para, ""]
    return "\n".join(lines)


def _notes(rows: Sequence[CapacityRow]) -> list[str]:
    """The estimates' caveats, once each."""
    return list(dict.fromkeys(n for r in rows if r.notes for n in r.notes.split("; ")))


def _headroom_pct(rows: Sequence[CapacityRow]) -> str:
    r = rows[0]
    return f"{100 * (r.gpu_total_bytes - r.budget_bytes) / r.gpu_total_bytes:.0f}%"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.5em; }
code, pre { font-family: Menlo, Consolas, monospace; background: #f4f4f4; }
pre { padding: .6em; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: .88em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.b16 { background: {b16}; color: #fff; } td.b8 { background: {b8}; } td.b4 { background: {b4}; }
td.nofit { background: {nofit}; color: #333; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.caption { color: #555; font-size: .9em; }
.scroll { overflow-x: auto; }  /* wide tables scroll on a narrow window instead of overflowing the page */
@page { size: A4 landscape; margin: 12mm; }
@media print { body { max-width: none; margin: 0; } table { font-size: .72em; } h2 { break-before: page; } }
"""


def _css() -> str:

    colours = {"b16": BITS_COLOURS[16], "b8": BITS_COLOURS[8], "b4": BITS_COLOURS[4], "nofit": BITS_COLOURS["no-fit"]}
    css = _CSS
    for key, colour in colours.items():
        css = css.replace("{" + key + "}", colour)
    return css


def _html_table(header: list[str], body: list[list[str]], classes: list[list[str]] | None = None) -> str:
    from html import escape

    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(body):
        cells = []
        for j, c in enumerate(row):
            cls = classes[i][j] if classes else ""
            cells.append(f'<td class="{cls}">{escape(str(c))}</td>' if cls else f"<td>{escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table></div>"])


def _img(fig: Figure) -> str:
    import base64
    from html import escape

    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    return (f'<img alt="{escape(fig.title)}" src="data:image/png;base64,{data}">'
            f'<p class="caption">{escape(fig.caption)}</p>')


def html(rows: Sequence[CapacityRow], figs: list[Figure], command: str, measured: Sequence = ()) -> str:
    from html import escape

    from memplan import __version__

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>memplan capacity report</title>", f"<style>{_css()}</style></head><body>",
             "<h1>memplan capacity report: which LoRA / QLoRA plan fits which card</h1>",
             f"<p>{escape(_summary(rows))}. Generated by memplan {escape(__version__)} with:</p>",
             f"<pre>{escape(command)}</pre>",
             f"<p>Peaks include the CUDA context; a plan fits when its peak is at most the card's total memory minus "
             f"{_headroom_pct(rows)} headroom. See <a href=\"#how-to-read\">how to read</a> at the end.</p>"]
    parts += [f"<p>Note: {escape(n.rstrip('.'))}.</p>" for n in _notes(rows)]
    detail_classes = ["num" if h in _NUMERIC else "" for h in _DETAIL_HEADER]
    for seq in dict.fromkeys(r.seq_len for r in rows):
        at_seq = [r for r in rows if r.seq_len == seq]
        header, body, labels = _matrix_table(at_seq)
        classes = [[""] + [f"b{bits}" if bits else ("nofit" if text.startswith("—") else "") for text, bits in row]
                   for row in body]
        parts += [f"<h2>Sequence length {seq:,}</h2>", "<p>Best plan per model (rows) and card (columns):</p>",
                  _html_table(header, [[label, *(t for t, _ in row)] for label, row in zip(labels, body)], classes)]
        parts += [_img(f) for f in figs if f.seq_len == seq and f.kind == "heatmap"]
        details = _detail_rows(at_seq)
        parts += [f"<h3>Plan details, sequence length {seq:,}</h3>",
                  _html_table(_DETAIL_HEADER, details,
                              [detail_classes for _ in details])]
        parts += [_img(f) for f in figs if f.seq_len == seq and f.kind == "breakdown"]
    for fig in figs:
        if fig.kind == "curves":
            parts += [f"<h2>{escape(fig.title)}</h2>", _img(fig)]
    header, body, intro = _measured(measured)
    parts += ["<h2>Measured on GPUs</h2>", f"<p>{_inline_code(escape(intro))}</p>"]
    if body:
        parts.append(_html_table(header, body, [["", "", "", "num", "num", "num"] for _ in body]))
    parts.append('<h2 id="how-to-read">How to read</h2>')
    parts += [f"<p>{_inline_code(escape(p))}</p>" for p in _how_to_read(rows)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _inline_code(text: str) -> str:
    """Markdown's `code` and *emphasis* as HTML (the how-to-read paragraphs are shared)."""
    import re

    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


# ---- command line -------------------------------------------------------------------------------------------


def write_capacity_report(rows: Sequence[CapacityRow], out_dir: str | os.PathLike, formats: Sequence[str] = ("md",),
                          *, command: str | None = None, curve_model: str | None = None,
                          profiles_dir=None, runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``capacity.csv``, the PNG figures, and ``capacity.md`` / ``capacity.html`` per ``formats``.

    Args:
        rows: ``capacity_rows(...)``.
        out_dir: the report folder (created if missing); every file is replaced atomically.
        formats: any of ``md`` and ``html``.
        command: the command line shown in the report (default: a ``memplan report capacity`` equivalent).
        curve_model: the model of the peak-vs-batch / peak-vs-sequence figure (default: the one nearest 8B
            parameters).
        profiles_dir: the catalog the rows came from (for the curves).
        runs_dir: run records (``memplan profile`` / ``MemplanCallback``) to set beside the estimates: GPU runs
            of the report's models are listed with estimate ÷ measured (default: the catalog's ``runs/``).

    Returns:
        The paths written, the main document first.

    Raises:
        ReportDependencyError: matplotlib is not installed.
        InvalidSetupError: an unknown format or no rows.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidSetupError(f"unknown report format {', '.join(unknown) or '(none)'!r}; allowed: "
                                f"{', '.join(FORMATS)} (capacity.csv and the PNGs are always written)")
    if not rows:
        raise InvalidSetupError("no rows to report")
    require("matplotlib")
    out = Path(out_dir)
    command = command or _default_command(rows, formats, out)
    figs = figures(rows, curve_model, profiles_dir)
    measured = measured_runs(rows, runs_dir if runs_dir is not None else _default_runs_dir(profiles_dir))
    written: list[Path] = []
    for fig in figs:
        fig.path = out / fig.name
        draw(fig)
        written.append(fig.path)
    csv_path = out / "capacity.csv"
    write_atomic(csv_path, lambda f: f.write(_csv_text(rows)))
    written.insert(0, csv_path)
    docs = []
    if "md" in formats:
        md_path = out / "capacity.md"
        write_atomic(md_path, lambda f: f.write(markdown(rows, figs, command, measured)))
        docs.append(md_path)
    if "html" in formats:
        html_path = out / "capacity.html"
        write_atomic(html_path, lambda f: f.write(html(rows, figs, command, measured)))
        docs.append(html_path)
    return docs + written


def _default_runs_dir(profiles_dir) -> Path:
    from memplan.catalog.paths import profiles_dir as catalog_dir

    return Path(catalog_dir(profiles_dir)) / "runs"


def _csv_text(rows: Sequence[CapacityRow]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.to_record().items()})
    return buf.getvalue()



def _default_command(rows: Sequence[CapacityRow], formats: Sequence[str], out: Path) -> str:
    models = ",".join(dict.fromkeys(r.model for r in rows))
    gpus = ",".join(dict.fromkeys(r.gpu_id for r in rows))
    seqs = ",".join(str(s) for s in dict.fromkeys(r.seq_len for r in rows))
    return (f"memplan report capacity --models {models} --gpus {gpus} --seq-len {seqs} --format {','.join(formats)} "
            f"--out {out}")


def capacity_files(seq_lens, formats) -> tuple[str, ...]:
    """Every file ``write_capacity_report`` writes for these sequence lengths and formats."""
    names = [f"capacity.{f}" for f in formats] + ["capacity.csv", "capacity_curves.png"]
    names += [f"capacity_{kind}_seq{s}.png" for s in seq_lens for kind in ("heatmap", "breakdown")]
    return tuple(names)
