"""CUDA semantics on fake CPU tensors: what ``memplan simulate`` swaps in so that a CPU simulation allocates what
a CUDA run does.

Fake *CUDA* tensors cannot run a backward pass on a machine without a GPU (docs/memory-model.md, "How simulate
builds a model"), so the simulation runs on fake CPU tensors and, with ``device_semantics="cuda"``, swaps in
what differs on CUDA, restoring everything on exit:

- dropout: ``F.dropout`` on CPU is a composite with a mask in the input's dtype; CUDA calls
  ``native_dropout`` with a bool mask. ``torch.nn.functional.dropout`` is replaced (a monkeypatch, not a
  ``TorchFunctionMode``: checkpoint recomputation runs without the mode and fails with "Recomputed values
  ... have different metadata").
- attention: ``F.scaled_dot_product_attention`` picks the kernel CUDA would (flash for fp16/bf16 without a
  mask on compute capability >= 8.0, else memory-efficient, else math -- e.g. fp32 with GQA) and calls
  ``aten._scaled_dot_product_flash_attention`` / ``_efficient_attention`` directly; their fake kernels save
  the output and an fp32 logsumexp instead of the CPU kernels' buffers; the math kernel runs as ``sdpa_math``,
  the aten composite op for op, with CUDA's bool-mask dropout in place of at::dropout's CPU composite.
  ``flash_attention_2`` setups use an attention function registered as ``simattn`` (transformers rejects
  names containing "flash" without the flash_attn package) that calls the flash op like flash_attn does:
  fp32 inputs cast to the compute dtype, grouped-query k/v passed as they are.
- bitsandbytes: 4-bit ``gemm_4bit`` on CUDA dequantizes the whole weight before ``F.linear``
  (``backends/cuda/ops.py`` ``_dequant_linear_fallback``; its fused kernel is picked per GPU for small
  token counts only, and the simulation assumes the fallback); int8 trains through ``MatMul8bitLt``
  (``int8_linear_matmul`` int32 result, then ``int8_mm_dequant``) instead of the CPU's ``MatMul8bitFp``. A
  dispatch mode above the tracker (``CudaKernels``) expands those ops as the CUDA backend does.

Both semantics make transformers treat fake tensors as the real ones (``fake_fidelity_patches``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .dtypes import torch_dtype

__all__ = ["SIM_ATTN", "cuda_patches", "fake_fidelity_patches", "sdpa_math", "native_dropout", "CudaKernels"]

SIM_ATTN = "simattn"
# bitsandbytes/backends/cuda/ops.py: at most this many rows (tokens) go to the fused 4-bit GEMM
_GEMM_4BIT_CUSTOM_FLOOR_M = 4


@contextlib.contextmanager
def fake_fidelity_patches():
    """Make transformers treat fake tensors as the real ones they stand for (both device semantics).

    transformers' mask code takes a FakeTensor for a sign of tracing (utils/import_utils.py ``is_tracing``
    checks ``is_fake_tensor``) and then keeps a materialized attention mask it would skip for real tensors:
    ``_ignore_causal_mask_sdpa`` gives up when the cache position is "traced", and
    ``find_packed_sequence_indices`` cannot prove the batch is unpacked. With the mask, SDPA repeats the k/v
    heads of grouped-query models and CUDA cannot pick flash attention. Here a fake tensor is not tracing,
    and the packed-sequence check makes the real run's temporaries and gives the real run's answer (the
    simulated batches are never packed) without reading values fake tensors do not have.
    """
    try:
        from transformers import masking_utils as mu
    except ImportError:  # transformers < 4.53 (no masking_utils): its own data-dependent check, below
        with _old_mask_patch():
            yield
        return

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


@contextlib.contextmanager
def _old_mask_patch():
    """transformers < 4.53: models that build an all-ones 2-D attention mask (OPT) ask
    ``AttentionMaskConverter._ignore_causal_mask_sdpa`` whether ``torch.all(attention_mask == 1)``, which a
    fake tensor cannot answer. The simulated batches are never padded: make the check's temporaries and give
    the real run's answer, as for a model that passes no mask (modeling_attn_mask_utils.py, 4.48.3:243-300)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter as amc

    orig = amc.__dict__["_ignore_causal_mask_sdpa"]

    def ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length, sliding_window=None,
                                is_training=False):
        if isinstance(attention_mask, torch._subclasses.FakeTensor) and attention_mask.dim() == 2:
            torch.all(attention_mask == 1)  # the check the real run evaluates (its temporaries)
            attention_mask = None
        return orig.__func__(attention_mask, inputs_embeds, past_key_values_length, sliding_window, is_training)

    orig_rand = torch.rand

    def rand(*size, **kwargs):
        # OPT's LayerDrop draws torch.rand([]) and compares it with layerdrop (0.0) on every layer in training
        # (models/opt/modeling_opt.py, 4.48.3:913-915): a fake scalar cannot be compared (nor a real one under the
        # fake mode), so the draw is a Python number; the real run's 0-dim tensor is 4 bytes, never alive long
        if size in ((), ([],)) and not kwargs:
            with unset_fake_temporarily():
                return orig_rand([]).item()
        return orig_rand(*size, **kwargs)

    amc._ignore_causal_mask_sdpa = staticmethod(ignore_causal_mask_sdpa)
    torch.rand = rand
    try:
        yield
    finally:
        amc._ignore_causal_mask_sdpa = orig
        torch.rand = orig_rand


def _compute_capability(gpu) -> float:
    try:
        return float(gpu.compute_capability) if gpu is not None else 8.0
    except (TypeError, ValueError):
        return 8.0


@contextlib.contextmanager
def cuda_patches(spec, setup, gpu):
    """Patch what differs between CPU and CUDA kernels (module docstring); yields notes; restores on exit."""
    import transformers

    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:  # transformers < 4.53: no registrable mask functions (flash_attention_2 not simulated)
        AttentionMaskInterface = flash_attention_mask = None
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
        if torch.is_autocast_enabled("cpu"):
            # This function stands in for aten::scaled_dot_product_attention, which autocast lists as
            # lower_precision_fp (memplan.measure.autocast): the floating inputs are cast, the kernel is chosen
            # on the cast tensors, and the kernel runs without autocast.
            dt = torch.get_autocast_dtype("cpu")
            query, key, value, attn_mask = (
                t.to(dt) if t is not None and t.is_floating_point() and t.dtype not in (dt, torch.float64) else t
                for t in (query, key, value, attn_mask))
            with torch.autocast("cpu", enabled=False):
                return cuda_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
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
                         dropout=native_dropout)[0]

    target_dtype = torch_dtype(setup.dtype)

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
    if AttentionMaskInterface is not None:
        transformers.AttentionInterface.register(SIM_ATTN, sim_flash_attention)
        AttentionMaskInterface.register(SIM_ATTN, flash_attention_mask)
    if bnb is not None:
        saved_bnb["matmul"] = bnb.matmul
        bnb.matmul = cuda_int8_matmul
    try:
        yield notes
    finally:
        F.dropout = orig_dropout
        F.scaled_dot_product_attention = orig_sdpa
        if AttentionMaskInterface is not None:
            transformers.AttentionInterface._global_mapping.pop(SIM_ATTN, None)
            AttentionMaskInterface._global_mapping.pop(SIM_ATTN, None)
        if bnb is not None:
            bnb.matmul = saved_bnb["matmul"]
        if used:
            notes.append("attention kernels (CUDA selection): "
                         + ", ".join(f"{k} x{n}" for k, n in sorted(used.items())))
        if setup.bits == 8:
            notes.append("int8: simulated through bitsandbytes' CUDA MatMul8bitLt without outlier columns "
                         "(llm_int8_threshold treated as 0; real outliers add a few columns of the input)")


def native_dropout(x, p: float, train: bool):
    # aten/src/ATen/native/Dropout.cpp dropout(): is_fused_kernel_acceptable (CUDA, 0 < p < 1, numel > 0)
    if train and 0.0 < p < 1.0 and x.numel() > 0:
        return torch.native_dropout(x, p, True)[0]
    return torch.dropout(x, p, train)


def sdpa_math(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
              enable_gqa: bool = False, *, dropout=torch.dropout):
    """``aten._scaled_dot_product_attention_math`` op for op, with the dropout call as a parameter.

    The math kernel is CompositeImplicitAutograd (aten/src/ATen/native/transformers/attention.cpp): autograd
    records its constituent ops, so this Python copy builds the same graph and saves the same tensors
    (tests/measure/test_simulate.py checks it against the aten op, allocation by allocation). Half inputs are computed
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


class CudaKernels(TorchDispatchMode):
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
