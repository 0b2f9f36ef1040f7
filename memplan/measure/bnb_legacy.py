"""Fake-tensor stand-ins for bitsandbytes releases without torch.library kernels (bitsandbytes < 0.46).

From 0.46 bitsandbytes registers its ops with torch (``torch.ops.bitsandbytes.dequantize_4bit`` ...) and fake
kernels for them, which is what ``memplan simulate`` runs on fake tensors. Before that, ``F.dequantize_4bit``
hands data pointers to its C library (``get_ptr``), which a fake tensor has not (bitsandbytes 0.45.2
functional.py:1295-1396). ``legacy_4bit_kernels`` swaps in a function that allocates exactly what the CUDA path
allocates, and nothing else:

- with double quant, ``dequantize_blockwise`` of the uint8 absmax into an fp32 tensor of one value per block
  (``absmax += offset`` is in place), alive until the weight is made;
- the dequantized weight, ``torch.empty(quant_state.shape, dtype=quant_state.dtype)``.

``MatMul4Bit`` (autograd/_functions.py) then runs ``torch.nn.functional.linear`` on it in forward and a matmul
with it in backward, as on a GPU: the same transients as bitsandbytes 0.50's ``_dequant_linear_fallback``.
8-bit (``MatMul8bitLt`` calls ``int8_vectorwise_quant`` and ``int8_linear_matmul`` in its C library) has no stand-in
here: simulating LLM.int8 needs bitsandbytes >= 0.46.
"""

from __future__ import annotations

import contextlib

import torch

from memplan.errors import InvalidSetupError

__all__ = ["has_torch_ops", "legacy_4bit_kernels"]


def has_torch_ops() -> bool:
    """Whether the installed bitsandbytes registers its kernels with torch (0.46 and later)."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes where it does)

    return hasattr(torch.ops.bitsandbytes, "dequantize_4bit")


@contextlib.contextmanager
def legacy_4bit_kernels(setup):
    """On bitsandbytes < 0.46, ``F.dequantize_4bit`` for fake tensors (module docstring); a no-op otherwise."""
    if setup.bits not in (4, 8) or has_torch_ops():
        yield
        return
    if setup.bits == 8:
        raise InvalidSetupError("memplan simulate of LLM.int8 needs bitsandbytes >= 0.46 (its int8 kernels are "
                                "torch ops from 0.46; before, they read data pointers a fake tensor has not)")
    import bitsandbytes.functional as bnbf

    orig = bnbf.dequantize_4bit

    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=64, quant_type="fp4"):
        if quant_state is None:
            return orig(A, quant_state, absmax, out, blocksize, quant_type)
        if quant_state.nested:
            absmax = torch.empty(quant_state.absmax.shape, dtype=torch.float32, device=A.device)
            absmax += quant_state.offset  # noqa: F841  (alive until the weight is made, as in bitsandbytes)
        if out is None:
            out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=A.device)
        return out.t() if A.shape[0] == 1 else out  # "is transposed, transpose back" (functional.py:1394-1396)

    bnbf.dequantize_4bit = dequantize_4bit
    try:
        yield
    finally:
        bnbf.dequantize_4bit = orig
