"""The runtime terms: what a CUDA training process holds beyond its tensors.

No tensor tracker sees these, so ``memplan simulate`` leaves them out and the analytic estimate adds them
(``estimate_for(..., include_runtime=False)`` leaves them out too). They are documented defaults until GPU
runs calibrate them (docs/memory-model.md, "Runtime terms").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.catalog.gpus import GENERIC_CUDA_CONTEXT_BYTES

if TYPE_CHECKING:
    from memplan.catalog.gpus import GPUSpec

__all__ = ["CUDA_BLOCK_BYTES", "CUBLAS_WORKSPACE_BYTES", "ALLOCATOR_OVERHEAD_FRACTION", "cuda_context_bytes"]

# CUDA caching allocator: every block is a multiple of 512 bytes (c10/cuda/CUDACachingAllocator.cpp,
# kMinBlockSize = 512); applied to the many small quantization-state tensors, where it matters.
CUDA_BLOCK_BYTES = 512
# cuBLAS workspace that torch allocates through the caching allocator on the first matmul and keeps:
# default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" = 2 x 4096 KiB + 8 x 16 KiB
# (aten/src/ATen/cuda/CublasHandlePool.cpp, getChunkWorkspaceSize). Hopper may use more.
CUBLAS_WORKSPACE_BYTES = 2 * 4096 * 1024 + 8 * 16 * 1024
# Reserved-minus-allocated share of the memory that changes during the step (activations, logits,
# gradients, temporaries). The allocator rounds large blocks up to 2 MiB and cannot always reuse freed
# blocks for larger requests; 5% is a documented default, not a measurement (issue: GPU calibration).
ALLOCATOR_OVERHEAD_FRACTION = 0.05


def cuda_context_bytes(gpu: GPUSpec | None) -> int:
    """The card's CUDA context (its family's default in profiles/gpus.json), or the generic one without a card."""
    return gpu.cuda_context_bytes if gpu is not None else GENERIC_CUDA_CONTEXT_BYTES
