"""memplan's dtype names (``memplan.plan.dtypes``) as torch dtypes."""

from __future__ import annotations

import torch

from memplan.plan.dtypes import TORCH_NAMES

__all__ = ["torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bf16"`` (a canonical name: fp16, bf16, fp32)."""
    return getattr(torch, TORCH_NAMES[name])
