"""The software and hardware a run happened on: versions, platform, the device (recorded with every run)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from .nvml import NvmlReader

__all__ = ["collect_environment", "package_versions"]

# Versions recorded with every run (distribution names for importlib.metadata).
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "rich", "numpy")
# Environment variables that change what the allocator / context does.
_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
             "CUBLAS_WORKSPACE_CONFIG", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _host_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def collect_environment(device: str, nvml: NvmlReader | None = None) -> tuple[dict, list[str]]:
    """Versions, platform and the device; any missing collector leaves its fields None and adds a note."""
    notes: list[str] = []
    env: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": _host_memory(),
        "memplan": None,
        "versions": {d: _version(d) for d in _PACKAGES},
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "device_kind": device,
        "device_name": None,
        "driver_version": None,
        "total_memory_bytes": None,
        "compute_capability": None,
        "cuda_version": None,
        "cudnn_version": None,
        "torch_threads": None,
    }
    try:
        from memplan import __version__

        env["memplan"] = __version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        env["versions"]["torch"] = torch.__version__  # includes the +cpu / +cu128 build tag
        env["torch_threads"] = torch.get_num_threads()
        env["cuda_version"] = torch.version.cuda
    except Exception as exc:  # noqa: BLE001
        notes.append(f"torch not importable: {exc}")
        return env, notes
    if device == "cpu":
        env["device_name"] = env["cpu"]
        env["total_memory_bytes"] = env["host_memory_bytes"]
        return env, notes
    try:
        props = torch.cuda.get_device_properties(0)
        env["device_name"] = props.name
        env["total_memory_bytes"] = int(props.total_memory)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["multiprocessor_count"] = getattr(props, "multi_processor_count", None)
        env["cudnn_version"] = torch.backends.cudnn.version()
    except Exception as exc:  # noqa: BLE001
        notes.append(f"CUDA device properties unavailable: {type(exc).__name__}: {exc}")
    own = nvml is None
    nvml = nvml or NvmlReader()
    try:
        env["driver_version"] = nvml.driver_version()
        if env["driver_version"] is None:
            notes.append(f"driver version unknown: {nvml.error or 'NVML gave none'}")
    finally:
        if own:
            nvml.close()
    return env, notes



def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change what a run allocates (distribution names)."""
    return {d: _version(d) for d in _PACKAGES}
