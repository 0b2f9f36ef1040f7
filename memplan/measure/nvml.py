"""NVML and the CUDA context: what a GPU run holds beyond torch's allocator.

NVML sees what torch does not: the CUDA context (driver, kernels, cuBLAS handles) and CUDA managed memory
resident on the device (bitsandbytes' paged optimizers). It is device-wide, so other processes on the card are
included. ``pynvml`` (nvidia-ml-py) is imported lazily and every reading degrades to ``None``.

bitsandbytes paged memory (``paged_bytes``): bitsandbytes 0.50 allocates paged optimizer state with
``bitsandbytes.functional.get_paged`` -> ``lib.cget_managed_ptr`` (``cudaMallocManaged``) for parameters
with >= 1e5 values (``Optimizer8bit.get_state_buffer``), wraps the pointer with ``torch.frombuffer`` (so
torch sees a *CPU* tensor that its CUDA allocator does not count) and appends it to the process-wide list
``GlobalPageManager.get_instance().paged_tensors``. That list only grows and the managed memory is never
freed (there is no ``cudaFree`` for it in bitsandbytes 0.50), so a run's paged bytes are the ``nbytes`` of the
entries it added; sweeps on CUDA run every batch size in a fresh process (``memplan.measure.isolate``).
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["NvmlReader", "NvmlSampler", "measure_cuda_context", "paged_bytes", "paged_count"]

NVML_SAMPLE_SECONDS = 0.005


class NvmlReader:
    """NVML for the CUDA device this process uses (``cuda:0``); every reading degrades to ``None``.

    The handle is found without initialising CUDA (so the baseline before the context can be read): the first
    ``CUDA_VISIBLE_DEVICES`` entry is CUDA's device 0 (an index or a ``GPU-``/``MIG-`` UUID). NVML numbers cards
    in PCI order, which matches CUDA's only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or a single card, so
    ``verify_against_torch`` re-binds the handle by the UUID torch reports once CUDA is up.
    """

    def __init__(self) -> None:
        self.handle = None
        self.error: str | None = None
        self._nvml = None
        try:
            import pynvml  # nvidia-ml-py
        except Exception as exc:  # noqa: BLE001 - missing or blocked
            self.error = f"pynvml not importable ({type(exc).__name__}: {exc})"
            return
        try:
            pynvml.nvmlInit()  # loads libnvidia-ml.so: fails without an NVIDIA driver
        except Exception as exc:  # noqa: BLE001
            self.error = f"NVML unavailable ({type(exc).__name__}: {exc})"
            return
        self._nvml = pynvml
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            first = visible.split(",")[0].strip() if visible is not None else "0"
            if first.isdigit():
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
            elif first.startswith(("GPU-", "MIG-")):
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(first)
            else:
                self.error = f"cannot map CUDA_VISIBLE_DEVICES={visible!r} to an NVML device"
        except Exception as exc:  # noqa: BLE001
            self.error = f"NVML device lookup failed ({type(exc).__name__}: {exc})"

    @property
    def ok(self) -> bool:
        return self.handle is not None

    def verify_against_torch(self, index: int = 0) -> str | None:
        """Re-bind the handle to the UUID torch reports for ``cuda:index``; a note when they differed."""
        if self._nvml is None:
            return None
        try:
            import torch

            uuid = str(torch.cuda.get_device_properties(index).uuid)
            want = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            have = self._nvml.nvmlDeviceGetUUID(self.handle) if self.handle is not None else None
            if isinstance(have, bytes):
                have = have.decode()
            if have != want:
                self.handle = self._nvml.nvmlDeviceGetHandleByUUID(want)
                return f"NVML device re-bound to torch's cuda:{index} ({want}); readings before that were of {have}"
        except Exception as exc:  # noqa: BLE001 - older torch without .uuid, MIG quirks
            return f"could not check the NVML device against torch ({type(exc).__name__}: {exc})"
        return None

    def used(self) -> int | None:
        """Device memory in use (all processes), bytes: ``nvmlDeviceGetMemoryInfo(h).used``."""
        if self.handle is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:  # noqa: BLE001
            return None

    def process_used(self, pid: int | None = None) -> int | None:
        """This process's device memory as NVML accounts it (context + allocations), or None when NVML does not
        list the pid (containers with their own pid namespace, or no permission)."""
        if self.handle is None:
            return None
        pid = os.getpid() if pid is None else pid
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except Exception:  # noqa: BLE001
            return None
        return None

    def driver_version(self) -> str | None:
        if self._nvml is None:
            return None
        try:
            v = self._nvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # noqa: BLE001
            return None

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()  # reference counted by NVML
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None
            self.handle = None


class NvmlSampler:
    """A daemon thread polling NVML used memory; ``window()`` returns the highest value since the last call.

    Phase-end readings miss short spikes inside a phase (a backward's temporaries); polling every 5 ms catches
    most of them. NVML calls release the GIL, so the thread barely slows the run.
    """

    def __init__(self, nvml: NvmlReader, interval: float = NVML_SAMPLE_SECONDS):
        self._nvml = nvml
        self._interval = interval
        self._lock = threading.Lock()
        self._max: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memplan-nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._note(self._nvml.used())

    def _note(self, v: int | None) -> None:
        if v is None:
            return
        with self._lock:
            if self._max is None or v > self._max:
                self._max = v

    def window(self, final: int | None = None) -> int | None:
        self._note(final)
        with self._lock:
            m, self._max = self._max, final
        return m

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


_CONTEXT_CACHE: dict[str, dict] = {}  # one measurement per process: the context exists once


def measure_cuda_context(nvml: NvmlReader | None = None) -> tuple[dict, list[str]]:
    """Measure the CUDA context of this process on ``cuda:0`` (once per process; later calls return the first).

    Returns ``({"cuda_context_bytes", "nvml_baseline_bytes", "method", "device_diff_bytes"}, notes)``; values are
    None (with a note)
    when NVML or CUDA is missing. Must run before anything else allocates on CUDA to be exact: when torch had
    already initialised CUDA and NVML cannot report this process, the context is recorded as unknown.
    """
    if "cuda:0" in _CONTEXT_CACHE:
        return dict(_CONTEXT_CACHE["cuda:0"]), ["CUDA context measured earlier in this process (reused)"]
    notes: list[str] = []
    out = {"cuda_context_bytes": None, "nvml_baseline_bytes": None, "method": None, "device_diff_bytes": None}
    try:
        import torch

        if not torch.cuda.is_available():
            notes.append("CUDA context not measured: torch.cuda.is_available() is False")
            return out, notes
        own = nvml is None
        nvml = nvml or NvmlReader()
        try:
            # Did this process already have its context (then the baseline includes it)? torch's driver-API probe
            # (cuDevicePrimaryCtxGetState, creates nothing) where available; else "torch initialised CUDA".
            existed = _primary_context_exists(0)
            was_initialized = torch.cuda.is_initialized() if existed is None else existed
            baseline = nvml.used()  # before this process creates its context (if it has not yet)
            probe = _touch_cuda()
            note = nvml.verify_against_torch(0)
            if note:
                notes.append(note)
                baseline = None  # it was read on another card
            used, proc = nvml.used(), nvml.process_used()
            reserved = torch.cuda.memory_reserved(0)
            del probe
            device_diff = (used - baseline - reserved
                           if used is not None and baseline is not None and not was_initialized else None)
            out["device_diff_bytes"] = device_diff  # kept for comparison when both methods work
            if proc is not None:  # immune to other processes allocating meanwhile
                out.update(cuda_context_bytes=proc - reserved, method="nvml process used - torch reserved")
            elif device_diff is not None:
                out.update(cuda_context_bytes=device_diff, method="nvml device used - baseline - torch reserved")
            elif not nvml.ok:
                notes.append(f"CUDA context not measured: {nvml.error}")
            else:
                notes.append("CUDA context not measured: this process had a CUDA context before memplan could read "
                             "the baseline, and NVML does not report this process")
            out["nvml_baseline_bytes"] = baseline if not was_initialized else None
        finally:
            if own:
                nvml.close()
    except Exception as exc:  # noqa: BLE001 - a collector must never crash the run
        notes.append(f"CUDA context not measured: {type(exc).__name__}: {exc}")
        return out, notes
    if out["cuda_context_bytes"] is not None:
        _CONTEXT_CACHE["cuda:0"] = dict(out)
    return out, notes


def _touch_cuda():
    """Create the primary context on cuda:0 the way any first use does: torch's lazy init + one allocation.
    Returns the 1-element tensor (its 512-byte block makes the allocator reserve one 2 MiB segment)."""
    import torch

    torch.cuda.init()
    t = torch.empty(1, device="cuda:0")
    torch.cuda.synchronize(0)
    return t


def _primary_context_exists(index: int = 0) -> bool | None:
    """Whether cuda:index already has this process's primary context; None when torch cannot tell."""
    try:
        import torch

        probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)  # CUDA builds (torch/csrc/cuda/Module.cpp)
        return bool(probe(index)) if probe is not None else None
    except Exception:  # noqa: BLE001
        return None


def paged_bytes(since: int = 0) -> int | None:
    """Bytes of bitsandbytes paged (CUDA managed) tensors created after the first ``since`` entries of
    ``GlobalPageManager.paged_tensors``; None when bitsandbytes is not loaded or has no page manager."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        import bitsandbytes.functional as bnbf

        tensors = bnbf.GlobalPageManager.get_instance().paged_tensors
        return int(sum(t.nbytes for t in tensors[since:]))
    except Exception:  # noqa: BLE001
        return None


def paged_count() -> int:
    if "bitsandbytes" not in sys.modules:
        return 0
    try:
        import bitsandbytes.functional as bnbf

        return len(bnbf.GlobalPageManager.get_instance().paged_tensors)
    except Exception:  # noqa: BLE001
        return 0
