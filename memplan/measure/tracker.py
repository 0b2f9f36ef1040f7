"""Exact tensor-level memory accounting: a ``TorchDispatchMode`` that follows every live tensor storage.

Every tensor an operator returns is looked at once: its ``UntypedStorage`` is recorded (size rounded up to
``round_to`` bytes) the first time it is seen, and a weak reference on the storage's Python object subtracts
the size again when the storage dies. torch keeps one Python object per storage for as long as any tensor
uses it (PyObject preservation), so "the storage object died" is "the memory was released". The sum of
what is alive is the tensor-level memory of the process at every moment, and its maximum is the peak.

The measure is exact and deterministic on real, fake (``FakeTensorMode``) and meta tensors alike: on real
CPU tensors it reproduces ``torch.distributed._tools.mem_tracker.MemTracker`` to the byte, and a fake-tensor
simulation of a training step gives the same bytes as the real run (tests/measure/test_simulate.py).
``round_to=512`` mimics the CUDA caching allocator, which hands out multiples of 512 bytes
(c10/cuda/CUDACachingAllocator.cpp, ``kMinBlockSize``). What no tensor shows (the CUDA context, cuBLAS
workspaces, reserved-but-unallocated blocks) is not here.

Storages that exist before tracking starts (weights, LoRA parameters, inputs) are invisible to the mode
until something registers them: ``register(tensor, category)`` adds them, once per storage.

Classification happens after the run, from an event log (size, creating phase and sequence number, grad
mode at creation, the creating tensor's last dimension, sequence number of release), so that the
breakdown at the peak is exact whatever happened later. A storage alive at the peak gets the first rule
that applies:

1. the category it was registered with (``weights``, ``quantized_weights``, ``quant_constants``,
   ``lora_params``; ``inputs`` is reported as ``activations``, the analytic model's home for ids/labels);
2. ``gradients``: it is (or was, at a phase end) the ``.grad`` of a parameter given to ``watch_gradients``;
3. ``optimizer_state``: a tensor in the ``state`` of an optimizer given to ``watch_optimizer``;
4. created in ``forward`` -- or in ``backward`` with grad mode on, which is gradient checkpointing
   recomputing a layer's forward -- : ``logits_loss`` if the tensor's last dimension is ``vocab_size``
   (logits, their fp32 copy, log-softmax), else ``activations``;
5. created in ``backward`` with a last dimension of ``vocab_size``: ``logits_loss`` (the gradients of the
   logits and log-softmax);
6. created in ``backward``, ``optimizer_step`` or ``zero_grad``: ``transients``;
7. created before the first phase, or in ``load``: ``weights`` (buffers, anything a loader made).

Time between two ``phase()`` blocks belongs to the block that ended (dropping the loss after backward,
fetching the next batch after zero_grad).

The peak is also placed on the analytic model's phase names (``memplan.plan.breakdown.PHASES``):
``forward`` -> ``forward_end``; ``optimizer_step`` -> ``optimizer_step``; inside ``backward``:
``backward_start`` while a logits-sized tensor created in this backward is alive (the loss gradient
flowing back through log-softmax and the lm_head), ``backward_end`` once every parameter gradient this
backward produces exists, ``backward`` in between.

Every number comes from replaying the log (``result``), so ``exclude`` can take a storage out afterwards (what a
GPU run keeps on the host: torch optimizers' ``step`` counters). ``tagged`` names the category of what a block
allocates, and ``resized`` follows an in-place ``UntypedStorage.resize_`` (FSDP2: memplan.measure.dist_sim).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from memplan.plan.breakdown import COMPONENTS, PHASES  # pure Python (the planning side never imports this module)

from .track_result import TrackResult

__all__ = ["MemoryTracker", "TrackResult", "CATEGORIES", "STEP_PHASES"]

# The analytic model's component names; cuda_context and allocator_overhead are always 0 in a tracker result.
CATEGORIES = COMPONENTS
_REGISTERABLE = ("inputs",) + tuple(c for c in COMPONENTS if c not in ("cuda_context", "allocator_overhead"))
STEP_PHASES = ("load", "forward", "backward", "optimizer_step", "zero_grad")
_ESTIMATE_PHASES = PHASES
_LOAD = "load"  # the phase of everything outside a ``phase()`` block


class MemoryTracker(TorchDispatchMode):
    """Live tensor-storage accounting (see the module docstring for the rules; ``memplan.measure.recorder`` shows
    the usage: ``register`` what exists, ``watch_gradients`` / ``watch_optimizer``, then ``phase`` blocks)."""

    def __init__(self, *, round_to: int = 1, vocab_size: int | None = None):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.round_to = int(round_to)
        self.vocab_size = vocab_size
        # storage id -> record index, for storages alive now. Keyed by id(): the weakref callback removes
        # the entry when the storage dies, before CPython can reuse the id.
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        # The event log, one entry per storage ever seen (parallel lists are cheaper than objects). Every
        # birth, death and phase boundary takes the next sequence number.
        self._size: list[int] = []
        self._born: list[int] = []
        self._died: list[int] = []  # -1 while alive
        self._phase_idx: list[int] = []  # index into _phases of the creating phase
        self._grad_on: list[bool] = []
        self._lastdim: list[int] = []
        self._cat: dict[int, str] = {}  # record -> category assigned by register / watch scans
        self._excluded: set[int] = set()  # records that are not device memory (see exclude)
        self._seq = 0
        self._cur = 0
        self._peak = 0
        # phase log: [name, step, first seq]
        self._phases: list[list] = [[_LOAD, 0, 0]]
        self._step = 0
        self._params: list[torch.Tensor] = []
        self._optimizers: list = []
        self._exit_seq: int | None = None
        self._window_peak = 0
        self._tag: str | None = None  # the category of storages born inside ``tagged``

    # ------------------------------------------------------------------ recording

    def _record(self, st, lastdim: int) -> int:
        key = id(st)
        idx = self._live.get(key)
        if idx is not None:
            return idx
        n = st.nbytes()
        if self.round_to > 1:
            n = -(-n // self.round_to) * self.round_to
        idx = len(self._size)
        self._seq += 1
        self._size.append(n)
        self._born.append(self._seq)
        self._died.append(-1)
        self._phase_idx.append(len(self._phases) - 1)
        self._grad_on.append(torch.is_grad_enabled())
        self._lastdim.append(lastdim)
        self._live[key] = idx
        if self._tag is not None:
            self._cat[idx] = self._tag
        self._refs[key] = weakref.ref(st, lambda _r, key=key, idx=idx: self._release(key, idx))
        self._cur += n
        if self._cur > self._peak:
            self._peak = self._cur
        if self._cur > self._window_peak:
            self._window_peak = self._cur
        return idx

    def _release(self, key: int, idx: int) -> None:
        if self._live.get(key) == idx:
            del self._live[key]
            self._refs.pop(key, None)
        self._seq += 1
        self._died[idx] = self._seq
        self._cur -= self._size[idx]

    def _see(self, t) -> None:
        t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP2's sharded parameters): this rank's shard
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors have no plain storage
            return
        self._record(st, t.shape[-1] if t.dim() else 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._see(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._see(o)
                elif o is not None and not isinstance(o, (int, float, bool)):
                    tree_map_only(torch.Tensor, self._see, o)
        return out

    def __exit__(self, *exc):
        self._scan()
        self._exit_seq = self._seq
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ public API

    def register(self, tensor, category: str) -> None:
        """Count a storage that already exists (weights, adapters, inputs) under ``category``.

        Idempotent per storage: a tied weight registered twice counts once. Registering a storage the
        tracker has already seen only sets its category (if it has none yet).
        """
        if category not in _REGISTERABLE:
            raise ValueError(f"unknown category {category!r}; allowed: {', '.join(_REGISTERABLE)}")
        if isinstance(tensor, torch.Tensor):
            self._mark(tensor, category)

    @contextmanager
    def tagged(self, category: str):
        """Storages born inside the block count as ``category`` (``comm_buffers``: an engine's collectives)."""
        self._tag = category
        try:
            yield self
        finally:
            self._tag = None

    def resized(self, tensor) -> None:
        """``tensor``'s storage was just resized in place (no operator shows it): the old size dies, the new lives."""
        st = tensor.untyped_storage()
        idx = self._live.get(id(st))
        if idx is not None:
            self._release(id(st), idx)
        if st.nbytes():
            self._record(st, tensor.shape[-1] if tensor.dim() else 0)

    def exclude(self, tensor) -> None:
        """Leave a storage out of every number, retroactively: it would not be device memory on the device
        being modelled (torch optimizers keep their ``step`` counters on the host unless fused/capturable)."""
        idx = self._live.get(id(tensor.untyped_storage()))
        if idx is not None:
            self._excluded.add(idx)

    def watch_gradients(self, params: Iterable) -> None:
        """Classify the ``.grad`` storages of ``params`` as ``gradients`` (checked at every phase end)."""
        self._params.extend(p for p in params if isinstance(p, torch.Tensor))

    def watch_optimizer(self, optimizer) -> None:
        """Classify the tensors in ``optimizer.state`` as ``optimizer_state`` (checked at every phase end).

        A state tensor the tracker has not seen (made before tracking, like bitsandbytes' shared quantile
        maps) is registered when found.
        """
        self._optimizers.append(optimizer)

    @contextmanager
    def phase(self, name: str):
        """Attribute everything from here to the next ``phase`` to ``name`` (the time between two blocks stays
        with the block that ended; before the first block it is ``load``). Entering ``forward`` starts a step."""
        if name not in STEP_PHASES:
            raise ValueError(f"unknown phase {name!r}; allowed: {', '.join(STEP_PHASES)}")
        if name == "forward":
            self._step += 1
        self._seq += 1
        self._phases.append([name, self._step, self._seq])
        try:
            yield self
        finally:
            # what happens between two phases (dropping the loss, fetching the next batch) stays with the
            # phase that just ended
            self._scan()

    @property
    def current_bytes(self) -> int:
        """Alive now (excluded storages included: ``exclude`` applies to ``result`` only)."""
        return self._cur

    def start_window(self) -> None:
        """Start a new window for ``window_peak_bytes`` (the recorder opens one per phase instance)."""
        self._window_peak = self._cur

    @property
    def window_peak_bytes(self) -> int:
        """The highest level since ``start_window`` (as ``current_bytes``: before exclusions)."""
        return self._window_peak

    @property
    def peak_bytes(self) -> int:
        """The running peak so far (as ``current_bytes``: before exclusions; ``result()`` is exact)."""
        return self._peak

    def _scan(self) -> None:
        """Mark live gradients and optimizer state (cheap: a few hundred tensors at most)."""
        for p in self._params:
            g = p.grad
            if g is not None:
                self._mark(g, "gradients")
        for opt in self._optimizers:
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        self._mark(v, "optimizer_state")

    def _mark(self, t, category: str) -> None:
        t = getattr(t, "_local_tensor", t)  # a DTensor: this rank's shard
        idx = self._record(t.untyped_storage(), t.shape[-1] if t.dim() else 0)
        if self._cat.get(idx) == "comm_buffers" and category in ("gradients", "optimizer_state"):
            self._cat[idx] = category  # FSDP2's reduce-scatter output becomes the sharded gradient
        self._cat.setdefault(idx, category)

    # ------------------------------------------------------------------ results

    def _category(self, i: int) -> str:
        cat = self._cat.get(i)
        if cat is not None:
            return "activations" if cat == "inputs" else cat
        phase = self._phases[self._phase_idx[i]][0]
        if phase in ("forward", "backward") and self.vocab_size is not None and self._lastdim[i] == self.vocab_size:
            return "logits_loss"
        if phase == "forward" or (phase == "backward" and self._grad_on[i]):
            return "activations"
        return "weights" if phase == _LOAD else "transients"

    def categories(self) -> list[str]:
        """The category of every storage ever seen, in the order they were seen."""
        self._scan()
        return [self._category(i) for i in range(len(self._size))]

    def result(self) -> TrackResult:
        """Replay the event log: the peak, what was alive at it, per-phase and per-step peaks.

        Only events up to the end of tracking count (storages freed later, when the caller drops its
        references, do not change the result).
        """
        self._scan()
        end = self._exit_seq if self._exit_seq is not None else self._seq
        n = len(self._size)
        cats = [self._category(i) for i in range(n)]
        size = [0 if i in self._excluded else self._size[i] for i in range(n)]
        # events: +record at its birth, -record-1 at its death (both before `end`)
        events: list[tuple[int, int]] = []
        for i in range(n):
            if self._born[i] <= end:
                events.append((self._born[i], i))
                if self._died[i] != -1 and self._died[i] <= end:
                    events.append((self._died[i], -i - 1))
        events.sort()
        # per backward phase: how many gradients it produces (to spot backward_end)
        grads_made: dict[int, int] = {}
        for i in range(n):
            if cats[i] == "gradients":
                grads_made[self._phase_idx[i]] = grads_made.get(self._phase_idx[i], 0) + 1

        level = peak = 0
        peak_seq, peak_ph, peak_sub = 0, 0, ""
        phase_peaks: dict[str, int] = {}
        step_peaks: list[int] = []
        sub_peaks: dict[str, int] = {}
        sub_seqs: dict[str, int] = {}  # PHASES name -> the first moment it reached its highest level
        ph = 0
        live_bwd_logits = grads_so_far = 0

        def enter(p: int) -> None:
            nonlocal live_bwd_logits, grads_so_far
            name = self._phases[p][0]
            live_bwd_logits = grads_so_far = 0
            if name == "forward":
                step_peaks.append(level)
            phase_peaks[name] = max(phase_peaks.get(name, 0), level)
            sub = {"forward": "forward_end", "optimizer_step": "optimizer_step"}.get(name)
            if sub:
                if p and level > sub_peaks.get(sub, -1):
                    sub_seqs[sub] = seq - 1  # the moment before this phase's first event
                sub_peaks[sub] = max(sub_peaks.get(sub, 0), level)

        seq = 0
        enter(0)
        for seq, code in events:
            while ph + 1 < len(self._phases) and self._phases[ph + 1][2] <= seq:
                ph += 1
                enter(ph)
            born = code >= 0
            i = code if born else -code - 1
            level += size[i] if born else -size[i]
            if self._phase_idx[i] == ph and self._phases[ph][0] == "backward":
                if cats[i] == "logits_loss" and not self._grad_on[i]:
                    live_bwd_logits += 1 if born else -1
                elif cats[i] == "gradients" and born:
                    grads_so_far += 1
            if not born:
                continue
            name = self._phases[ph][0]
            if level > phase_peaks.get(name, -1):
                phase_peaks[name] = level
            if step_peaks and level > step_peaks[-1]:
                step_peaks[-1] = level
            sub = self._subphase(name, ph, live_bwd_logits, grads_so_far, grads_made)
            if sub and level > sub_peaks.get(sub, -1):
                sub_peaks[sub], sub_seqs[sub] = level, seq
            if level > peak:
                peak, peak_seq, peak_ph, peak_sub = level, seq, ph, sub

        def alive_at(at: int) -> dict[str, int]:
            comps = dict.fromkeys(CATEGORIES, 0)
            for i in range(n):
                if self._born[i] <= at and (self._died[i] == -1 or self._died[i] > at):
                    comps[cats[i]] += size[i]
            return comps

        comps = alive_at(peak_seq)
        final = sum(size[i] for i in range(n) if self._born[i] <= end and (self._died[i] == -1 or self._died[i] > end))
        return TrackResult(
            peak_bytes=peak, peak_phase=self._phases[peak_ph][0], peak_components=comps,
            phase_peaks=phase_peaks, final_bytes=final, step_peaks=step_peaks,
            peak_estimate_phase=peak_sub, estimate_phase_peaks={p: sub_peaks[p] for p in _ESTIMATE_PHASES
                                                                if p in sub_peaks},
            peak_step=self._phases[peak_ph][1],
            estimate_phase_components={p: alive_at(at) for p, at in sub_seqs.items()},
        )

    def _subphase(self, name: str, ph: int, live_bwd_logits: int, grads_so_far: int, grads_made: dict) -> str:
        """The analytic phase (memplan.estimate.PHASES) of a moment in tracker phase ``name``."""
        if name == "forward":
            return "forward_end"
        if name == "optimizer_step":
            return "optimizer_step"
        if name == "backward":
            if live_bwd_logits > 0:
                return "backward_start"
            total = grads_made.get(ph, 0)
            if total and grads_so_far >= total:
                return "backward_end"
            return "backward"
        return ""
