"""The traced estimate: run real training steps of the real model on fake tensors and measure them exactly.

``simulate(setup)`` builds the model a training script builds (``memplan.measure.build``: transformers + peft +
bitsandbytes from the model's config.json values), on fake CPU tensors that hold no memory, and runs
``steps`` training steps (``memplan.measure.step``: forward with ``labels=input_ids``, ``loss.backward()``,
``optimizer.step()``, ``zero_grad(set_to_none=True)``) under the recorder's exact tracker
(``memplan.measure.recorder``). The result is the exact tensor-level peak of those steps and what was alive at
that moment, for any model size, on a laptop: an OPT-13B LoRA step takes a few seconds and a few hundred MB of
RAM. Step 2 is the steady state once an optimizer keeps state; the peak over all steps is reported
(``step_peaks`` has each step's). The optimizer is the Trainer's for ``optim``.

``device_semantics="cuda"`` (the default) swaps in what differs on CUDA (``memplan.measure.cuda_semantics``);
torch optimizers then use the foreach implementation (CUDA's default; CPU's default is the per-tensor loop),
their per-parameter ``step`` counters are left out (CPU tensors on a GPU run, unless fused/capturable), and every
storage is rounded up to 512 bytes (the CUDA caching allocator's block size). ``device_semantics="cpu"``
reproduces a real CPU run to the byte (tests/measure/test_simulate.py checks it against real tensors for OPT and
a grouped-query llama, LoRA / QLoRA / int8 / full, with and without checkpointing).

Not visible here (no tensor holds them): the CUDA context, cuBLAS workspaces, allocator fragmentation. Compare
with ``memplan.plan.estimate.estimate_for(..., include_runtime=False)``. Known approximations of the CUDA side,
to calibrate on a GPU: the flash kernels' backward workspaces (an fp32 dq accumulator, expanded k/v grads
for GQA) are not modelled; the fake flash kernel returns its output in the query's layout, so rotary models
pay one attention-output-sized copy in ``.contiguous()`` that CUDA's (b, s, h, d) output does not; LayerNorm
statistics of half-precision inputs are half on CPU, fp32 on CUDA (8 bytes per token per norm); that the
memory-efficient kernel refuses grouped-query attention (so fp32 GQA goes to the math kernel) is read from
torch's sdp_utils, not measured.

How the peak is placed on ``memplan.plan.breakdown.PHASES`` is in ``memplan.measure.tracker``'s docstring.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

from memplan.errors import InvalidSetupError
from memplan.units import format_bytes
from memplan.plan.breakdown import COMPONENTS, PHASES, ParamCounts
from memplan.plan.optimizers import resolve_optimizer
from memplan.plan.runtime import CUDA_BLOCK_BYTES
from memplan.plan.setup import TrainSetup, resolve_setup
from memplan.plan.stack_effects import layout_for
from memplan.plan.versions import check_installed

from .autocast import autocast_for, cuda_autocast_policy
from .bnb_legacy import legacy_4bit_kernels
from .moe_legacy import balanced_routing
from .dtypes import torch_dtype
from .build import build_training_model
from .quantize import fake_dequantize_for_peft
from .cuda_semantics import SIM_ATTN, CudaKernels, cuda_patches, fake_fidelity_patches
from .optimizer import make_optimizer
from .recorder import StepRecorder
from .step import run_steps
from .dist_sim import fake_world, simulable, wrap_model
from .loss_sim import check_simulable
from .offload_sim import offload_hooks

__all__ = ["SimResult", "simulate", "simulate_for", "DEVICE_SEMANTICS"]

DEVICE_SEMANTICS = ("cuda", "cpu")


@dataclass(frozen=True)
class SimResult:
    """The traced peak of a training step: a breakdown whose components sum to ``total_bytes``."""

    setup: TrainSetup
    total_bytes: int
    components: dict[str, int]  # memplan.estimate.COMPONENTS; cuda_context and allocator_overhead are 0
    peak_phase: str  # a memplan.estimate.PHASES name (or the tracker phase: load / zero_grad)
    phases: dict[str, int]  # analytic phase -> highest level in it (the phases the run went through)
    phase_peaks: dict[str, int]  # tracker phase (load / forward / backward / optimizer_step / zero_grad) -> peak
    step_peaks: tuple[int, ...]
    params: ParamCounts
    paged_bytes: int  # optimizer state bitsandbytes would put in CUDA managed memory (paged optimizers)
    final_bytes: int  # alive after the last step (weights, adapter, optimizer state)
    device_semantics: str
    wall_seconds: float
    notes: tuple[str, ...] = field(default=())
    # PHASES name -> components at that phase's own highest level (TrackResult.estimate_phase_components)
    phase_components: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dominant(self) -> str:
        return max(self.components, key=self.components.__getitem__)

    def to_dict(self) -> dict:
        """The keys of ``Estimate.to_dict()`` plus the simulation's own."""
        return {
            "model": self.setup.model,
            "total_bytes": self.total_bytes,
            "components": dict(self.components),
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "params": self.params.to_dict(),
            "paged_bytes": self.paged_bytes,
            "dominant": self.dominant,
            "setup": self.setup.to_dict(),
            "notes": list(self.notes),
            "phase_peaks": dict(self.phase_peaks),
            "step_peaks": list(self.step_peaks),
            "final_bytes": self.final_bytes,
            "device_semantics": self.device_semantics,
            "wall_seconds": self.wall_seconds,
            # (the keys of Estimate.to_dict that one simulated step does not measure)
            "host_bytes": {}, "init_phase": [], "shape": None,
        }


def simulate(setup: TrainSetup, *, steps: int = 2, device_semantics: str = "cuda", gpu=None,
             profiles_dir=None) -> SimResult:
    """Resolve the setup's model (catalog name or local config) and card, then simulate ``steps`` steps."""
    from memplan.catalog.gpus import as_gpu
    from memplan.catalog.models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_name = gpu if gpu is not None else setup.gpu
    gpu_spec = as_gpu(gpu_name, profiles_dir=profiles_dir)
    return simulate_for(spec, resolve_setup(setup, spec, gpu_spec), gpu_spec, steps=steps,
                        device_semantics=device_semantics)


def simulate_for(spec, setup: TrainSetup, gpu=None, *, steps: int = 2, device_semantics: str = "cuda") -> SimResult:
    """Simulate an already resolved setup (see ``resolve_setup``) on ``spec``."""
    if device_semantics not in DEVICE_SEMANTICS:
        raise InvalidSetupError(f"unknown device semantics {device_semantics!r}; allowed: "
                                f"{', '.join(DEVICE_SEMANTICS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidSetupError(f"invalid steps {steps!r}; must be an integer >= 1")
    check_installed(setup.versions, "memplan simulate")
    check_simulable(setup)  # --loss liger: a Triton kernel (memplan.measure.loss_sim)
    if setup.strategy not in (None, "single"):
        simulable(setup)  # several GPUs: the engines that run on fake tensors (memplan.measure.dist_sim)
    spec = layout_for(spec, setup.versions)  # the modules the installed transformers builds (Mixtral 4.x)
    t0 = time.perf_counter()
    cuda = device_semantics == "cuda"
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_quiet_bnb_logger())
        stack.enter_context(fake_world(setup))
        stack.enter_context(fake_fidelity_patches())
        stack.enter_context(legacy_4bit_kernels(setup))  # bitsandbytes < 0.46: fake-tensor dequantize_4bit
        if setup.adapter == "dora" and setup.bits in (4, 8):
            stack.enter_context(fake_dequantize_for_peft())  # DoRA dequantizes the base weight every forward
        if any(lin.num_experts > 1 and lin.peft_target == "module" for lin in spec.layer_linears):
            stack.enter_context(balanced_routing(spec))  # transformers 4.x experts loop: torch.where routing
        attn = None
        cuda_notes: list[str] = []  # filled when the patches are undone
        if cuda:
            cuda_notes = stack.enter_context(cuda_patches(spec, setup, gpu))
            if setup.attn == "flash_attention_2":
                attn = SIM_ATTN
        try:
            model, info = build_training_model(spec, setup, fake=True, attn_implementation=attn)
        except KeyError:
            if attn != SIM_ATTN:
                raise
            # Models with their own attention classes per implementation (Falcon's FalconFlashAttention2)
            # do not look up registered functions: their flash path is simulated by sdpa's flash kernel.
            model, info = build_training_model(spec, setup, fake=True, attn_implementation="sdpa")
            cuda_notes.append(f"{spec.model_type} selects attention classes itself: flash_attention_2 simulated "
                              f"with sdpa on the CUDA flash kernel")
        _check_grouped_mm(model, spec)
        # (in CUDA semantics the int8 path is MatMul8bitLt: the build's CPU-path caveat does not apply)
        notes += [n for n in info.notes if not (cuda and n.startswith("int8:"))]
        stack.enter_context(info.fake_mode)
        tracker_ref: list = [None]
        if setup.strategy == "fsdp2":  # sharded before the recorder registers what the rank holds
            model, engine_tracking = wrap_model(model, spec, setup, tracker_ref)
            stack.enter_context(engine_tracking)
        rec = StepRecorder(vocab_size=spec.vocab_size, round_to=CUDA_BLOCK_BYTES if cuda else 1)
        tracker_ref[0] = rec.tracker
        params = rec.register_model(model).param_counts()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(setup, trainable, foreach=True if cuda and _torch_optimizer(setup) else None, fake=True,
                             model=model)
        rec.watch(trainable, opt)
        stack.enter_context(rec)
        if setup.strategy == "ddp":  # its gradient buckets are allocated as it wraps the model
            with rec.tracker.tagged("comm_buffers"):
                model, _ = wrap_model(model, spec, setup, tracker_ref)
        backward, stepper = None, opt
        if setup.strategy in ("zero1", "zero2", "zero3"):  # DeepSpeed's engine, built inside the tracker
            from .zero_sim import deepspeed_patches, zero_engine

            info.fake_mode.allow_non_fake_inputs = True  # (DeepSpeed makes a few real scalars)
            stack.enter_context(deepspeed_patches(setup.gpus * setup.nodes))
            model, stepper = zero_engine(model, opt, spec, setup)  # (opt: its state is the rank's partition's)
            backward = model.backward
        if cuda and setup.bits in (4, 8):
            kernels = CudaKernels()
            stack.enter_context(kernels)
        else:
            kernels = None
        if cuda and setup.autocast not in (None, "off"):
            stack.enter_context(cuda_autocast_policy(torch_dtype(setup.autocast)))
        # --activation-offload: saved tensors packed to (excluded) host storages (memplan.measure.offload_sim)
        host = stack.enter_context(offload_hooks(model, rec.tracker, getattr(setup, "activation_offload", None)))
        run_steps(model, stepper, rec, spec, setup, steps=steps, autocast=autocast_for(setup, "cpu"),
                  backward=backward)
    trk = rec.tracker
    if cuda and _torch_optimizer(setup):
        # torch.optim (not fused, not capturable) keeps each parameter's `step` counter in a CPU tensor
        # (torch/optim/adam.py _init_group): host memory on a GPU run.
        for state in opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                trk.exclude(state["step"])
    res = trk.result()
    notes += cuda_notes
    if host.peak:
        notes.append(f"activation offload: {host.peak:,} B of host memory at most (the packed copies)")
    if kernels is not None:
        notes += kernels.notes()
    paged = _paged_bytes(opt, setup, trk.round_to)
    if paged:
        notes.append(f"{setup.optimizer}: {format_bytes(paged)} of optimizer state would live in CUDA managed memory "
                     f"(bitsandbytes pages state of tensors with >= 1e5 values); counted in optimizer_state")
    notes.append(
        "tensor-level peak: the CUDA context, cuBLAS workspace and allocator fragmentation are not included"
        if cuda else "CPU semantics: the tensor-level peak of a real CPU run of this setup")
    components = {c: int(res.peak_components.get(c, 0)) for c in COMPONENTS}
    phases = {p: res.estimate_phase_peaks[p] for p in PHASES if p in res.estimate_phase_peaks}
    peak_bytes, peak_phase = res.peak_bytes, res.peak_estimate_phase or res.peak_phase
    if setup.strategy == "zero3" and res.peak_phase == "load":
        # The Trainer builds a ZeRO-3 model inside deepspeed.zero.Init, partitioning each parameter as it is
        # made; this simulation partitions a whole model: its load peak is not the run's. The step's is.
        peak_phase = max(phases, key=phases.__getitem__)
        peak_bytes = phases[peak_phase]
        components = {c: int(res.estimate_phase_components[peak_phase].get(c, 0)) for c in COMPONENTS}
        notes.append("ZeRO-3: the peak of the training step (the model is partitioned as it loads, as under "
                     "deepspeed.zero.Init)")
    return SimResult(
        setup=setup, total_bytes=peak_bytes, components=components, peak_phase=peak_phase, phases=phases,
        phase_peaks=dict(res.phase_peaks),
        step_peaks=tuple(res.step_peaks), params=params, paged_bytes=paged, final_bytes=res.final_bytes,
        device_semantics=device_semantics, wall_seconds=round(time.perf_counter() - t0, 3), notes=tuple(notes),
        phase_components={p: {c: int(comps.get(c, 0)) for c in COMPONENTS}
                          for p, comps in res.estimate_phase_components.items()},
    )


def _check_grouped_mm(model, spec) -> None:
    """transformers 5 runs fused MoE experts (Mixtral) through ``torch.nn.functional.grouped_mm`` by default,
    which takes bf16 only on CUDA (and in its fake kernel, torch/_meta_registrations.py): fp16/fp32 experts --
    also QLoRA's fp32 upcast of the non-quantized experts -- fail there, so they are refused here with why."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_experts_implementation", None) != "grouped_mm":
        return
    bad = {p.dtype for n, p in model.named_parameters()
           if "experts" in n and p.dim() == 3 and p.dtype != torch.bfloat16}
    if bad:
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in bad))
        why = " (the 4/8-bit upcast of the non-quantized weights)" if base.config.dtype == torch.bfloat16 else ""
        raise InvalidSetupError(
            f"{spec.name}: transformers runs the fused MoE experts with torch grouped_mm, which takes bf16 only on "
            f"CUDA; this setup keeps them in {dtypes}{why}. Use dtype bf16 (and, for 4/8 bits, "
            f"upcast_non_quantized=False)")


def _torch_optimizer(setup) -> bool:
    spec = resolve_optimizer(setup.optimizer)
    return spec.backend == "torch" and spec.name != "adamw_torch_fused"


def _paged_bytes(opt, setup, round_to: int) -> int:
    if not resolve_optimizer(setup.optimizer).paged:
        return 0
    total = 0
    for p, state in opt.state.items():
        if p.numel() < 1e5:  # bitsandbytes Optimizer8bit.get_state_buffer pages only tensors > 1e5 values
            continue
        for key in ("state1", "state2"):
            t = state.get(key)
            if isinstance(t, torch.Tensor):
                total += -(-t.untyped_storage().nbytes() // round_to) * round_to
    return total


@contextlib.contextmanager
def _quiet_bnb_logger():
    import logging

    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # "MatMul8bitLt: inputs will be cast from float32 to float16" on every call
    try:
        yield
    finally:
        log.setLevel(level)

