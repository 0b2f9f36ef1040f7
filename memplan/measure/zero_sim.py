"""One rank of DeepSpeed ZeRO on fake tensors: the real engine (``deepspeed.initialize``) under torch's fake process
group, with the four patches it needs there (each a check or a move that reads or owns data, none an allocation):

1. ``DeepSpeedEngine(dont_change_device=True)``: the engine's ``module.to(device)`` cannot swap fake parameters
   (torch ``nn.Module._apply`` uses ``swap_tensors``, "Cannot swap t1 because it has weakref associated with it");
   the module is already on the CPU accelerator;
2. ``is_invalid_grad_norm`` -> False and 3. ZeRO-1/2 ``has_overflow`` -> False: both read a value (``.item()``);
4. ZeRO-3's ``assert_ints_same_as_other_ranks`` -> no-op: compares the trace across ranks with ``.item()``.

DeepSpeed runs with ``DS_ACCELERATOR=cpu`` and the Trainer's ``auto`` bucket values (memplan.plan.zero_memory).
The step is DeepSpeed's: ``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``. Checked against real
gloo processes by benchmarks/zero_gloo.py (its ``--fake`` mode: the same state to a few bytes).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["deepspeed_patches", "ds_config", "zero_engine", "EngineStep"]


def ds_config(spec, setup) -> dict:
    """The DeepSpeed config the HF Trainer writes for this setup (``auto`` values filled as it fills them)."""
    from memplan.plan.zero_memory import persistence_threshold, prefetch_bucket_values, reduce_bucket_values

    zero = {"stage": int(setup.strategy[-1]), "reduce_bucket_size": reduce_bucket_values(spec)}
    if zero["stage"] == 3:
        zero.update(stage3_prefetch_bucket_size=prefetch_bucket_values(spec),
                    stage3_param_persistence_threshold=persistence_threshold(spec))
    world = setup.gpus * setup.nodes
    cfg = {"train_micro_batch_size_per_gpu": setup.batch_size, "gradient_accumulation_steps": 1,
           "train_batch_size": setup.batch_size * world, "zero_optimization": zero,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if setup.dtype in ("bf16", "fp16"):
        cfg[setup.dtype] = {"enabled": True}
    return cfg


@contextlib.contextmanager
def deepspeed_patches(world: int):
    """The patches (module docstring), DeepSpeed's process group on top of the fake one, restored on exit."""
    import torch.nn.functional as F

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR",
                                                                                               "cpu")}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage12
    from deepspeed.runtime import engine as engine_module

    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    def forget_groups() -> None:  # DeepSpeed caches the process group it first saw; each simulation has its own
        ds_comm.cdb = None
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
            setattr(ds_groups, name, None)

    forget_groups()
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised (fake) default group
    init = engine_module.DeepSpeedEngine.__init__

    def patched_init(self, *args, **kwargs):
        kwargs["dont_change_device"] = True
        return init(self, *args, **kwargs)

    # (ZeRO-3 swaps torch.nn.functional.linear for its own and leaves it there: a later simulation in this
    # process would run DeepSpeed's linear)
    saved = [(F, "linear", F.linear), (engine_module.DeepSpeedEngine, "__init__", init),
             (stage12, "is_invalid_grad_norm", stage12.is_invalid_grad_norm),
             (stage3, "is_invalid_grad_norm", stage3.is_invalid_grad_norm),
             (stage12.DeepSpeedZeroOptimizer, "has_overflow", stage12.DeepSpeedZeroOptimizer.has_overflow),
             (coordinator, "assert_ints_same_as_other_ranks", coordinator.assert_ints_same_as_other_ranks)]
    engine_module.DeepSpeedEngine.__init__ = patched_init
    stage12.is_invalid_grad_norm = stage3.is_invalid_grad_norm = lambda norm: False
    stage12.DeepSpeedZeroOptimizer.has_overflow = lambda self, partition_gradients=True: False
    coordinator.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        forget_groups()
        for owner, name, value in saved:
            setattr(owner, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class EngineStep:
    """The optimizer ``memplan.measure.step.run_steps`` steps: DeepSpeed's ``engine.step`` (which zeroes the
    gradients itself)."""

    def __init__(self, engine):
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def zero_engine(model, optimizer, spec, setup):
    """``deepspeed.initialize`` on the (fake) model and client optimizer: (engine, step object)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(spec, setup))
    return engine, EngineStep(engine)
