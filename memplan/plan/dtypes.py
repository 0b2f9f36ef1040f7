"""Dtype names: the three compute dtypes memplan plans with, their sizes, and every spelling it reads.

One table for all of memplan: command-line flags, training configs (``"bfloat16"``), torch reprs
(``torch.bfloat16``) and live models all go through ``dtype_name``; ``memplan.measure`` turns the canonical
names into torch dtypes with ``TORCH_NAMES``.
"""

from __future__ import annotations

__all__ = ["DTYPES", "DTYPE_BYTES", "TORCH_NAMES", "dtype_name"]

DTYPES = ("fp16", "bf16", "fp32")
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# canonical name -> attribute of the torch module (torch.float16 ...)
TORCH_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# spellings in configs (transformers serialises torch_dtype as "bfloat16"), torch reprs and short forms
_SPELLINGS = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


def dtype_name(value) -> str | None:
    """``"bf16"`` for ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"BF16"``; None for a dtype
    memplan does not plan with (int8, float64, ``"auto"``)."""
    text = str(value).strip().lower().removeprefix("torch.")
    return _SPELLINGS.get(text)
