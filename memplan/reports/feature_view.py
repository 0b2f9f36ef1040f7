"""Terminal lines for what a plan has beyond one step's breakdown: the batch shape of packed or measured sequences,
host memory (activation offloading), the initialisation phase (--init) and, in ``fit``, the savers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from memplan.plan.savers import InitFit
from memplan.units import format_bytes, format_gib

if TYPE_CHECKING:
    from memplan.plan.budget import Budget
    from memplan.plan.estimate import Estimate
    from memplan.plan.fit_result import FitResult

__all__ = ["estimate_extras", "fit_extras"]

_PACKING = {"off": "padded batches", "packed": "packed rows (TRL bfd packing, padding-free)",
            "padding-free": "padding-free rows (DataCollatorWithFlattening)"}


def _shape_lines(e: Estimate) -> list[Text]:
    sh = e.shape
    if sh is None:
        return []
    lines = [Text(f"sequence shape: {_PACKING.get(sh.packing, sh.packing)}: peak step {sh.rows} x {sh.row_len:,} "
                  f"tokens ({sh.peak_tokens:,}); typical step {sh.typical_rows} x {sh.typical_row_len:,} "
                  f"({sh.typical_tokens:,}, the median of seeded random batches)")]
    if sh.file:
        lines.append(Text(f"lengths file {sh.file}: {sh.file_count:,} sequences, min {sh.file_min:,} / median "
                          f"{sh.file_median:,} / max {sh.file_max:,} tokens; {sh.truncated:,} truncated at "
                          f"{e.setup.seq_len:,}", style="dim"))
    return lines


_HOST_CAUSES = {"activation_offload": "offloaded activations", "parameters": "parameter shards",
                "gradients": "gradients", "optimizer_state": "optimizer state (fp32 master + moments)"}


def _host_lines(e: Estimate) -> list[Text]:
    """Host RAM by cause, per rank and, on several GPUs, per node (memplan.plan.offload, rank_memory)."""
    lines: list[Text] = []
    s = e.setup
    if s.strategy not in (None, "single"):
        lines.append(Text(f"one rank of {s.gpus * s.nodes} ({s.gpus} per node x {s.nodes} node"
                          f"{'s' if s.nodes > 1 else ''}): each GPU needs this peak; each rank runs its own "
                          f"micro-batch of {s.batch_size}", style="dim"))
    if not e.host_bytes:
        return lines
    total = sum(e.host_bytes.values())
    causes = ", ".join(f"{_HOST_CAUSES.get(k, k)} {format_bytes(v)}" for k, v in e.host_bytes.items() if v)
    node = f"; {format_bytes(total * s.gpus)} per node of {s.gpus}" if s.gpus > 1 else ""
    kind = "pageable" if s.activation_offload == "pageable" and set(e.host_bytes) == {"activation_offload"} \
        else "pinned"
    per = " per rank" if s.strategy not in (None, "single") else ""
    lines.append(Text(f"host memory: {format_bytes(total)} of {kind} RAM{per} ({causes}){node}, beside the GPU peak"))
    return lines


def _init_lines(init: InitFit | None, *, verdicts: bool) -> list[Text]:
    """The initialisation phase's paths and the binding phase, as ``InitFit`` decides them; ``verdicts``: whether
    each path fits the card (a card or budget was given)."""
    if init is None:
        return []
    lines = [Text(f"initialisation (--init {init.planned.init}) runs once before training; its own peak, CUDA "
                  f"context included:", style="bold")]
    for i, p in enumerate(init.paths):
        total = init.total(p)
        verdict = ("; fits the card" if total <= init.limit_bytes else "; does not fit the card") if verdicts else ""
        lines.append(Text(f"  {'planned' if i == 0 else 'or     '} {p.path}: GPU {format_gib(total, 2)}, host "
                          f"{format_bytes(p.host_peak_bytes)}, ~{p.seconds_estimate:,.0f} s of SVD/QR on CPU "
                          f"(largest layer {p.largest_layer}){verdict}"))
    binding = "the initialisation" if init.binding == "initialisation" else "training"
    lines.append(Text(f"  binding phase: {binding} (training peaks at {format_gib(init.training_bytes, 2)})"))
    return lines


def estimate_extras(e: Estimate, budget: Budget | None = None) -> list[Text]:
    """The lines ``memplan estimate`` prints after the breakdown."""
    init = None
    if e.init_phase:
        init = InitFit(e.init_phase, e.components.get("cuda_context", 0),
                       budget.limit_bytes if budget is not None else 0, e.total_bytes)
    return _shape_lines(e) + _host_lines(e) + _init_lines(init, verdicts=budget is not None)


def fit_extras(r: FitResult) -> list[Text]:
    """The lines ``memplan fit`` prints after the alternatives: the saver a plan needs, what each free saver buys,
    and the initialisation phase."""
    lines: list[Text] = []
    plan = r.recommended
    if plan is not None and plan.setup.strategy not in (None, "single"):
        lines.append(Text(""))
        lines += _host_lines(plan)
    if r.saver_needed and plan is not None:
        lines.append(Text(f"\nFits only with {r.saver_needed}: without it nothing fits.", style="bold yellow"))
    if r.savers and plan is not None:
        lines.append(Text("\nSavers (the trained model is the same; pin them with the flag):"))
        lines += [Text(f"  {o.describe(plan)}") for o in r.savers]
    if r.init is not None:
        lines.append(Text(""))
        lines += _init_lines(r.init, verdicts=True)
        within = r.init.within
        if within is not None and within is not r.init.planned:
            lines.append(Text(f"  the planned path does not fit; {within.path} keeps the initialisation inside the "
                              f"card", style="yellow"))
        elif within is None:
            lines.append(Text("  no initialisation path fits the card: initialise on a larger card or the CPU, save "
                              "the adapter, and train from it", style="yellow"))
    return lines
