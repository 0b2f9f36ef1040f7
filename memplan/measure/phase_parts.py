"""What was alive, by component, at the highest moment of each analytic phase of a tracked run.

``MemoryTracker.result`` gives the components at the overall peak and each phase's highest level; the derived
activation terms (``memplan.measure.derive_trace``) need the components at every phase's own peak. This
replays the tracker's event log the same way (``MemoryTracker.result``: same phases, same sub-phase rule) and
records, per ``memplan.plan.breakdown.PHASES`` name, the breakdown at its highest level.
"""

from __future__ import annotations

from memplan.plan.breakdown import COMPONENTS

__all__ = ["phase_components"]


def phase_components(trk) -> dict[str, dict[str, int]]:
    """PHASES name -> {component: bytes} at that phase's highest level (the first moment it is reached)."""
    trk._scan()
    end = trk._exit_seq if trk._exit_seq is not None else trk._seq
    n = len(trk._size)
    cats = [trk._category(i) for i in range(n)]
    size = [0 if i in trk._excluded else trk._size[i] for i in range(n)]
    events: list[tuple[int, int]] = []
    for i in range(n):
        if trk._born[i] <= end:
            events.append((trk._born[i], i))
            if trk._died[i] != -1 and trk._died[i] <= end:
                events.append((trk._died[i], -i - 1))
    events.sort()
    grads_made: dict[int, int] = {}
    for i in range(n):
        if cats[i] == "gradients":
            grads_made[trk._phase_idx[i]] = grads_made.get(trk._phase_idx[i], 0) + 1
    phases = trk._phases
    level = 0
    best: dict[str, tuple[int, int]] = {}  # sub-phase -> (level, seq)
    ph = 0
    live_logits = grads_so_far = 0

    def note(sub: str, seq: int) -> None:
        if sub and level > best.get(sub, (-1, 0))[0]:
            best[sub] = (level, seq)

    for seq, code in events:
        while ph + 1 < len(phases) and phases[ph + 1][2] <= seq:
            ph += 1
            live_logits = grads_so_far = 0
            note({"forward": "forward_end", "optimizer_step": "optimizer_step"}.get(phases[ph][0], ""), seq - 1)
        born = code >= 0
        i = code if born else -code - 1
        level += size[i] if born else -size[i]
        if trk._phase_idx[i] == ph and phases[ph][0] == "backward":
            if cats[i] == "logits_loss" and not trk._grad_on[i]:
                live_logits += 1 if born else -1
            elif cats[i] == "gradients" and born:
                grads_so_far += 1
        if born:
            note(trk._subphase(phases[ph][0], ph, live_logits, grads_so_far, grads_made), seq)
    out: dict[str, dict[str, int]] = {}
    for sub, (_, at) in best.items():
        comps = dict.fromkeys(COMPONENTS, 0)
        for i in range(n):
            if trk._born[i] <= at and (trk._died[i] == -1 or trk._died[i] > at):
                comps[cats[i]] += size[i]
        out[sub] = comps
    return out
