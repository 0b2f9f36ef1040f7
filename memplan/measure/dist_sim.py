"""One rank of a data-parallel run on fake tensors: the real engine wraps the real model under torch's fake process
group, and the recorder tracks rank 0 (the ranks are symmetric: each holds its shard and runs its own batch).

- ``ddp``: torch ``DistributedDataParallel`` as the Trainer builds it (25 MiB buckets, the first one 1 MiB,
  ``gradient_as_bucket_view=False``), less the re-bucketing before step 2 (``_KeepBuckets``). The fake group's
  all-reduce completes with no tensor, which DDP's reducer rejects, so a comm hook returns the bucket itself:
  what NCCL's in-place all-reduce leaves. The check that every rank has the same parameter shapes reads data
  and is skipped (one process, nothing to compare).
- ``fsdp2``: ``fully_shard`` on every decoder layer, then on the root, as accelerate (``fsdp_version: 2``,
  transformer auto-wrap) and torchtune do; ``grad-op`` is ``reshard_after_forward=False`` and ``hybrid`` a 2-D
  (nodes, GPUs per node) mesh. FSDP2 frees and re-allocates the gathered parameters with
  ``UntypedStorage.resize_``, which no operator shows: the two helpers that do it tell the tracker.

``zero1/2/3``: DeepSpeed's engine (memplan.measure.zero_sim), with deepspeed installed (the ``deepspeed`` extra).

What cannot run here, and why (``simulable``):

- ``fsdp`` (FSDP1): ``FullyShardedDataParallel`` refuses a CPU module ("FSDP needs a non-CPU accelerator
  device", torch/distributed/fsdp/_init_utils.py ``_init_device_handle``), and fake CUDA tensors cannot run a
  backward pass without a GPU (docs/memory-model.md, "How simulate builds a model").
- ``offload`` (FSDP or DeepSpeed): the CPU simulation's device is the host, so the copies between the two are
  no-ops and what lives where cannot be told apart.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from memplan.errors import InvalidSetupError

if TYPE_CHECKING:
    from memplan.plan.setup import TrainSetup

    from .tracker import MemoryTracker

__all__ = ["simulable", "fake_world", "wrap_model", "fully_shard_layers", "fsdp2_tracking"]

def simulable(setup: TrainSetup) -> None:
    """Raise ``InvalidSetupError`` naming why ``memplan simulate`` cannot run this rank (module docstring)."""
    if setup.strategy == "fsdp":
        raise InvalidSetupError("simulate cannot run FSDP1: FullyShardedDataParallel refuses a CPU module and fake "
                                "CUDA tensors cannot run backward without a GPU; simulate --strategy fsdp2 (the same "
                                "sharding with per-parameter shards), or profile on GPUs")
    if setup.offload != "none":
        raise InvalidSetupError(f"simulate cannot run --offload {setup.offload}: on a CPU simulation the device is "
                                f"the host, so what the engine keeps in host memory cannot be told apart")
    if setup.strategy in ("zero1", "zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise InvalidSetupError(f"simulate runs DeepSpeed {setup.strategy} with deepspeed installed: pip install "
                                    f"'memplan[deepspeed]'")


def world_size(setup: TrainSetup) -> int:
    return setup.gpus * setup.nodes


@contextlib.contextmanager
def fake_world(setup: TrainSetup):
    """torch's fake process group of the setup's world size, this process as rank 0 (nothing when one GPU)."""
    if setup.strategy in (None, "single"):
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise InvalidSetupError("a torch.distributed process group is already initialised in this process; "
                                "simulate a multi-GPU setup in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size(setup))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _decoder_layers(model, spec) -> list[torch.nn.Module]:
    """The decoder layers (the FSDP units of a transformer auto-wrap policy)."""
    suffix = spec.layer_prefix
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
            return list(module)
    raise InvalidSetupError(f"cannot find {spec.name}'s decoder layers ({suffix}) to shard")


def wrap_model(model, spec, setup: TrainSetup, tracker_ref: list):
    """The model wrapped by the setup's engine, and the context that routes the engine's allocations to the
    tracker (``tracker_ref[0]`` once the recorder exists). Call inside the model's fake mode."""
    if setup.strategy == "ddp":
        return _ddp(model), contextlib.nullcontext()
    if setup.strategy == "fsdp2":
        return fully_shard_layers(model, spec, setup), fsdp2_tracking(tracker_ref, setup)
    return model, contextlib.nullcontext()


def _ddp(model):
    import torch.nn.parallel.distributed as ddp_module

    # one process has nothing to compare shapes with, and the check reads tensor data
    verify = ddp_module._verify_param_shape_across_processes
    ddp_module._verify_param_shape_across_processes = lambda *a, **k: None
    try:
        wrapped = ddp_module.DistributedDataParallel(model, init_sync=False)
    finally:
        ddp_module._verify_param_shape_across_processes = verify

    def allreduce_in_place(_state, bucket):  # what NCCL's in-place all-reduce leaves: the bucket itself
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    wrapped.register_comm_hook(None, allreduce_in_place)
    wrapped.reducer = _KeepBuckets(wrapped.reducer)
    return wrapped


class _KeepBuckets:
    """DDP's reducer, less the one re-bucketing before the second forward: it broadcasts the bucket order, which
    reads tensor data. The buckets keep their sizes (only the order of parameters in them changes); a real run
    allocates the new buckets before freeing the old ones, once, at the start of step 2's forward."""

    def __init__(self, reducer):
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._reducer, name)


def fully_shard_layers(model, spec, setup: TrainSetup, device_type: str = "cpu"):
    """``fully_shard`` on every decoder layer, then the root, on a mesh of the setup's ranks (``device_type``:
    "cpu" for the fake group and gloo, "cuda" for NCCL)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh holds real rank numbers
        if setup.fsdp_sharding == "hybrid":
            mesh = init_device_mesh(device_type, (setup.nodes, setup.gpus), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device_type, (world_size(setup),))
    reshard = setup.fsdp_sharding != "grad-op"
    for layer in _decoder_layers(model, spec):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


@contextlib.contextmanager
def _quant_state_from_module():
    """FSDP+QLoRA: the gathered 4-bit weight is a plain parameter, and bitsandbytes' Linear4bit gives it back its
    quantization state from the module (``fix_4bit_weight_quant_state_from_module``) by wrapping the same storage
    in a new Params4bit, which a fake tensor cannot be. Setting the state on the parameter itself allocates what
    that wrapper does: nothing."""
    from bitsandbytes.nn import modules

    original = modules.fix_4bit_weight_quant_state_from_module

    def fix(module):
        if getattr(module.weight, "quant_state", None) is None:
            module.weight.quant_state = module.quant_state

    modules.fix_4bit_weight_quant_state_from_module = fix
    try:
        yield
    finally:
        modules.fix_4bit_weight_quant_state_from_module = original


def fsdp2_tracking(tracker_ref: list, setup: TrainSetup) -> contextlib.ExitStack:
    """What a tracked FSDP2 rank needs: its storage resizes told to the tracker, its buffers tagged, and (4-bit)
    the gathered weights' quantization state."""
    stack = contextlib.ExitStack()
    stack.enter_context(_fsdp2_tracking(tracker_ref))
    if setup.bits == 4:
        stack.enter_context(_quant_state_from_module())
    return stack


@contextlib.contextmanager
def _fsdp2_tracking(tracker_ref: list):
    """Tell the tracker about FSDP2's in-place storage resizes, and count what its parameter groups allocate to
    gather parameters and reduce gradients as ``comm_buffers``."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    def tracked(resize):
        def wrapper(tensor):
            resize(tensor)
            if tracker_ref and tracker_ref[0] is not None:
                tracker_ref[0].resized(tensor)
        return wrapper

    def tagging(method):
        def wrapper(self, *args, **kwargs):
            trk: MemoryTracker | None = tracker_ref[0] if tracker_ref else None
            with trk.tagged("comm_buffers") if trk is not None else contextlib.nullcontext():
                return method(self, *args, **kwargs)
        return wrapper

    saved = [(_fsdp_param, "alloc_storage"), (_fsdp_param, "free_storage"), (_fsdp_param_group, "alloc_storage")]
    methods = ("unshard", "wait_for_unshard", "post_backward")
    originals = [getattr(m, n) for m, n in saved]
    original_methods = [getattr(_fsdp_param_group.FSDPParamGroup, n) for n in methods]
    try:
        for (m, n), f in zip(saved, originals):
            setattr(m, n, tracked(f))
        for n, f in zip(methods, original_methods):
            setattr(_fsdp_param_group.FSDPParamGroup, n, tagging(f))
        yield
    finally:
        for (m, n), f in zip(saved, originals):
            setattr(m, n, f)
        for n, f in zip(methods, original_methods):
            setattr(_fsdp_param_group.FSDPParamGroup, n, f)
