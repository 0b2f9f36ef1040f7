"""CUDA's autocast on CPU tensors: what ``torch.autocast("cuda", dtype)`` does to a training step, reproduced on the
(fake) CPU tensors ``memplan simulate`` runs on.

CPU autocast is not a stand-in: its op lists differ from CUDA's (CPU autocasts ``cat``, ``stack``, the fft and
linalg families and ``cross_entropy_loss``, and leaves ``layer_norm``, ``softmax``, ``pow``, ``sum`` and the
losses alone). So while the step runs, memplan puts CUDA's policy in the place of CPU's: a Python kernel for
every op CUDA autocasts, registered at the ``AutocastCPU`` dispatch key (above autograd, exactly where CUDA's
kernels sit, so every cast is recorded by autograd and saved for backward as on the GPU), a pass-through for
every op only CPU autocasts, then ``torch.autocast("cpu", dtype)`` switches the key on. The registrations are
removed when the block exits, so a real CPU autocast run in the same process is untouched.

The policy is ``CUDA_AUTOCAST_POLICY``, copied from torch 2.13.0's ``torch/include/ATen/autocast_mode.h``
(lines 820-958: ``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``), which ``aten/src/ATen/autocast_mode.cpp``
registers for CUDA, plus the ``binary_cross_entropy`` ban. tests/measure/test_autocast.py checks it against the
installed torch: the header's lists, and the set of ops that have an ``AutocastCUDA`` kernel in the dispatcher.
What each policy does (``autocast_mode.h``: ``cached_cast``, ``set_opt_dtype``, ``promote_type``):

- ``lower_precision_fp``: every floating tensor argument but fp64 is cast to the autocast dtype. The cast of an
  fp32 leaf that requires grad (a trainable weight, not a view) is cached until the outermost autocast exits, so
  each trainable weight is cast once per forward and its copy lives until then;
- ``fp32``: every floating tensor argument but fp64 is cast to fp32;
- ``fp32_set_opt_dtype``: when the first tensor argument is floating, an unset ``dtype`` argument becomes fp32;
- ``fp32_append_dtype``: ``norm`` runs its ``dtype`` overload with fp32;
- ``promote``: floating arguments are cast to the widest floating dtype among them.

Code that asks ``torch.is_autocast_enabled()`` without a device means CUDA (peft's bitsandbytes LoRA layers do,
peft/tuners/lora/bnb.py); inside the block it answers for the simulated CUDA autocast.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = ["CUDA_AUTOCAST_POLICY", "cuda_autocast", "cuda_autocast_policy", "policy_of", "autocast_for"]

# torch 2.13.0 torch/include/ATen/autocast_mode.h:820-958 (the lists, in the header's order), "op[.overload]".
CUDA_AUTOCAST_POLICY: dict[str, tuple[str, ...]] = {
    "lower_precision_fp": (
        "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
        "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr",
        "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
        "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
        "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
        "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
        "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
        "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
        "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
        "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    ),
    "fp32_set_opt_dtype": (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
    "fp32_append_dtype": ("norm.Scalar", "norm.ScalarOpt_dim"),
    "promote": ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
                "tensordot", "scatter_add"),
    # autocast_mode.cpp: "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast"
    "banned": ("binary_cross_entropy",),
}
# CUDA-only kernels registered by the CUDA build (cudnn); never called on CPU tensors.
_CUDA_ONLY = ("cudnn_convolution", "cudnn_convolution_transpose")

_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}


def policy_of(qualname: str) -> str | None:
    """CUDA autocast's policy for ``op[.overload]`` (``None``: CUDA autocast leaves the op alone)."""
    for policy, names in CUDA_AUTOCAST_POLICY.items():
        if qualname in names:
            return policy
    return None


def _overload(qualname: str):
    name, _, overload = qualname.partition(".")
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else getattr(packet, overload or "default", None)


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class _Policy:
    """The kernels of one ``cuda_autocast`` block: the autocast dtype and the weight-cast cache."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(fp32 leaf) -> (leaf, its cast)
        self.no_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def cast(self, value, to: torch.dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v, to) for v in value)
        if not _eligible(value) or value.dtype == to:
            return value
        cacheable = (to == self.dtype and value.dtype == torch.float32 and value.requires_grad and value.is_leaf
                     and not value._is_view())
        if cacheable:
            hit = self.cache.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
        out = value.to(to)
        if cacheable:
            self.cache[id(value)] = (value, out)
        return out

    def kernel(self, policy: str, qualname: str, op):
        guard = self.no_autocast

        def run(args, kwargs):
            with torch._C._ExcludeDispatchKeyGuard(guard):
                return op(*args, **kwargs)

        if policy in ("lower_precision_fp", "fp32"):
            def k(*args, **kwargs):
                to = self.dtype if policy == "lower_precision_fp" else torch.float32
                with torch._C._ExcludeDispatchKeyGuard(guard):
                    args, kwargs = self.cast(args, to), {n: self.cast(v, to) for n, v in kwargs.items()}
                return run(args, kwargs)
        elif policy == "fp32_set_opt_dtype":
            names = [a.name for a in op._schema.arguments]
            at = names.index("dtype")

            def k(*args, **kwargs):
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if _eligible(first):
                    if len(args) > at:
                        if args[at] is None:
                            args = (*args[:at], torch.float32, *args[at + 1:])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return run(args, kwargs)
        elif policy == "fp32_append_dtype":
            with_dtype = _overload(_APPEND_DTYPE[qualname])

            def k(*args, **kwargs):
                if _eligible(args[0]):
                    with torch._C._ExcludeDispatchKeyGuard(guard):
                        return with_dtype(*args, **kwargs, dtype=torch.float32)
                return run(args, kwargs)
        elif policy == "promote":
            def k(*args, **kwargs):
                floats = [t.dtype for t in _tensors(args, kwargs) if _eligible(t)]
                if floats:
                    widest = floats[0]
                    for d in floats[1:]:
                        widest = torch.promote_types(widest, d)
                    with torch._C._ExcludeDispatchKeyGuard(guard):
                        args = self.cast(args, widest)
                        kwargs = {n: self.cast(v, widest) for n, v in kwargs.items()}
                return run(args, kwargs)
        else:  # banned
            def k(*args, **kwargs):
                raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
                                   "autocast (CUDA autocast refuses them; use binary_cross_entropy_with_logits)")
        return k


def _tensors(args, kwargs) -> Iterator[torch.Tensor]:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def _cpu_only_autocast_ops() -> list[str]:
    """Ops with a CPU autocast kernel that CUDA autocast does not have (the dispatcher's own registrations)."""
    listed = {q for names in CUDA_AUTOCAST_POLICY.values() for q in names}
    out = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        qualname = name[len("aten::"):]
        if qualname not in listed and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU"):
            out.append(qualname)
    return out


def _passthrough(op, guard):
    def k(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(guard):
            return op(*args, **kwargs)
    return k


@contextlib.contextmanager
def cuda_autocast_policy(dtype: torch.dtype) -> Iterator[None]:
    """While the block runs, CPU autocast follows CUDA's policy at ``dtype`` (module docstring) wherever it is
    switched on: the step's forward, and the forward that gradient checkpointing recomputes in backward under the
    autocast state it saved (torch/utils/checkpoint.py). The weight-cast cache is dropped whenever the outermost
    autocast exits, as CUDA's (torch/amp/autocast_mode.py ``__exit__`` -> ``torch.clear_autocast_cache``)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast runs in bf16 or fp16, not {dtype}")
    policy = _Policy(dtype)
    lib = torch.library.Library("aten", "IMPL")
    is_enabled, get_dtype, clear_cache = torch.is_autocast_enabled, torch.get_autocast_dtype, \
        torch.clear_autocast_cache
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": on purpose, undone below
            for qualname in _cpu_only_autocast_ops():
                op = _overload(qualname)
                if op is not None:
                    lib.impl(qualname, _passthrough(op, policy.no_autocast), "AutocastCPU")
            for name, qualnames in CUDA_AUTOCAST_POLICY.items():
                for qualname in qualnames:
                    op = _overload(qualname)
                    if op is not None:
                        lib.impl(qualname, policy.kernel(name, qualname, op), "AutocastCPU")

        def enabled(device_type: str | None = None) -> bool:  # no device: CUDA (torch.is_autocast_enabled())
            return is_enabled("cpu") if device_type in (None, "cuda") else is_enabled(device_type)

        def autocast_dtype(device_type: str) -> torch.dtype:
            return get_dtype("cpu") if device_type == "cuda" else get_dtype(device_type)

        def clear() -> None:
            clear_cache()
            policy.cache.clear()

        torch.is_autocast_enabled, torch.get_autocast_dtype, torch.clear_autocast_cache = enabled, autocast_dtype, clear
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype, torch.clear_autocast_cache = is_enabled, get_dtype, \
            clear_cache
        policy.cache.clear()
        lib._destroy()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """Run the block under CUDA's autocast at ``dtype`` (bf16 / fp16), on CPU tensors: ``cuda_autocast_policy``
    with CPU autocast switched on."""
    with cuda_autocast_policy(dtype), torch.autocast("cpu", dtype=dtype):
        yield


def autocast_for(setup, device_type: str):
    """The context-manager factory the forward of ``setup`` runs under (``memplan.measure.step.run_steps``):
    nothing when ``setup.autocast`` is off, else the device's ``torch.autocast`` (a real CPU run gets CPU
    autocast's op lists, a GPU run CUDA's; a simulation with CUDA semantics holds ``cuda_autocast_policy`` around
    the whole step, forward and backward)."""
    if setup.autocast in (None, "off"):
        return contextlib.nullcontext
    from .dtypes import torch_dtype

    dtype = torch_dtype(setup.autocast)
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)
