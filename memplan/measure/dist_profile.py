"""``memplan profile --gpus N``: real processes, one per rank, each writing its own run record.

Without a process group around it, ``memplan profile`` with several GPUs launches itself under torchrun
(``python -m torch.distributed.run --nproc_per_node N -m memplan profile ...``): gloo on CPU, NCCL on GPUs. Each
rank builds the model on its device, wraps it with the setup's engine (DDP, or FSDP2 ``fully_shard`` per decoder
layer: the same wrapping ``memplan simulate`` uses, memplan.measure.dist_sim) and records its run; the records
carry the rank and the launch in ``environment``, so ``memplan validate`` reads each. One node only: several
nodes are launched on each node by the user. FSDP1 and DeepSpeed are not wrapped here (benchmarks/zero_gloo.py
runs ZeRO for real).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid

from memplan.errors import InvalidSetupError

__all__ = ["launched", "launch_ranks", "rank_group", "wrap_rank", "ddp_wrap", "record_rank", "local_device",
           "check_profilable", "LAUNCH_ENV", "PROFILED_STRATEGIES"]

LAUNCH_ENV = "MEMPLAN_LAUNCH_ID"  # set by launch_ranks for its children; recorded in each record's environment
PROFILED_STRATEGIES = ("ddp", "fsdp2")


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process for several ranks, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def check_profilable(setup) -> None:
    if setup.nodes > 1:
        raise InvalidSetupError("profile launches the ranks of one node; for several nodes run `torchrun --nnodes "
                                f"{setup.nodes} -m memplan profile ...` on each node")
    if setup.strategy not in PROFILED_STRATEGIES:
        raise InvalidSetupError(f"profile runs {', '.join(PROFILED_STRATEGIES)} across ranks, not "
                                f"{setup.strategy}; benchmarks/zero_gloo.py runs DeepSpeed ZeRO for real")
    if setup.offload != "none":
        raise InvalidSetupError("profile does not offload to host memory yet; plan it with estimate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(setup, argv: list[str], out_dir: str | os.PathLike) -> list:
    """Run ``memplan profile argv`` under torchrun with the setup's GPUs per node and return the records the
    ranks wrote into ``out_dir`` (rank order). The children's output goes to stderr, prefixed by rank."""
    from .runs import list_runs

    check_profilable(setup)
    launch = uuid.uuid4().hex[:12]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(setup.gpus), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "memplan", "profile", *argv]
    env = dict(os.environ, **{LAUNCH_ENV: launch}, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, stdout=sys.stderr, env=env)
    records = [r for r in list_runs(out_dir) if (r.environment or {}).get("launch") == launch]
    if not records:
        raise InvalidSetupError(f"the {setup.gpus} ranks wrote no run record (torchrun exit {proc.returncode}); "
                                f"see the lines above")
    return sorted(records, key=lambda r: r.environment.get("rank", 0))


@contextlib.contextmanager
def rank_group(device: str):
    """The process group of a launched rank (gloo on CPU, NCCL on CUDA), destroyed on exit."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap_rank(model, spec, setup, device: str, tracker_ref: list):
    """FSDP2: the sharded model and the context that tracks it (call before registering the model). DDP: the
    model as it is (``ddp_wrap`` wraps it once tracking has started, so that its buckets are counted)."""
    if setup.strategy == "fsdp2":
        from .dist_sim import fsdp2_tracking, fully_shard_layers

        return (fully_shard_layers(model, spec, setup, "cuda" if device.startswith("cuda") else "cpu"),
                fsdp2_tracking(tracker_ref, setup))
    return model, contextlib.nullcontext()


def ddp_wrap(model, device: str, tracker=None):
    """DDP around a real rank's model. Its reducer allocates the gradient buckets in C++, out of the tracker's
    sight, so the all-reduce hook registers each bucket as ``comm_buffers`` the first time it runs (step 1's
    backward; the steady-state step 2 sees them throughout), then all-reduces as DDP's default does."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    if tracker is not None:
        def hook(state, bucket):
            tracker.register(bucket.buffer(), "comm_buffers")
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, hook)
    return wrapped


def record_rank(record) -> None:
    """Put the rank and the launch into the record's environment."""
    rank, world, local = launched()
    record.environment.update(rank=rank, world_size=world, local_rank=local, launch=os.environ.get(LAUNCH_ENV))


def local_device(device: str) -> str:
    if device != "cuda":
        return device
    return f"cuda:{launched()[2]}"

