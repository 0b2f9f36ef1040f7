"""Activation offloading in ``memplan simulate`` (``--activation-offload``; the analytic side is
``memplan.plan.offload``).

The same pack/unpack rules as the real thing, through ``torch.autograd.graph.saved_tensors_hooks``, on the fake
tensors of the simulation. A packed copy is a new storage that the tracker is told to leave out
(``MemoryTracker.exclude``): it is host memory. Unpacking makes the device copy back, which the tracker counts.

- ``pinned``: TRL's ``OffloadActivations`` with ``get_act_offloading_ctx_manager``'s defaults (trl 1.16.0
  models/activation_offloading.py: ``use_pin_memory=True, use_streams=True, min_offload_size=1024,
  max_fwd_stash_size=5``), entered by ``SFTTrainer.training_step`` around forward, loss and backward. Not offloaded:
  tensors under 1,024 bytes, parameters and views of their storages, a storage already offloaded (or kept) in this
  forward while its key is tracked (kept on the device, and its key now stays tracked until its unpack), and
  everything saved inside the lm_head (a ``NoOpManager`` entered by forward hooks on it). Non-contiguous tensors
  and views at an offset are cloned first; a broadcast tensor (a 0 stride) copies its storage. With streams the
  last 5 packed ids' device tensors stay in ``fwd_stash`` (evicted when a later tensor is offloaded) and are used
  as they are if unpacked before being evicted; the first backward node's post hook empties the stash. Brought-back
  tensors stay in ``bwd_tensor_stash`` until the post hook of the next node that unpacks something (or the end of
  backward), unless more references to their storage appeared (``record_stream``, then they live as long as those).
- ``pageable``: ``torch.autograd.graph.save_on_cpu(pin_memory=False)`` (torch 2.13 autograd/graph.py): every saved
  tensor, parameters included, is copied to the host (``tensor.cpu()``) and copied back at each unpack.

Non-reentrant gradient checkpointing (transformers 5's default) packs a checkpointed layer's saved tensors with its
own hooks, which are innermost and so win: offloading then only sees what is saved outside the layers.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

__all__ = ["offload_hooks", "HostBytes", "TRL_MIN_OFFLOAD_BYTES", "TRL_MAX_FWD_STASH"]

TRL_MIN_OFFLOAD_BYTES = 1024  # trl 1.16.0 OffloadActivations(min_offload_size=1024)
TRL_MAX_FWD_STASH = 5  # trl 1.16.0 OffloadActivations(max_fwd_stash_size=5)


class HostBytes:
    """The host bytes the packed copies hold: now and at most (tensor bytes, before any allocator rounding)."""

    def __init__(self):
        self.now = self.peak = 0

    def add(self, host: torch.Tensor) -> None:
        n = host.untyped_storage().nbytes()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(host.untyped_storage(), self._sub, n)

    def _sub(self, n: int) -> None:
        self.now -= n


def _host_copy(keep, t: torch.Tensor, *, storage: bool = False) -> torch.Tensor:
    if storage:  # the raw storage of a broadcast tensor
        n = t.untyped_storage().nbytes() // t.element_size()
        host = torch.empty(n, dtype=t.dtype, device=t.device)
        host.copy_(torch.as_strided(t, (n,), (1,), 0))
    else:
        host = torch.empty(t.size(), dtype=t.dtype, device=t.device)
        host.copy_(t)
    keep(host)  # host memory: left out of the device numbers, counted in HostBytes
    return host


def _device_copy(host: torch.Tensor) -> torch.Tensor:
    dev = torch.empty_like(host)
    dev.copy_(host)
    return dev


def _use_count(t: torch.Tensor) -> int | None:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return None


class _TrlOffload:
    """trl 1.16.0 ``OffloadActivations`` (use_streams=True) + ``get_act_offloading_ctx_manager``'s lm_head opt-out."""

    def __init__(self, model, keep):
        self.keep = keep
        self.param_storages = {id(p.untyped_storage()) for p in model.parameters()}
        self.saved: dict[int, tuple] = {}  # id -> (tensor, modified, stride, offset, shape)
        self.key_to_id: dict[tuple, int] = {}
        self.id_to_key: dict[int, tuple] = {}
        self.fwd_stash: dict[int, torch.Tensor] = {}
        self.bwd_stash: dict[int, torch.Tensor] = {}
        self.next_id = 0
        self.first_forward_call = True
        self.first_backward_call = True
        self.curr_node = None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.handles = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # SFTTrainer enters the context per training_step; the step starts with the input embedding
        self.handles.append(base.get_input_embeddings().register_forward_pre_hook(self.enter))
        head = getattr(base, "lm_head", None) or base.get_output_embeddings()
        if head is not None:
            noop = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
            self.handles.append(head.register_forward_pre_hook(lambda *a: noop.__enter__()))
            self.handles.append(head.register_forward_hook(lambda *a: noop.__exit__(None, None, None),
                                                           always_call=True))

    def _track(self, key, tid):
        self.key_to_id[key] = tid
        self.id_to_key[tid] = key

    def _release(self, tid):
        key = self.id_to_key.pop(tid, None)
        if key is not None and self.key_to_id.get(key) == tid:
            del self.key_to_id[key]

    def enter(self, *_args) -> None:
        """``OffloadActivations.__enter__`` at the start of each training step: what the last step left is dropped."""
        self.saved.clear()
        self.key_to_id.clear()
        self.id_to_key.clear()
        self.fwd_stash.clear()
        self.bwd_stash.clear()
        self.next_id = 0
        self.first_forward_call = self.first_backward_call = True

    def pack(self, t: torch.Tensor):
        if self.first_forward_call:
            self.key_to_id.clear()
            self.id_to_key.clear()
            self.first_forward_call, self.first_backward_call = False, True
        self.next_id += 1
        tid = self.next_id
        st = t.untyped_storage()
        key = (id(st), t.storage_offset(), t.dtype)  # trl: (data_ptr + storage_offset, dtype)
        if key in self.key_to_id:
            self.saved[tid] = (t, False, None, None, None)
            self._track(key, tid)
            return tid
        if (t.element_size() * t.nelement() < TRL_MIN_OFFLOAD_BYTES or isinstance(t, torch.nn.Parameter)
                or id(st) in self.param_storages):
            self.saved[tid] = (t, False, None, None, None)
            return tid
        broadcast = 0 in t.stride()
        if not broadcast and (not t.is_contiguous() or t.storage_offset() != 0):
            t = t.clone(memory_format=torch.contiguous_format)
        for old in list(self.fwd_stash):
            if old <= tid - TRL_MAX_FWD_STASH:
                del self.fwd_stash[old]
                self._release(old)
            else:
                break
        stride, offset, shape = t.stride(), t.storage_offset(), t.size()
        host = _host_copy(self.keep, t, storage=broadcast)
        self.saved[tid] = (host, True, stride, offset, shape)
        self.fwd_stash[tid] = t
        self._track(key, tid)
        return tid

    def unpack(self, tid: int) -> torch.Tensor:
        if self.first_backward_call:
            torch.autograd.variable.Variable._execution_engine.queue_callback(self.bwd_stash.clear)
            self.first_backward_call = False
        tensor, modified, stride, offset, shape = self.saved[tid]
        if modified:
            node = torch._C._current_autograd_node()
            prev_ids = []
            if self.curr_node is not node:
                self.curr_node = node
                prev_ids = list(self.bwd_stash)
            back = False
            if tid in self.fwd_stash:
                tensor = self.fwd_stash[tid]
            else:
                tensor = torch.as_strided(_device_copy(tensor), shape, stride, offset)
                self.bwd_stash[tid] = tensor
                back = True
                count = _use_count(tensor)

            def hook(_grad_inputs, _grad_outputs):
                if back and tid in self.bwd_stash:
                    now = _use_count(self.bwd_stash[tid])
                    if count is not None and now is not None and now > count:
                        del self.bwd_stash[tid]  # record_stream: it lives as long as its other references
                for old in list(self.fwd_stash):
                    del self.fwd_stash[old]
                    self._release(old)
                for old in prev_ids:
                    self.bwd_stash.pop(old, None)

            if node is not None:
                node.register_hook(hook)
        del self.saved[tid]
        self._release(tid)
        if not self.saved:
            self.first_forward_call = True
        return tensor

    def close(self):
        for h in self.handles:
            h.remove()


def _save_on_cpu(keep):
    """torch 2.13 ``save_on_cpu(pin_memory=False)``: every saved tensor to the host, back at every unpack."""

    def pack(t):
        return _host_copy(keep, t)

    def unpack(host):
        return _device_copy(host)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@contextlib.contextmanager
def offload_hooks(model, tracker, mode: str | None):
    """The saved-tensor hooks of ``mode`` (``pinned``, ``pageable``; ``off``/None: none) for the whole step; yields
    the ``HostBytes`` of the packed copies."""
    host = HostBytes()

    def keep(t):
        tracker.exclude(t)
        host.add(t)

    if mode in (None, "off"):
        yield host
        return
    if mode == "pageable":
        with _save_on_cpu(keep):
            yield host
        return
    trl = _TrlOffload(model, keep)
    try:
        with trl.hooks:
            yield host
    finally:
        trl.close()
