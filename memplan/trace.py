"""The traced estimate: run real training steps of the real model on fake tensors and measure them exactly.

``simulate(setup)`` builds the model a training script builds (``memplan.build``: transformers + peft +
bitsandbytes from the model's config.json values), on fake CPU tensors that hold no memory, and runs
``steps`` training steps -- forward with ``labels=input_ids``, ``loss.backward()``, ``optimizer.step()``,
``zero_grad(set_to_none=True)`` -- under ``memplan.tracker.MemoryTracker``. The result is the exact
tensor-level peak of those steps and what was alive at that moment, for any model size, on a laptop: an
OPT-13B LoRA step takes a few seconds and a few hundred MB of RAM. Step 2 is the steady state once an
optimizer keeps state; the peak over all steps is reported (``step_peaks`` has each step's).

The step follows ``transformers.Trainer``: the model output is dropped before ``backward`` (``compute_loss``
returns only the loss, so the fp16/bf16 logits are not alive at the loss gradient), the graph is freed when
backward returns, the batch is ``input_ids`` plus a separate ``labels`` tensor (the collator's
``input_ids.clone()``), no attention mask (no padding), and the optimizer is the Trainer's for ``optim``.

Device semantics. Fake *CUDA* tensors cannot run a backward pass on a machine without a GPU (feasibility.md
§4), so the simulation runs on fake CPU tensors and, with ``device_semantics="cuda"`` (the default), swaps
in what differs on CUDA, restoring everything on exit:

- dropout: ``F.dropout`` on CPU is a composite with a mask in the input's dtype; CUDA calls
  ``native_dropout`` with a bool mask. ``torch.nn.functional.dropout`` is replaced (a monkeypatch, not a
  ``TorchFunctionMode``: checkpoint recomputation runs without the mode and fails with "Recomputed values
  ... have different metadata").
- attention: ``F.scaled_dot_product_attention`` picks the kernel CUDA would (flash for fp16/bf16 without a
  mask on compute capability >= 8.0, else memory-efficient, else math -- e.g. fp32 with GQA) and calls
  ``aten._scaled_dot_product_flash_attention`` / ``_efficient_attention`` directly; their fake kernels save
  the output and an fp32 logsumexp instead of the CPU kernels' buffers; the math kernel runs as ``sdpa_math``,
  the aten composite op for op, with CUDA's bool-mask dropout in place of at::dropout's CPU composite.
  ``flash_attention_2`` setups use an
  attention function registered as ``simattn`` (transformers rejects names containing "flash" without the
  flash_attn package) that calls the flash op like flash_attn does: fp32 inputs cast to the compute dtype,
  grouped-query k/v passed as they are (the op does not need equal heads, as flash_attn does not).
- bitsandbytes: 4-bit ``gemm_4bit`` on CUDA dequantizes the whole weight before ``F.linear``
  (``backends/cuda/ops.py`` ``_dequant_linear_fallback``; its fused kernel is picked per GPU for small
  token counts only, and the simulation assumes the fallback); int8 trains through ``MatMul8bitLt``
  (``int8_linear_matmul`` int32 result, then ``int8_mm_dequant``) instead of the CPU's ``MatMul8bitFp``. A
  dispatch mode above the tracker expands those ops as the CUDA backend does.
- torch optimizers use the foreach implementation (CUDA's default; CPU's default is the per-tensor loop), and
  their per-parameter ``step`` counters are left out (CPU tensors on a GPU run, unless fused/capturable).
- every storage is rounded up to 512 bytes (the CUDA caching allocator's block size).

Both semantics make transformers treat fake tensors as the real ones (``_fake_fidelity_patches``): its mask
code takes a FakeTensor for tracing and would keep an attention mask a real run skips. With that,
``device_semantics="cpu"`` reproduces a real CPU run to the byte (tests/test_trace.py checks it against real
tensors for OPT and a grouped-query llama, LoRA / QLoRA / int8 / full, with and without checkpointing).

Not visible here (no tensor holds them): the CUDA context, cuBLAS workspaces, allocator fragmentation. Compare
with ``memplan.estimate.estimate_for(..., include_runtime=False)``. Known approximations of the CUDA side,
to calibrate on a GPU: the flash kernels' backward workspaces (an fp32 dq accumulator, expanded k/v grads
for GQA) are not modelled; the fake flash kernel returns its output in the query's layout, so rotary models
pay one attention-output-sized copy in ``.contiguous()`` that CUDA's (b, s, h, d) output does not; LayerNorm
statistics of half-precision inputs are half on CPU, fp32 on CUDA (8 bytes per token per norm); that the
memory-efficient kernel refuses grouped-query attention (so fp32 GQA goes to the math kernel) is read from
torch's sdp_utils, not measured.

How the peak is placed on ``memplan.estimate.PHASES`` is in ``memplan.tracker``'s docstring.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.build import TORCH_DTYPES, build_training_model, make_optimizer
from memplan.estimate import COMPONENTS, PHASES, ParamCounts
from memplan.setups import TrainSetup, resolve_setup
from memplan.tracker import MemoryTracker

__all__ = ["SimResult", "simulate", "simulate_for", "DEVICE_SEMANTICS", "make_batch", "forward_loss", "run_step",
           "register_model"]

DEVICE_SEMANTICS = ("cuda", "cpu")
CUDA_BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize
_SIM_ATTN = "simattn"
# bitsandbytes/backends/cuda/ops.py: at most this many rows (tokens) go to the fused 4-bit GEMM
_GEMM_4BIT_CUSTOM_FLOOR_M = 4


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
        }


def simulate(setup: TrainSetup, *, steps: int = 2, device_semantics: str = "cuda", gpu=None,
             profiles_dir=None) -> SimResult:
    """Resolve the setup's model (catalog name or local config) and card, then simulate ``steps`` steps."""
    from memplan.gpus import load_gpu
    from memplan.models import load_model

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu_name = gpu if gpu is not None else setup.gpu
    gpu_spec = load_gpu(gpu_name, profiles_dir=profiles_dir) if isinstance(gpu_name, str) else gpu_name
    return simulate_for(spec, resolve_setup(setup, spec, gpu_spec), gpu_spec, steps=steps,
                        device_semantics=device_semantics)


def simulate_for(spec, setup: TrainSetup, gpu=None, *, steps: int = 2, device_semantics: str = "cuda") -> SimResult:
    """Simulate an already resolved setup (see ``resolve_setup``) on ``spec``."""
    if device_semantics not in DEVICE_SEMANTICS:
        raise ValueError(f"unknown device semantics {device_semantics!r}; allowed: {', '.join(DEVICE_SEMANTICS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    t0 = time.perf_counter()
    cuda = device_semantics == "cuda"
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_quiet_bnb_logger())
        stack.enter_context(_fake_fidelity_patches())
        attn = None
        cuda_notes: list[str] = []  # filled when the patches are undone
        if cuda:
            cuda_notes = stack.enter_context(_cuda_patches(spec, setup, gpu))
            if setup.attn == "flash_attention_2":
                attn = _SIM_ATTN
        try:
            model, info = build_training_model(spec, setup, fake=True, attn_implementation=attn)
        except KeyError:
            if attn != _SIM_ATTN:
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
        trk = MemoryTracker(round_to=CUDA_BLOCK_BYTES if cuda else 1, vocab_size=spec.vocab_size)
        params = register_model(trk, model, info, setup)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(setup, trainable, foreach=True if cuda and _torch_optimizer(setup) else None, fake=True)
        trk.watch_gradients(trainable)
        trk.watch_optimizer(opt)
        stack.enter_context(trk)
        if cuda and setup.bits in (4, 8):
            kernels = _CudaKernels()
            stack.enter_context(kernels)
        else:
            kernels = None
        for _ in range(steps):
            run_step(model, opt, trk, spec, setup)
    if cuda and _torch_optimizer(setup):
        # torch.optim (not fused, not capturable) keeps each parameter's `step` counter in a CPU tensor
        # (torch/optim/adam.py _init_group): host memory on a GPU run.
        for state in opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                trk.exclude(state["step"])
    res = trk.result()
    notes += cuda_notes
    if kernels is not None:
        notes += kernels.notes()
    paged = _paged_bytes(opt, setup, trk.round_to)
    if paged:
        notes.append(f"{setup.optimizer}: {paged} bytes of optimizer state would live in CUDA managed memory "
                     f"(bitsandbytes pages state of tensors with >= 1e5 values); counted in optimizer_state")
    notes.append(
        "tensor-level peak: the CUDA context, cuBLAS workspace and allocator fragmentation are not included"
        if cuda else "CPU semantics: the tensor-level peak of a real CPU run of this setup")
    components = {c: int(res.peak_components.get(c, 0)) for c in COMPONENTS}
    phases = {p: res.estimate_phase_peaks[p] for p in PHASES if p in res.estimate_phase_peaks}
    return SimResult(
        setup=setup, total_bytes=res.peak_bytes, components=components,
        peak_phase=res.peak_estimate_phase or res.peak_phase, phases=phases, phase_peaks=dict(res.phase_peaks),
        step_peaks=tuple(res.step_peaks), params=params, paged_bytes=paged, final_bytes=res.final_bytes,
        device_semantics=device_semantics, wall_seconds=round(time.perf_counter() - t0, 3), notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# the step (shared with the profiler's CPU reference runs)


def make_batch(spec, setup, *, device: str = "cpu") -> dict:
    """One batch as a data collator gives it: ``input_ids`` and ``labels`` (a copy), int64, no padding."""
    ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def forward_loss(model, batch) -> torch.Tensor:
    """``Trainer.compute_loss``: the model output (logits included) is dropped, only the loss survives."""
    return model(**batch).loss


def run_step(model, opt, trk: MemoryTracker, spec, setup, *, device: str = "cpu") -> None:
    """One tracked training step: new batch, forward, backward, optimizer step, zero_grad(set_to_none)."""
    batch = make_batch(spec, setup, device=device)
    for t in batch.values():
        trk.register(t, "inputs")
    with trk.phase("forward"):
        loss = forward_loss(model, batch)
    with trk.phase("backward"):
        loss.backward()
    del loss  # Trainer.training_step returns loss.detach(): the graph dies with the step's loss
    with trk.phase("optimizer_step"):
        opt.step()
    with trk.phase("zero_grad"):
        opt.zero_grad(set_to_none=True)
    del batch


def register_model(trk: MemoryTracker, model, info, setup) -> ParamCounts:
    """Register every parameter, buffer and quantization constant of a model from ``build_training_model``
    with ``trk`` (packed bnb weights: quantized_weights; their absmax/codes/row scales: quant_constants;
    trainable LoRA tensors: lora_params; everything else, full fine-tuning's trainable weights included:
    weights) and return the parameter counts (total = the base model's, as ``ModelSpec.total_params``)."""
    total = trainable = 0  # total: the base model's parameters (as ModelSpec.total_params counts them)
    quantized = {id(t) for t in info.quantized_weights}
    for p in model.parameters():  # tied weights come once
        if id(p) in quantized:
            trk.register(p, "quantized_weights")
            continue
        if p.requires_grad:
            trainable += p.numel()
            total += 0 if setup.trains_lora else p.numel()
            trk.register(p, "lora_params" if setup.trains_lora else "weights")
        else:
            total += p.numel()
            trk.register(p, "weights")
    for b in model.buffers():
        trk.register(b, "weights")
    for t in info.quant_tensors:
        trk.register(t, "quant_constants")
    return ParamCounts(total=total + info.quantized_values, trainable=trainable, quantized=info.quantized_values)


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
        from memplan.errors import InvalidSetupError

        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in bad))
        why = " (the 4/8-bit upcast of the non-quantized weights)" if base.config.dtype == torch.bfloat16 else ""
        raise InvalidSetupError(
            f"{spec.name}: transformers runs the fused MoE experts with torch grouped_mm, which takes bf16 only on "
            f"CUDA; this setup keeps them in {dtypes}{why}. Use dtype bf16 (and, for 4/8 bits, "
            f"upcast_non_quantized=False)")


def _torch_optimizer(setup) -> bool:
    from memplan.optimizers import resolve_optimizer

    spec = resolve_optimizer(setup.optimizer)
    return spec.backend == "torch" and spec.name != "adamw_torch_fused"


def _paged_bytes(opt, setup, round_to: int) -> int:
    from memplan.optimizers import resolve_optimizer

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


@contextlib.contextmanager
def _fake_fidelity_patches():
    """Make transformers treat fake tensors as the real ones they stand for (both device semantics).

    transformers' mask code takes a FakeTensor for a sign of tracing (utils/import_utils.py ``is_tracing``
    checks ``is_fake_tensor``) and then keeps a materialized attention mask it would skip for real tensors:
    ``_ignore_causal_mask_sdpa`` gives up when the cache position is "traced", and
    ``find_packed_sequence_indices`` cannot prove the batch is unpacked. With the mask, SDPA repeats the k/v
    heads of grouped-query models and CUDA cannot pick flash attention. Here a fake tensor is not tracing,
    and the packed-sequence check makes the real run's temporaries and gives the real run's answer (the
    simulated batches are never packed) without reading values fake tensors do not have.
    """
    from transformers import masking_utils as mu

    orig_is_tracing = mu.is_tracing
    orig_find_packed = mu.find_packed_sequence_indices

    def is_tracing(tensor=None):
        if isinstance(tensor, torch._subclasses.FakeTensor):
            return orig_is_tracing(None)
        return orig_is_tracing(tensor)

    def find_packed_sequence_indices(position_ids):
        if not isinstance(position_ids, torch._subclasses.FakeTensor):
            return orig_find_packed(position_ids)
        first_dummy_value = position_ids[:, :1] - 1
        position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
        packed_sequence_mask = (position_diff != 1).cumsum(-1)
        (packed_sequence_mask[:, -1] == 0).all()  # the check the real run evaluates (its temporaries)
        return None

    mu.is_tracing = is_tracing
    mu.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        mu.is_tracing = orig_is_tracing
        mu.find_packed_sequence_indices = orig_find_packed


# ---------------------------------------------------------------------------------------------------------------
# CUDA semantics


def _compute_capability(gpu) -> float:
    try:
        return float(gpu.compute_capability) if gpu is not None else 8.0
    except (TypeError, ValueError):
        return 8.0


@contextlib.contextmanager
def _cuda_patches(spec, setup, gpu):
    """Patch what differs between CPU and CUDA kernels (module docstring); yields notes; restores on exit."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    notes: list[str] = []
    cc = _compute_capability(gpu)
    used: dict[str, int] = {}
    orig_dropout = F.dropout
    orig_sdpa = F.scaled_dot_product_attention

    def cuda_dropout(input, p=0.5, training=True, inplace=False):
        # aten/src/ATen/native/Dropout.cpp: CUDA tensors with 0 < p < 1 use the fused native_dropout (bool mask)
        if training and 0.0 < p < 1.0 and not inplace and input.numel() > 0:
            return torch.native_dropout(input, p, True)[0]
        return orig_dropout(input, p, training, inplace)

    def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        kernel = _sdpa_kernel(query, key, attn_mask, enable_gqa, cc)
        used[kernel] = used.get(kernel, 0) + 1
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if kernel == "efficient":
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                # aten scaled_dot_product_attention: convert_boolean_attn_mask (an additive float mask)
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
                    attn_mask.logical_not(), float("-inf"))
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, lse, dropout_p, is_causal, scale=scale)[0]
        # The math kernel is a composite that calls at::dropout, which is the float-mask composite for CPU
        # tensors; on CUDA it is native_dropout with a bool mask. Same ops, CUDA's dropout.
        return sdpa_math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                         dropout=_native_dropout)[0]

    target_dtype = TORCH_DTYPES[setup.dtype]

    def sim_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
        # transformers/integrations/flash_attention.py + flash_attn: fp32 inputs are cast to the model's
        # compute dtype; (b, heads, s, d) in, (b, s, heads, d) out; k/v keep their (fewer) heads.
        used["flash (flash_attention_2)"] = used.get("flash (flash_attention_2)", 0) + 1
        if query.dtype == torch.float32:
            query, key, value = (t.to(target_dtype) for t in (query, key, value))
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout, causal, False, scale=scaling)[0]
        return out.transpose(1, 2), None

    saved_bnb = {}
    try:
        import bitsandbytes as bnb
        from bitsandbytes.autograd._functions import MatMul8bitLt
    except ImportError:  # bitsandbytes missing: only 4/8-bit setups need it, and they fail in the build
        bnb = None

    def cuda_int8_matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        # bitsandbytes.autograd._functions.matmul picks MatMul8bitFp for CPU tensors; CUDA uses MatMul8bitLt.
        # Outlier columns (threshold > 0, transformers' default 6.0) have data-dependent sizes that fake
        # tensors cannot produce: simulated without outliers.
        state.threshold = 0.0
        return MatMul8bitLt.apply(A, B, out, bias, state)

    F.dropout = cuda_dropout
    F.scaled_dot_product_attention = cuda_sdpa
    transformers.AttentionInterface.register(_SIM_ATTN, sim_flash_attention)
    AttentionMaskInterface.register(_SIM_ATTN, flash_attention_mask)
    if bnb is not None:
        saved_bnb["matmul"] = bnb.matmul
        bnb.matmul = cuda_int8_matmul
    try:
        yield notes
    finally:
        F.dropout = orig_dropout
        F.scaled_dot_product_attention = orig_sdpa
        transformers.AttentionInterface._global_mapping.pop(_SIM_ATTN, None)
        AttentionMaskInterface._global_mapping.pop(_SIM_ATTN, None)
        if bnb is not None:
            bnb.matmul = saved_bnb["matmul"]
        if used:
            notes.append("attention kernels (CUDA selection): "
                         + ", ".join(f"{k} x{n}" for k, n in sorted(used.items())))
        if setup.bits == 8:
            notes.append("int8: simulated through bitsandbytes' CUDA MatMul8bitLt without outlier columns "
                         "(llm_int8_threshold treated as 0; real outliers add a few columns of the input)")


def _native_dropout(x, p: float, train: bool):
    # aten/src/ATen/native/Dropout.cpp dropout(): is_fused_kernel_acceptable (CUDA, 0 < p < 1, numel > 0)
    if train and 0.0 < p < 1.0 and x.numel() > 0:
        return torch.native_dropout(x, p, True)[0]
    return torch.dropout(x, p, train)


def sdpa_math(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
              enable_gqa: bool = False, *, dropout=torch.dropout):
    """``aten._scaled_dot_product_attention_math`` op for op, with the dropout call as a parameter.

    The math kernel is CompositeImplicitAutograd (aten/src/ATen/native/transformers/attention.cpp): autograd
    records its constituent ops, so this Python copy builds the same graph and saves the same tensors
    (tests/test_trace.py checks it against the aten op, allocation by allocation). Half inputs are computed
    in fp32; q and k are each scaled by sqrt(scale); a causal mask is a fresh bool tril turned additive;
    grouped-query k/v are repeat_interleave'd (unsqueeze, expand, clone); the mask is added out of place
    (the path aten takes for tensor subclasses and under dispatch modes, i.e. in every tracked run); softmax
    is ``_safe_softmax``; then dropout, the attention-weights copy in the input dtype, and attn @ v.
    Returns (output, attention weights) like the aten op."""
    import math

    origin = query.dtype
    if origin in (torch.float16, torch.bfloat16):
        # query_acc / key_acc / value_acc: held until the kernel returns, as the C++ locals are
        query, key, value = query.float(), key.float(), value.float()
    scale_value = scale if scale is not None else 1.0 / math.sqrt(query.size(-1))
    factor = math.sqrt(abs(scale_value))
    q = torch.ops.aten.mul.Scalar(query, -factor if scale_value < 0 else factor)
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        neg_inf = torch.scalar_tensor(float("-inf"), dtype=q.dtype, device=q.device)
        attn_mask = torch.where(causal, torch.scalar_tensor(0.0, dtype=q.dtype, device=q.device), neg_inf)
        del causal, neg_inf
    key_expanded, value_expanded = key, value
    if enable_gqa and not (query.size(-3) == key.size(-3) == value.size(-3)):
        key_expanded = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value_expanded = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    attn = torch.matmul(q, torch.ops.aten.mul.Scalar(key_expanded.transpose(-2, -1), factor))
    if attn_mask is not None:
        attn = attn.add(attn_mask)
    attn = torch.ops.aten._safe_softmax(attn, -1)
    if dropout_p > 0.0:
        attn = dropout(attn, dropout_p, True)
    weights = attn.to(origin)  # evaluated before the matmul (make_tuple's arguments, right to left)
    return torch.matmul(attn, value_expanded).to(origin), weights


def _sdpa_kernel(query, key, attn_mask, enable_gqa: bool, cc: float) -> str:
    """The SDPA backend CUDA would pick (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, torch 2.13):
    flash first (sm80+, fp16/bf16, head_dim <= 256, no explicit mask; GQA supported; head dims that are not a
    multiple of 8 are padded), then memory-efficient (fp32 too, masks allowed, no GQA), then math."""
    half = query.dtype in (torch.float16, torch.bfloat16)
    gqa = enable_gqa and query.size(-3) != key.size(-3)
    if cc >= 8.0 and half and attn_mask is None and query.size(-1) <= 256:
        return "flash"
    if not gqa:
        return "efficient"
    return "math"


class _CudaKernels(TorchDispatchMode):
    """Expands bitsandbytes ops the way its CUDA backend runs them, so the temporaries reach the tracker
    (entered above the tracker; its own calls go down to it).

    - ``gemm_4bit`` (bitsandbytes/backends/cuda/ops.py): except for tiny row counts, or where bnb's per-GPU
      heuristic ``_gemm_4bit_use_custom_cuda`` prefers its fused kernel (only for <= 1536 rows; the heuristic
      needs the card's SM count and cannot be imported without CUDA), ``_dequant_linear_fallback``: the nested
      absmax dequantized to fp32 (+ offset), the whole weight dequantized to the input dtype, ``F.linear``.
      The dequantizing path is assumed: the larger memory, and the analytic model's assumption.
    - ``int8_scaled_mm`` (backends/default/ops.py, used on CUDA): ``int8_linear_matmul`` into an int32
      (rows x out) tensor, then ``int8_mm_dequant``.
    """

    def __init__(self):
        super().__init__()
        self.counts = {"dequant": 0, "fused": 0, "int8": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name() if hasattr(func, "name") else ""
        if name == "bitsandbytes::gemm_4bit":
            return self._gemm_4bit(func, *args, **kwargs)
        if name == "bitsandbytes::int8_scaled_mm":
            return self._int8_scaled_mm(*args, **kwargs)
        return func(*args, **kwargs)

    def _gemm_4bit(self, func, A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                   absmax_code=None, absmax_offset=None):
        if A.numel() // A.shape[-1] <= _GEMM_4BIT_CUSTOM_FLOOR_M:
            self.counts["fused"] += 1
            return func(A, B, shapeB, absmax, blocksize, quant_type, bias=bias, absmax_8bit=absmax_8bit,
                        absmax_code=absmax_code, absmax_offset=absmax_offset)
        self.counts["dequant"] += 1
        if absmax_8bit is not None:
            absmax_dq = torch.empty_like(absmax_8bit, dtype=torch.float32)
            absmax = absmax_dq + absmax_offset  # noqa: F841  (alive until F.linear returns, as in bnb)
        B_dq = torch.empty(tuple(shapeB), dtype=A.dtype, device=A.device)
        return F.linear(A, B_dq, bias)

    def _int8_scaled_mm(self, A, B, row_stats, col_stats, bias=None, dtype=None):
        self.counts["int8"] += 1
        out_i32 = torch.ops.bitsandbytes.int8_linear_matmul.default(A, B)
        return torch.ops.bitsandbytes.int8_mm_dequant.default(out_i32, row_stats, col_stats,
                                                              dtype=dtype or torch.float16, bias=bias)

    def notes(self) -> list[str]:
        if not (self.counts["dequant"] or self.counts["fused"]):
            return []
        return [f"4-bit forward matmuls: {self.counts['dequant']} dequantize the whole weight first (bitsandbytes' "
                f"CUDA fallback; its fused kernel, chosen per GPU for <= 1536 tokens, would skip that), "
                f"{self.counts['fused']} fused"]
