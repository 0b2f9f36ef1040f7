"""The card in this machine, as NVML describes it (``--gpu cuda``): name, memory and compute capability.

``pynvml`` (nvidia-ml-py) is imported inside ``nvml_device``: without it, without an NVIDIA driver or without a
visible GPU the answer is None, never an exception. ``memplan.catalog.gpus.detect_local_gpu`` matches the
answer against the catalog.
"""

from __future__ import annotations

import os

__all__ = ["nvml_device"]


def nvml_device() -> tuple[str, int, str] | None:
    """(NVML name, total bytes, compute capability) of the card CUDA will use first, or None."""
    try:
        import pynvml  # nvidia-ml-py: optional, only "--gpu cuda" needs it
    except Exception:  # not installed, or blocked (sys.modules['pynvml'] = None raises ImportError)
        return None
    try:
        pynvml.nvmlInit()  # loads libnvidia-ml.so: fails without an NVIDIA driver
    except Exception:
        return None
    try:
        # CUDA's first device is CUDA_VISIBLE_DEVICES' first entry. NVML counts in PCI bus order, which matches
        # CUDA's numbering only with CUDA_DEVICE_ORDER=PCI_BUS_ID or identical cards; UUIDs always match.
        # Anything else (empty = no GPU, MIG-..., -1) is not resolved here.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        first = visible.split(",")[0].strip() if visible is not None else "0"
        if first.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        elif first.startswith("GPU-"):
            handle = pynvml.nvmlDeviceGetHandleByUUID(first)
        else:
            return None
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older pynvml returns bytes
            name = name.decode()
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)  # = nvidia-smi memory.total
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return name, total, f"{major}.{minor}"
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
