"""One DeepSpeed ZeRO training step per rank, measured at the tensor level with memplan's MemoryTracker.

    torchrun --nproc_per_node 2 benchmarks/zero_gloo_worker.py --stage 2 --method lora --dtype fp32 --offload none

Real processes on CPU: DS_ACCELERATOR=cpu, gloo. A tiny random LlamaForCausalLM (hidden 256, intermediate 688,
2 layers, vocab 1000, 4 heads, 2 kv heads), peft LoRA r=8 on q_proj,v_proj or full fine-tuning, AdamW.
Step 1 runs untracked (optimizer state, ZeRO-3 trace); before step 2 every live tensor storage is registered
with the tracker (found through the engine, the ZeRO optimizer's attributes and gc), then step 2 is tracked:
forward (engine(...)), backward (engine.backward), optimizer_step (engine.step).

Prints one JSON line per rank: the tracker result (peak_bytes, peak_phase, peak_components, phase_peaks, ...)
plus ``peak_buffers`` (every storage alive at the peak, grouped by a label: the attribute path that holds it
for persistent buffers, else creating op/phase/shape/dtype) and ``persistent`` (the labelled storages alive
before step 2, with bytes), and the effective ZeRO config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository

import torch  # noqa: E402

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from memplan.measure.tracker import MemoryTracker  # noqa: E402


class LabelTracker(MemoryTracker):
    """MemoryTracker that also remembers, per storage record, the creating op, shape and dtype."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._func = "?"
        self._meta: dict[int, str] = {}
        self._shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _see(self, t) -> None:
        if t.device.type == "meta":  # no memory (DeepSpeed keeps meta shape records)
            return
        self._shape = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
        super()._see(t)

    def _record(self, st, lastdim):
        n0 = len(self._size)
        idx = super()._record(st, lastdim)
        if len(self._size) > n0:
            shape, dt = self._shape if self._shape else ((), "?")
            self._meta[idx] = f"{self._phases[-1][0]}:{self._func}:{dt}{list(shape)}@{_site()}"
        return idx

    def idx_of(self, t):
        return self._live.get(id(t.untyped_storage()))


_SITE_KEYS = ("/deepspeed/", "/peft/", "/transformers/")


def _site():
    """file:line function of the innermost DeepSpeed (else peft/transformers) frame that made a storage."""
    f = sys._getframe(3)
    while f is not None:
        fn = f.f_code.co_filename
        if (("/deepspeed/" in fn and "/utils/nvtx.py" not in fn and "/comm/" not in fn
             and not fn.endswith("runtime/engine.py")) or "/peft/" in fn or "/transformers/" in fn):
            return f"{fn.split('/site-packages/')[-1]}:{f.f_lineno}:{f.f_code.co_name}"
        f = f.f_back
    return "?"


def walk(obj, prefix, out, depth=4, seen=None):
    """Collect (label, tensor) for every tensor reachable from obj through DeepSpeed objects, lists, dicts."""
    if seen is None:
        seen = set()
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return
        out.append((prefix, obj))
        if obj.grad is not None:
            out.append((prefix + ".grad", obj.grad))
        if hasattr(obj, "ds_tensor") and obj.ds_tensor is not None:
            walk(obj.ds_tensor, prefix + ".ds_tensor", out, depth, seen)
        return
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            walk(x, f"{prefix}[{i}]" if len(obj) < 3 else f"{prefix}[*]", out, depth - 1, seen)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            kk = k if isinstance(k, (int, str)) else "*"
            walk(v, f"{prefix}[{kk}]" if isinstance(kk, str) and len(obj) < 20 else f"{prefix}[*]", out,
                 depth - 1, seen)
        return
    mod = type(obj).__module__ or ""
    if (mod.startswith("deepspeed") or mod.startswith("torch.optim")) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if k in ("module", "client_model", "model", "_modules", "dp_process_group", "timers"):
                continue
            k = k.replace("_DeepSpeedZeroOptimizer_Stage3__", "__").replace("_PartitionedParameterCoordinator__", "__")
            walk(v, f"{prefix}.{k}", out, depth - 1, seen)


def labelled_tensors(engine):
    out = []
    seen = set()
    zopt = engine.optimizer
    # well-known buffers first, so that they get their own name rather than an alias path
    for k in ("single_partition_of_fp32_groups", "bit16_groups_flat", "parallel_partitioned_bit16_groups",
              "averaged_gradients", "grads_in_partition", "ipg_buckets", "fp32_partitioned_groups_flat",
              "fp16_partitioned_groups_flat", "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer",
              "grad_partitions_flat_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
              "param_buffer_of_bit16_for_cpu_offload_groups", "temp_grad_buffer_for_cpu_offload",
              "temp_grad_buffer_for_gpu_offload", "accumulated_grads_in_cpu"):
        if hasattr(zopt, k):
            walk(getattr(zopt, k), "zopt." + k.replace("_DeepSpeedZeroOptimizer_Stage3__", "__"), out, 4, seen)
    for n, p in engine.module.named_parameters():
        walk(p, f"param:{n}", out, 1, seen)
    for n, b in engine.module.named_buffers():
        walk(b, f"buffer:{n}", out, 1, seen)
    walk(zopt, "zopt", out, 5, seen)
    base = getattr(zopt, "optimizer", None)
    if base is not None:
        walk(base.state, "base_opt.state", out, 3, seen)
    return out


def category_for(label, t, method):
    if "bit16_groups_flat" in label or "fp16_partitioned_groups_flat" in label or "parallel_partitioned_bit16" in label:
        return "lora_params" if method == "lora" else "weights"
    if label.startswith("param:"):
        if label.endswith(".grad"):
            return "gradients"
        if "lora_" in label and method == "lora":
            return "lora_params"
        return "weights"
    if label.startswith("buffer:"):
        return "weights"
    if "state" in label and "base_opt" in label:
        return "optimizer_state"
    if label.endswith(".grad") or "grad" in label.lower() or "ipg" in label.lower():
        return "gradients"
    if "fp32" in label or "single_partition" in label:
        return "optimizer_state"  # fp32 master partitions
    return "weights"


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, vocab_size=1000,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)

    def make():
        model = LlamaForCausalLM(cfg)
        model.config.use_cache = False
        if args.method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        return model

    if not args.fake:
        return cfg, make()
    # as memplan's build: meta first (peft moves adapters with .to(), which cannot swap fake parameters),
    # then to_empty under the (active) fake mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    return cfg, model


def ds_config(args, world):
    z = {"stage": args.stage}
    if args.offload in ("optimizer", "both"):
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": args.pin}
    if args.offload in ("params", "both"):
        z["offload_param"] = {"device": "cpu", "pin_memory": args.pin}
    if args.hf_auto:  # what HF Trainer's "auto" fills in (transformers/integrations/deepspeed.py)
        h = 256
        z["reduce_bucket_size"] = h * h
        if args.stage == 3:
            z["stage3_prefetch_bucket_size"] = int(0.9 * h * h)
            z["stage3_param_persistence_threshold"] = 10 * h
    z.update(json.loads(args.zero_extra))
    c = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
         "train_batch_size": args.batch * world, "zero_optimization": z,
         "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if args.clip:
        c["gradient_clipping"] = args.clip
    if args.dtype == "bf16":
        c["bf16"] = {"enabled": True}
    if args.optim == "torch" and args.offload != "none":
        c["zero_force_ds_cpu_optimizer"] = False
    c.update(json.loads(args.extra))
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--offload", choices=["none", "optimizer", "params", "both"], default="none")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--world", type=int, default=None, help="expected world size (checked)")
    ap.add_argument("--optim", choices=["auto", "torch", "dscpu"], default="auto",
                    help="auto: torch.optim.AdamW, DeepSpeedCPUAdam when offloading the optimizer")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--hf-auto", action="store_true", help="HF Trainer 'auto' bucket/persistence values")
    ap.add_argument("--zero-extra", default="{}", help="JSON merged into zero_optimization")
    ap.add_argument("--extra", default="{}", help="JSON merged into the top-level config")
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--full-list", action="store_true", help="list every storage alive at the peak")
    ap.add_argument("--fake", action="store_true",
                    help="one process on fake tensors + torch's fake process group, as rank --rank of --world")
    ap.add_argument("--rank", type=int, default=0, help="(--fake) the rank to simulate")
    args = ap.parse_args()

    if args.fake:

        fake_mode = setup_fake(args)
        with fake_mode:
            return run(args)
    deepspeed.init_distributed(dist_backend="gloo")
    return run(args)


def setup_fake(args):
    """Fake process group + FakeTensorMode, and the patches DeepSpeed needs there (see README)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = args.world or 2
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(world), LOCAL_RANK=str(args.rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
    dist.init_process_group("fake", rank=args.rank, world_size=world, store=FakeStore())
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised (fake) default group
    from deepspeed.runtime import engine as E
    import deepspeed.runtime.zero.stage_1_and_2 as S12
    import deepspeed.runtime.zero.stage3 as S3
    import deepspeed.runtime.zero.partitioned_param_coordinator as PPC

    # 1. engine.py _configure_distributed_model: module.to(device) swaps fake params -> "Cannot swap t1 because it
    #    has weakref associated with it" (torch nn.Module._apply); the module is already on the CPU "accelerator".
    _init = E.DeepSpeedEngine.__init__

    def init(self, *a, **k):
        k["dont_change_device"] = True
        return _init(self, *a, **k)

    E.DeepSpeedEngine.__init__ = init
    # 2. step(): bool(norm is inf/nan) reads data (aten._local_scalar_dense)
    S12.is_invalid_grad_norm = S3.is_invalid_grad_norm = lambda norm: False
    # 3. ZeRO-1/2 has_overflow (bf16/fp16 with check_grad_overflow): overflow_gpu[0].item()
    S12.DeepSpeedZeroOptimizer.has_overflow = lambda self, partition_gradients=True: False
    # 4. ZeRO-3 trace check across ranks: tensor.item() of gathered ds_ids
    PPC.assert_ints_same_as_other_ranks = lambda ints: None
    return FakeTensorMode(allow_non_fake_inputs=True)


def run(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.world is not None and args.world != world:
        raise SystemExit(f"--world {args.world} but WORLD_SIZE={world}")
    optim = args.optim
    if optim == "auto":
        optim = "dscpu" if args.offload in ("optimizer", "both") else "torch"
    args.optim = optim

    cfg, model = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "torch":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=1e-4, weight_decay=0.0, adamw_mode=True)
    t0 = time.time()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args, world))
    t_init = time.time() - t0

    g = torch.Generator().manual_seed(1 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g) for _ in range(2)]

    def one_step(ids, trk=None):
        if trk is None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return
        with trk.phase("forward"):
            loss = engine(input_ids=ids, labels=ids).loss
        with trk.phase("backward"):
            engine.backward(loss)
            del loss
        with trk.phase("optimizer_step"):
            engine.step()

    one_step(batches[0])  # step 1, untracked
    gc.collect()

    trk = LabelTracker(round_to=args.round_to, vocab_size=cfg.vocab_size)
    labels: dict[int, str] = {}
    persistent: dict[str, int] = {}
    for label, t in labelled_tensors(engine):
        if t.untyped_storage().nbytes() == 0 and t.numel() == 0:
            continue
        trk.register(t, category_for(label, t, args.method))
        idx = trk.idx_of(t)
        if idx is not None and idx not in labels:
            labels[idx] = label
    # anything else alive (tensors held by hooks, closures, the engine): found through gc
    n_gc = 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                if o.device.type != "cpu" or o.untyped_storage().nbytes() == 0:
                    continue
            except Exception:
                continue
            if trk.idx_of(o) is None:
                trk.register(o, "weights")
                idx = trk.idx_of(o)
                labels[idx] = f"gc:{tuple(o.shape)}:{str(o.dtype).replace('torch.', '')}"
                n_gc += 1
    for idx, lab in labels.items():
        persistent[lab] = persistent.get(lab, 0) + trk._size[idx]
    base_opt = getattr(engine.optimizer, "optimizer", None)
    if base_opt is not None:
        trk.watch_optimizer(base_opt)
    pre_bytes = trk.current_bytes

    t0 = time.time()
    with trk:
        one_step(batches[1], trk)
    t_step = time.time() - t0
    # label storages created in step 2 that a DeepSpeed attribute still holds
    for label, t in labelled_tensors(engine):
        idx = trk.idx_of(t)
        if idx is not None and idx not in labels:
            labels[idx] = label + " (made in step)"
    res = trk.result()

    # replay: the peak moment of every phase, and what is alive there (labelled)
    n = len(trk._size)
    end = trk._exit_seq
    ev = []
    for i in range(n):
        ev.append((trk._born[i], trk._size[i]))
        if trk._died[i] != -1 and trk._died[i] <= end:
            ev.append((trk._died[i], -trk._size[i]))
    ev.sort()
    starts = [(p[2], p[0]) for p in trk._phases]

    def phase_at(seq):
        name = "load"
        for first, nm in starts:
            if first <= seq:
                name = nm
        return name

    level, peak_seq = 0, 0
    ph_best: dict[str, tuple] = {}
    for s, d in ev:
        level += d
        if d > 0:
            ph = phase_at(s)
            if level > ph_best.get(ph, (-1, 0))[0]:
                ph_best[ph] = (level, s)
            if level == res.peak_bytes and not peak_seq:
                peak_seq = s

    def alive_at(at, full):
        alive: dict[str, int] = {}
        for i in range(n):
            if trk._born[i] <= at and (trk._died[i] == -1 or trk._died[i] > at):
                lab = labels.get(i) or trk._meta.get(i, "?")
                if full and i not in labels:
                    lab = f"{lab} #{i}"
                alive[lab] = alive.get(lab, 0) + trk._size[i]
        return dict(sorted(alive.items(), key=lambda kv: -kv[1]))

    alive = alive_at(peak_seq, args.full_list)
    phase_buffers = {ph: {"level": lv, "buffers": {k: v for k, v in alive_at(s, True).items()
                                                      if not k.startswith("param:") and v >= 1024}}
                     for ph, (lv, s) in ph_best.items() if ph != "load"}
    zc = engine._config.zero_config
    out = {
        "rank": rank, "world": world, "fake": args.fake, "stage": args.stage, "offload": args.offload,
        "method": args.method,
        "dtype": args.dtype, "optim": optim, "seq": args.seq, "batch": args.batch, "hf_auto": args.hf_auto,
        "zero_extra": json.loads(args.zero_extra),
        "deepspeed": deepspeed.__version__, "torch": torch.__version__,
        "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "total_numel": sum(p.numel() for p in model.parameters()) if args.stage != 3 else
        sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        "zero_config": {k: getattr(zc, k) for k in ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
                                                      "contiguous_gradients", "prefetch_bucket_size",
                                                      "param_persistence_threshold", "max_live_parameters",
                                                      "max_reuse_distance", "reduce_scatter", "sub_group_size")},
        "pre_step_bytes": pre_bytes, "gc_found": n_gc,
        "peak_bytes": res.peak_bytes, "peak_phase": res.peak_phase, "peak_estimate_phase": res.peak_estimate_phase,
        "peak_components": {k: v for k, v in res.peak_components.items() if v},
        "phase_peaks": res.phase_peaks, "final_bytes": res.final_bytes,
        "estimate_phase_peaks": res.estimate_phase_peaks,
        "peak_buffers": alive, "phase_buffers": phase_buffers,
        "persistent": dict(sorted(persistent.items(), key=lambda kv: -kv[1])),
        "t_init_s": round(t_init, 2), "t_step_s": round(t_step, 2),
    }
    if not args.full_list:
        # keep the line short: fold tiny entries
        small = {k: v for k, v in out["peak_buffers"].items() if v < 4096}
        out["peak_buffers"] = {k: v for k, v in out["peak_buffers"].items() if v >= 4096}
        out["peak_buffers"]["(<4KiB entries)"] = sum(small.values())
        sp = {k: v for k, v in out["persistent"].items() if v < 4096}
        out["persistent"] = {k: v for k, v in out["persistent"].items() if v >= 4096}
        out["persistent"]["(<4KiB entries)"] = sum(sp.values())
    # one rank at a time, so lines do not interleave
    for r in range(world):
        if r == rank:
            print("RESULT " + json.dumps(out), flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
