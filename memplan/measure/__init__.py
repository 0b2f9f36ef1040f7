"""The measurement wing: what memory a training step really uses, on fake tensors or real ones.

- ``tracker``: the live-storage ``MemoryTracker`` (exact, tensor level);
- ``build`` (+ ``quantize``, ``optimizer``, ``dtypes``): the one model builder, real or fake;
- ``step`` and ``recorder``: the one training-step loop and the one per-phase recorder;
- ``cuda_semantics`` and ``simulate``: a CUDA step simulated on fake CPU tensors;
- ``profile`` (+ ``sweep``, ``nvml``, ``environment``): real runs, recorded as ``runs.RunRecord``;
- ``validate``: estimate ÷ measured over run records and a simulated grid.

torch, transformers, peft and bitsandbytes (the ``profile`` extra) are imported by the modules that need them.
"""

import logging

# bitsandbytes 0.50 logs a warning when it imports on a CPU with AVX512-BF16 and the optional `kernels` package
# (a hub download of a faster 4-bit inference kernel) is missing (backends/cpu/ops.py). memplan never uses that
# kernel (training runs gemm_4bit's reference path), so the line is noise in every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
