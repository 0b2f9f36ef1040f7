"""Instrumented real training runs: build the model a user's training script would, run real steps, and
record per-phase memory peaks as a ``RunRecord`` (``memplan/runs.py``).

What is measured, and how exact it is:

- **Tensor level, every device** (``tensor_peak_bytes``): ``memplan.tracker.MemoryTracker``, a
  ``TorchDispatchMode`` that follows every live tensor storage. On CPU it is exact and deterministic (it matches
  ``torch.distributed._tools.mem_tracker.MemTracker`` to the byte and a fake-tensor simulation of the same step,
  ``shared/notes/feasibility.md`` §5); process RSS is useless for this and is not recorded. On CUDA the
  tracker rounds every storage to 512 bytes, as the caching allocator does.
  The model is built **outside** the tracker (transformers' loader, bitsandbytes' quantization) and then
  registered, so the ``load`` phase's tensor figures are what is alive after loading; load-time transients are
  seen only by the CUDA allocator counters.
- **CUDA allocator** (CUDA runs): ``torch.cuda.reset_peak_memory_stats()`` before every phase, then
  ``memory_stats()``: ``allocated_bytes.all.peak`` (= ``max_memory_allocated``), ``reserved_bytes.all.peak``
  (= ``max_memory_reserved``), ``active_bytes.all.peak``, and the increase of the cumulative counters
  ``num_alloc_retries`` (the allocator had to free its cache and retry: fragmentation pressure) and ``num_ooms``.
- **NVML** (CUDA runs, ``pynvml`` imported lazily): device used memory at the end of each phase and the highest
  value a 5 ms background sampler saw during it. NVML sees what torch does not: the CUDA context (driver,
  kernels, cuBLAS handles) and CUDA managed memory resident on the device (bitsandbytes' paged optimizers).
  It is device-wide, so other processes on the card are included; ``peak.nvml_baseline_bytes`` is what was in
  use before this process touched CUDA.
- **CUDA context** (``peak.cuda_context_bytes``): measured once per process, before the first tensor: NVML used
  memory after ``torch.cuda.init()`` and a 1-element allocation, minus the baseline and minus torch's reserved
  bytes (the per-process NVML figure is preferred when NVML reports it for this pid). Kernels loaded lazily
  later (``CUDA_MODULE_LOADING=LAZY``, the default since CUDA 11.7) grow the context during the run; compare
  ``nvml_used_bytes - max_reserved_bytes - paged_bytes`` per phase to see it.
- **bitsandbytes paged memory** (``paged_bytes``): bitsandbytes 0.50 allocates paged optimizer state with
  ``bitsandbytes.functional.get_paged`` -> ``lib.cget_managed_ptr`` (``cudaMallocManaged``) for parameters
  with >= 1e5 values (``Optimizer8bit.get_state_buffer``), wraps the pointer with ``torch.frombuffer`` (so
  torch sees a *CPU* tensor that its CUDA allocator does not count) and appends it to the process-wide list
  ``GlobalPageManager.get_instance().paged_tensors``. That list only grows and the managed memory is never
  freed (there is no ``cudaFree`` for it in bitsandbytes 0.50), so ``paged_bytes`` is the sum of ``nbytes`` of
  the entries a run added, and sweeps on CUDA run every batch size in a fresh process by default
  (``isolate``). On CPU, paged optimizers fall back to ordinary tensors (``get_state_buffer`` warns) and
  ``paged_bytes`` is null.

An out-of-memory error is a result, not a failure: the record gets outcome ``"oom"``, the phase and step it
happened in, and everything measured until then. Any other exception gives outcome ``"error"`` (still a
record). Ctrl-C gives a record with outcome ``"interrupted"`` carried by ``RunInterrupted`` (a
``KeyboardInterrupt``), which ``profile_sweep`` saves before re-raising.

Heavy imports (torch, transformers, peft, bitsandbytes, pynvml, rich) happen inside the functions.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .errors import MemplanError
from .fileio import write_atomic
from .runs import RunRecord, save_run

__all__ = [
    "ProfileError",
    "RunInterrupted",
    "profile_run",
    "profile_sweep",
    "default_batch_sizes",
    "collect_environment",
    "measure_cuda_context",
    "paged_bytes",
    "is_oom_error",
    "NvmlReader",
    "build_hf_model",
]

# Versions recorded with every run (distribution names for importlib.metadata).
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py", "rich", "numpy")
# Environment variables that change what the allocator / context does.
_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
             "CUBLAS_WORKSPACE_CONFIG", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS")
DEFAULT_MAX_BATCH = 256
_NVML_SAMPLE_SECONDS = 0.005
# Messages of CPU allocation failures (c10/core/impl/alloc_cpu.cpp: "DefaultCPUAllocator: can't allocate
# memory: you tried to allocate N bytes") and of CUDA ones that arrive as plain RuntimeError (cuBLAS / cuDNN
# workspace allocation, bitsandbytes' own cudaMalloc checks).
_OOM_MESSAGES = ("can't allocate memory", "could not allocate", "cannot allocate memory", "out of memory",
                 "not enough memory", "cublas_status_alloc_failed")


class ProfileError(MemplanError):
    """A profile that cannot start: no CUDA device, a bad argument."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``profile_run``; ``record`` is the run with outcome ``"interrupted"`` and the phases
    measured so far. It is a ``KeyboardInterrupt``, so callers that only know that still stop."""

    def __init__(self, record: RunRecord):
        super().__init__("interrupted")
        self.record = record


def is_oom_error(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (= ``torch.cuda.OutOfMemoryError``), or a RuntimeError whose message says an
    allocation failed (the CPU allocator raises plain RuntimeError)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - profiler needs torch anyway
        pass
    if isinstance(exc, (RuntimeError, MemoryError)):
        if isinstance(exc, MemoryError):
            return True
        msg = str(exc).lower()
        return any(m in msg for m in _OOM_MESSAGES)
    return False


# ================================================================================================ NVML
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


class _NvmlSampler:
    """A daemon thread polling NVML used memory; ``window()`` returns the highest value since the last call.

    Phase-end readings miss short spikes inside a phase (a backward's temporaries); polling every 5 ms catches
    most of them. NVML calls release the GIL, so the thread barely slows the run.
    """

    def __init__(self, nvml: NvmlReader, interval: float = _NVML_SAMPLE_SECONDS):
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


# ================================================================================================ CUDA context
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


def _paged_count() -> int:
    if "bitsandbytes" not in sys.modules:
        return 0
    try:
        import bitsandbytes.functional as bnbf

        return len(bnbf.GlobalPageManager.get_instance().paged_tensors)
    except Exception:  # noqa: BLE001
        return 0


# ================================================================================================ environment
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
        from . import __version__

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


# ================================================================================================ the model
def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _hf_config(spec, setup):
    """A transformers config from the spec's config.json values: no download, no remote code."""
    from transformers import AutoConfig

    values = {k: v for k, v in dict(spec.config).items()
              if k not in ("quantization_config", "auto_map", "_name_or_path", "transformers_version")}
    model_type = values.pop("model_type", spec.model_type)
    cfg = AutoConfig.for_model(model_type, **values)
    cfg.use_cache = False  # trainers do; otherwise the forward keeps a KV cache (feasibility.md §4)
    return cfg


def _auto_class(spec):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if spec.is_causal_lm else AutoModelForMaskedLM


def _enable_grad_ckpt(model) -> None:
    # transformers 5 renamed it (activation_checkpointing_enable; default use_reentrant=False); the old name is
    # a deprecated alias that warns.
    fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    fn()


def build_hf_model(setup, spec, device: str, *, seed: int = 0):
    """The model a user's training script builds for ``setup``, randomly initialised, on ``device``.

    - 16/32 bits: ``from_config`` directly on the device, in the weight dtype;
    - 4/8 bits: the real bitsandbytes path: ``save_pretrained`` of a random model to a temporary folder, then
      ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...), device_map=...)``
      (feasibility.md §2). This materialises the whole float model in host RAM first, fine for the small models
      profiled here; 13B+ on a GPU box would need layer-by-layer materialisation (a later issue);
    - ``prepare_model_for_kbit_training`` when ``upcast_non_quantized`` (its fp32 upcast), which also enables
      gradient checkpointing the way peft does;
    - peft LoRA (``autocast_adapter_dtype`` keeps fp32 adapters; other adapter dtypes are cast explicitly);
    - gradient checkpointing with transformers' default (non-reentrant).
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars would garble the CLI
    try:
        return _build_hf_model(setup, spec, device, seed)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _build_hf_model(setup, spec, device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    cfg = _hf_config(spec, setup)
    auto = _auto_class(spec)
    weight_dtype = torch.float32 if setup.bits == 32 else _torch_dtype(setup.dtype)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if setup.bits in (16, 32):
        with dev:
            model = auto.from_config(cfg, dtype=weight_dtype, attn_implementation=setup.attn)
    else:
        from transformers import BitsAndBytesConfig

        if setup.bits == 4:
            qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=setup.quant_type,
                                      bnb_4bit_use_double_quant=setup.double_quant,
                                      bnb_4bit_compute_dtype=_torch_dtype(setup.dtype))
        else:
            qcfg = BitsAndBytesConfig(load_in_8bit=True)
        with tempfile.TemporaryDirectory(prefix="memplan-model-") as tmp:
            with torch.device("cpu"):
                float_model = auto.from_config(cfg, dtype=weight_dtype, attn_implementation=setup.attn)
            float_model.save_pretrained(tmp)
            del float_model
            gc.collect()
            model = auto.from_pretrained(tmp, quantization_config=qcfg, dtype=weight_dtype,
                                         attn_implementation=setup.attn,
                                         device_map={"": 0} if device == "cuda" else "cpu")
        model.config.use_cache = False
        if setup.upcast_non_quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_ckpt)
    if setup.grad_ckpt and not (setup.bits in (4, 8) and setup.upcast_non_quantized):
        _enable_grad_ckpt(model)

    if setup.trains_lora:
        from peft import LoraConfig, get_peft_model

        from .build import lora_target_arg

        torch.manual_seed(seed + 1)
        lcfg = LoraConfig(r=setup.rank, lora_alpha=setup.alpha, lora_dropout=setup.lora_dropout,
                          target_modules=lora_target_arg(spec, setup.targets),
                          task_type="CAUSAL_LM" if spec.is_causal_lm else None)
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=setup.adapter_dtype == "fp32")
        if setup.adapter_dtype != "fp32":
            adt = _torch_dtype(setup.adapter_dtype)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(adt)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def _model_info(spec, model) -> dict:
    """Parameter counts of the built model. Quantized weights count their logical values (a 4-bit
    ``Params4bit`` stores two per byte: its ``quant_state.shape``)."""
    total = trainable = quantized = param_bytes = 0
    for p in model.parameters():
        kind = type(p).__name__
        qs = getattr(p, "quant_state", None)
        if kind == "Params4bit" and qs is not None and getattr(qs, "shape", None) is not None:
            n = int(qs.shape.numel())
        else:
            n = p.numel()
        total += n
        if kind in ("Params4bit", "Int8Params"):
            quantized += n
        if p.requires_grad:
            trainable += n
        param_bytes += p.untyped_storage().nbytes()
    buffer_bytes = sum(b.untyped_storage().nbytes() for b in model.buffers())
    return {"name": spec.name, "model_type": spec.model_type, "hf_id": spec.hf_id, "params_total": total,
            "params_trainable": trainable, "params_quantized": quantized, "param_bytes": param_bytes,
            "buffer_bytes": buffer_bytes, "spec_params_total": spec.total_params()}


def _register_model(tracker, model) -> None:
    """Tell the tracker what loading made: weights, packed quantized weights, their quantization constants,
    LoRA parameters (the trainable ones) and buffers."""
    import torch

    for p in model.parameters():
        kind = type(p).__name__
        if kind in ("Params4bit", "Int8Params"):
            tracker.register(p, "quantized_weights")
            qs = getattr(p, "quant_state", None)
            for t in _quant_state_tensors(qs):
                tracker.register(t, "quant_constants")
            scb = getattr(p, "SCB", None)
            if isinstance(scb, torch.Tensor):
                tracker.register(scb, "quant_constants")
        elif p.requires_grad and getattr(model, "peft_config", None):
            tracker.register(p, "lora_params")
        else:
            tracker.register(p, "weights")
    for b in model.buffers():
        tracker.register(b, "weights")
    for m in model.modules():  # bnb Linear8bitLt keeps int8 copies / scales in its MatmulLtState
        st = getattr(m, "state", None)
        if st is not None and type(st).__name__ == "MatmulLtState":
            for attr in ("CB", "SCB"):
                t = getattr(st, attr, None)
                if isinstance(t, torch.Tensor):
                    tracker.register(t, "quant_constants")


def _quant_state_tensors(qs) -> list:
    import torch

    out = []
    seen = set()
    while qs is not None and id(qs) not in seen:
        seen.add(id(qs))
        for attr in ("absmax", "code", "offset"):
            t = getattr(qs, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        qs = getattr(qs, "state2", None)
    return out


# ================================================================================================ measurement
class _PhaseTracker:
    """Factory for a ``MemoryTracker`` that also reports the peak of each phase *instance* (the tracker's own
    ``phase_peaks`` is the maximum over all steps). The window peak can only rise when a storage is recorded, so
    wrapping ``_record`` is enough; if a future tracker renames it, per-phase peaks degrade to None."""

    @staticmethod
    def create(round_to: int, vocab_size: int | None):
        from .tracker import MemoryTracker

        class Tracker(MemoryTracker):
            window_ok = hasattr(MemoryTracker, "_record")

            def __init__(self, **kw):
                super().__init__(**kw)
                self.window_peak = 0

            def start_window(self) -> None:
                self.window_peak = self.current_bytes

            if window_ok:
                def _record(self, *args, **kwargs):  # every new storage passes here (see the class docstring)
                    idx = super()._record(*args, **kwargs)
                    cur = self.current_bytes
                    if cur > self.window_peak:
                        self.window_peak = cur
                    return idx

        return Tracker(round_to=round_to, vocab_size=vocab_size)


class _Meter:
    """Per-phase collection: the tracker window, CUDA allocator stats, NVML, paged bytes, and an optional
    emulated memory budget."""

    def __init__(self, tracker, device: str, nvml: NvmlReader | None, sampler: _NvmlSampler | None,
                 paged_start: int, budget: int | None):
        self.tracker = tracker
        self.device = device
        self.nvml = nvml
        self.sampler = sampler
        self.paged_start = paged_start
        self.budget = budget
        self.phases: list[dict] = []
        self.failed_at: tuple[str, int | None] | None = None
        self.notes: list[str] = []
        self._cuda_broken = False

    # -- CUDA allocator ----------------------------------------------------------------------------------
    def _cuda_begin(self) -> dict:
        if self.device != "cuda" or self._cuda_broken:
            return {}
        try:
            import torch

            torch.cuda.synchronize(0)
            torch.cuda.reset_peak_memory_stats(0)
            s = torch.cuda.memory_stats(0)
            return {"retries": s.get("num_alloc_retries", 0), "ooms": s.get("num_ooms", 0)}
        except Exception as exc:  # noqa: BLE001
            self._cuda_broken = True
            self.notes.append(f"CUDA allocator statistics unavailable: {type(exc).__name__}: {exc}")
            return {}

    def _cuda_end(self, entry: dict, before: dict) -> None:
        if self.device != "cuda" or self._cuda_broken:
            return
        try:
            import torch

            try:
                torch.cuda.synchronize(0)
            except Exception:  # noqa: BLE001 - after a failed kernel; the counters are still readable
                pass
            s = torch.cuda.memory_stats(0)
            entry.update(
                max_allocated_bytes=s.get("allocated_bytes.all.peak"),
                max_reserved_bytes=s.get("reserved_bytes.all.peak"),
                max_active_bytes=s.get("active_bytes.all.peak"),
                end_allocated_bytes=s.get("allocated_bytes.all.current"),
                end_reserved_bytes=s.get("reserved_bytes.all.current"),
                num_alloc_retries=s.get("num_alloc_retries", 0) - before.get("retries", 0),
                num_ooms=s.get("num_ooms", 0) - before.get("ooms", 0),
            )
        except Exception as exc:  # noqa: BLE001
            self._cuda_broken = True
            self.notes.append(f"CUDA allocator statistics unavailable: {type(exc).__name__}: {exc}")

    # -- one phase ---------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, step: int | None):
        entry: dict = {"name": name, "step": step, "completed": False, "seconds": None,
                       "tensor_peak_bytes": None, "tensor_end_bytes": None,
                       "max_allocated_bytes": None, "max_reserved_bytes": None, "max_active_bytes": None,
                       "end_allocated_bytes": None, "end_reserved_bytes": None,
                       "num_alloc_retries": None, "num_ooms": None,
                       "nvml_used_bytes": None, "nvml_peak_used_bytes": None, "paged_bytes": None}
        before = self._cuda_begin()
        if self.sampler is not None:
            self.sampler.window()  # drop what the previous phase saw
        if self.tracker is not None:
            self.tracker.start_window()
        tracker_phase = self.tracker.phase(name) if (self.tracker is not None and name != "load") else nullcontext()
        t0 = time.perf_counter()
        try:
            with tracker_phase:
                yield entry
            entry["completed"] = True
        except BaseException:
            self.failed_at = (name, step)
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 6)
            self._cuda_end(entry, before)
            if self.tracker is not None:
                entry["tensor_peak_bytes"] = self.tracker.window_peak if self.tracker.window_ok else None
                entry["tensor_end_bytes"] = self.tracker.current_bytes
            if self.device == "cuda":
                used = self.nvml.used() if self.nvml is not None else None
                entry["nvml_used_bytes"] = used
                entry["nvml_peak_used_bytes"] = self.sampler.window(used) if self.sampler is not None else used
                entry["paged_bytes"] = paged_bytes(self.paged_start)
            self.phases.append(entry)
        self._check_budget(entry)

    def _check_budget(self, entry: dict) -> None:
        """Emulated out-of-memory: a tensor-level budget (CPU runs standing in for a smaller card)."""
        peak = entry.get("tensor_peak_bytes")
        if self.budget is not None and peak is not None and peak > self.budget:
            import torch

            self.failed_at = (entry["name"], entry["step"])
            raise torch.OutOfMemoryError(
                f"emulated out of memory: the tensor peak of {entry['name']} ({peak} bytes) exceeds the budget of "
                f"{self.budget} bytes (tensor_budget_bytes)")


def _summarize(record: RunRecord, meter: _Meter | None, tracker, context: dict) -> None:
    """Fill ``record.peak`` from the phases and the tracker result."""
    peak: dict = {"tensor_peak_bytes": None, "peak_phase": None, "peak_step": None, "peak_estimate_phase": None,
                  "components": None, "estimate_phase_peaks": None, "final_bytes": None,
                  "max_allocated_bytes": None, "max_reserved_bytes": None, "max_active_bytes": None,
                  "nvml_used_bytes": None, "nvml_baseline_bytes": context.get("nvml_baseline_bytes"),
                  "cuda_context_bytes": context.get("cuda_context_bytes"),
                  "cuda_context_method": context.get("method"), "paged_bytes": None}
    phases = meter.phases if meter is not None else []
    record.phases = phases
    if tracker is not None:
        try:
            res = tracker.result()
            peak.update(tensor_peak_bytes=res.peak_bytes, peak_phase=res.peak_phase, peak_step=res.peak_step,
                        peak_estimate_phase=res.peak_estimate_phase or None, components=dict(res.peak_components),
                        estimate_phase_peaks=dict(res.estimate_phase_peaks), final_bytes=res.final_bytes)
        except Exception as exc:  # noqa: BLE001
            record.notes.append(f"tracker result unavailable: {type(exc).__name__}: {exc}")
    # the phase entry holding the tensor peak (by value): a clearer "where" than the tracker's phase name
    tp = [p for p in phases if p.get("tensor_peak_bytes") is not None]
    if tp and peak["tensor_peak_bytes"] is not None:
        best = max(tp, key=lambda p: p["tensor_peak_bytes"])
        if best["tensor_peak_bytes"] == peak["tensor_peak_bytes"]:
            peak["peak_phase"], peak["peak_step"] = best["name"], best["step"]

    def _max(key):
        vals = [p[key] for p in phases if p.get(key) is not None]
        return max(vals) if vals else None

    peak["max_allocated_bytes"] = _max("max_allocated_bytes")
    peak["max_reserved_bytes"] = _max("max_reserved_bytes")
    peak["max_active_bytes"] = _max("max_active_bytes")
    peak["nvml_used_bytes"] = _max("nvml_peak_used_bytes") or _max("nvml_used_bytes")
    peak["paged_bytes"] = _max("paged_bytes")
    record.peak = peak


# ================================================================================================ one run
def _resolve(setup, device: str, profiles_dir):
    from .gpus import detect_local_gpu
    from .models import load_model
    from .setups import resolve_setup

    spec = load_model(setup.model, profiles_dir=profiles_dir)
    gpu = None
    if device == "cuda":
        gpu = detect_local_gpu(profiles_dir=profiles_dir)
        if gpu is None and setup.dtype is None and setup.bits != 32:
            import torch  # no NVML: ask torch whether the card does bf16

            setup = setup.with_(dtype="bf16" if torch.cuda.is_bf16_supported() else "fp16")
    resolved = resolve_setup(setup, spec, gpu)
    if device == "cpu":
        resolved = resolved.with_(gpu=None)
    return spec, resolved


def _check_args(device: str, steps: int, gpu_memory_fraction, tensor_budget_bytes) -> None:
    if device not in ("cpu", "cuda"):
        raise ProfileError(f"invalid device {device!r}; allowed: cpu, cuda")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ProfileError(f"invalid steps {steps!r}; must be an integer >= 1")
    if gpu_memory_fraction is not None:
        if device != "cuda":
            raise ProfileError("the GPU memory fraction (gpu_memory_fraction / --memory-fraction) applies to "
                               "device cuda only; on cpu, tensor_budget_bytes emulates a smaller card")
        if not 0.0 < float(gpu_memory_fraction) <= 1.0:
            raise ProfileError(f"invalid gpu_memory_fraction {gpu_memory_fraction!r}; must be in (0, 1]")
    if tensor_budget_bytes is not None and (not isinstance(tensor_budget_bytes, int) or tensor_budget_bytes < 1):
        raise ProfileError(f"invalid tensor_budget_bytes {tensor_budget_bytes!r}; must be a positive integer")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch finds no usable CUDA device")
            raise ProfileError(f"device cuda requested but {why} (torch {torch.__version__}); use --device cpu")


def _train_steps(model, opt, tracker, meter: _Meter, spec, setup, device: str, steps: int, autocast) -> int:
    """``steps`` training steps as ``transformers.Trainer`` runs them, with the batch and loss protocol of
    ``memplan.trace`` (shared so that a CPU run and its simulation are the same computation): a fresh batch per
    step (``input_ids`` plus the collator's ``labels`` copy), ``loss = model(**batch).loss`` (the output object
    with the logits is dropped), ``loss.backward()``, ``optimizer.step()`` then ``zero_grad(set_to_none=True)``
    (one phase: zero_grad allocates nothing). Returns the number of completed steps."""
    from .trace import forward_loss, make_batch

    done = 0
    for step in range(1, steps + 1):
        batch = make_batch(spec, setup, device="cuda:0" if device == "cuda" else "cpu")
        for t in batch.values():
            tracker.register(t, "inputs")
        with meter.phase("forward", step):
            with autocast():
                loss = forward_loss(model, batch)
        with meter.phase("backward", step):
            loss.backward()
        del loss  # Trainer.training_step returns loss.detach(): the graph dies with the step's loss
        with meter.phase("optimizer_step", step):
            opt.step()
            opt.zero_grad(set_to_none=True)
        del batch
        done = step
    return done


def profile_run(setup, *, device: str = "cpu", steps: int = 3, gpu_memory_fraction: float | None = None,
                tensor_budget_bytes: int | None = None, profiles_dir=None, seed: int = 0,
                out_dir: str | os.PathLike | None = None) -> RunRecord:
    """Run ``steps`` real training steps of ``setup`` on ``device`` and return the record.

    ``setup`` is a ``TrainSetup`` (resolved here: bad values raise ``InvalidSetupError`` before anything runs).
    ``gpu_memory_fraction`` caps the CUDA caching allocator (``torch.cuda.set_per_process_memory_fraction``) to
    emulate a smaller card. ``tensor_budget_bytes`` emulates a card on any device: a phase whose tracked tensor
    peak exceeds it ends the run as an out-of-memory result (checked at the end of each phase).
    With ``out_dir`` the record is also saved there (atomically), whatever the outcome, interrupted included.

    Raises ``ProfileError`` for arguments that cannot run (device cuda without CUDA), ``RunInterrupted`` (a
    KeyboardInterrupt carrying the partial record) on Ctrl-C. Out of memory and other failures are returned as
    records with outcome ``"oom"`` / ``"error"``.
    """
    _check_args(device, steps, gpu_memory_fraction, tensor_budget_bytes)
    spec, resolved = _resolve(setup, device, profiles_dir)
    t_start = time.perf_counter()

    import torch

    from .build import make_optimizer

    record = RunRecord(outcome="ok", setup=resolved.to_dict(), device=device, steps=steps)
    record.model = {"name": spec.name, "model_type": spec.model_type, "hf_id": spec.hf_id}
    notes = record.notes
    nvml = sampler = None
    context: dict = {}
    meter = tracker = model = opt = trainable = None
    interrupted: BaseException | None = None
    try:
        if device == "cuda":
            nvml = NvmlReader()
            context, ctx_notes = measure_cuda_context(nvml)  # first: before any tensor of ours
            notes += ctx_notes
            if gpu_memory_fraction is not None:
                torch.cuda.set_per_process_memory_fraction(float(gpu_memory_fraction), 0)
                notes.append(f"CUDA caching allocator capped at {gpu_memory_fraction} of the card")
            gc.collect()
            torch.cuda.empty_cache()
            if nvml.ok:
                sampler = _NvmlSampler(nvml)
            else:
                notes.append(f"NVML readings unavailable: {nvml.error}")
        record.environment, env_notes = collect_environment(device, nvml)
        notes += env_notes
        _device_notes(resolved, device, notes)

        tracker = _PhaseTracker.create(round_to=512 if device == "cuda" else 1, vocab_size=spec.vocab_size)
        if not tracker.window_ok:
            notes.append("per-phase tensor peaks unavailable (tracker API changed); the run peak is still exact")
        meter = _Meter(tracker, device, nvml, sampler, _paged_count(), tensor_budget_bytes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with meter.phase("load", None):
                    model = build_hf_model(resolved, spec, device, seed=seed)
                    record.model = _model_info(spec, model)
                    _register_model(tracker, model)
                trainable = [p for p in model.parameters() if p.requires_grad]
                opt = make_optimizer(resolved, trainable)  # memplan.build's: what HF Trainer builds
                tracker.watch_gradients(trainable)
                tracker.watch_optimizer(opt)
                autocast = _autocast_factory(resolved, device)
                torch.manual_seed(seed + 2)  # the batches' token ids (values do not change memory)
                with tracker:
                    record.steps_completed = _train_steps(model, opt, tracker, meter, spec, resolved, device,
                                                          steps, autocast)
            finally:
                _keep_warnings(caught, notes)
    except KeyboardInterrupt as exc:
        interrupted = exc
        _fail(record, meter, "interrupted", exc)
    except Exception as exc:  # noqa: BLE001 - every failure of the run is a result
        _fail(record, meter, "oom" if is_oom_error(exc) else "error", exc)
    finally:
        try:
            if sampler is not None:
                sampler.stop()
            if meter is not None:
                notes += [n for n in meter.notes if n not in notes]
            _summarize(record, meter, tracker, context)
            record.wall_seconds = round(time.perf_counter() - t_start, 3)
        finally:
            # drop every reference to the model's tensors before releasing cached memory (a sweep's next run)
            del model, opt, trainable
            tracker = meter = None
            _release_memory(device)
            if gpu_memory_fraction is not None:
                try:  # the cap is process-wide: lift it so that a later run in this process is not limited
                    torch.cuda.set_per_process_memory_fraction(1.0, 0)
                except Exception:  # noqa: BLE001
                    pass
            if nvml is not None:
                nvml.close()
    if out_dir is not None:
        save_run(record, out_dir)
    if interrupted is not None:
        raise RunInterrupted(record) from interrupted
    return record


def _autocast_factory(setup, device: str):
    """fp32 weights with a 16-bit compute dtype means mixed precision (HF Trainer's bf16/fp16 flags):
    torch.autocast; everything else computes in the weights' dtype."""
    if setup.bits == 32 and setup.dtype != "fp32":
        import torch

        dt = _torch_dtype(setup.dtype)
        return lambda: torch.autocast(device_type=device, dtype=dt)
    return nullcontext


def _device_notes(setup, device: str, notes: list[str]) -> None:
    from .optimizers import resolve_optimizer

    if device == "cpu":
        notes.append("CPU run: tensor-level peak only (no CUDA context, allocator rounding or reserved memory)")
        if setup.bits == 8:
            notes.append("CPU int8: bitsandbytes trains Linear8bitLt through MatMul8bitFp (dequantize + float "
                         "matmul), not the CUDA MatMul8bitLt path; not representative of a GPU (feasibility.md §2)")
        if resolve_optimizer(setup.optimizer).paged:
            notes.append("paged optimizer on CPU: bitsandbytes falls back to ordinary tensors (counted by the "
                         "tracker); paged_bytes is null")
        notes.append("CUDA collectors (allocator statistics, NVML, paged memory) not used on CPU: fields are null")
    elif resolve_optimizer(setup.optimizer).paged:
        notes.append("paged optimizer: state of parameters with >= 1e5 values is CUDA managed memory (paged_bytes); "
                     "torch's allocator does not count it, NVML does while it is resident; the tracker counts it "
                     "as a CPU storage")


def _fail(record: RunRecord, meter: _Meter | None, outcome: str, exc: BaseException) -> None:
    record.outcome = outcome
    record.error = str(exc) or type(exc).__name__
    record.error_type = type(exc).__name__
    if meter is not None and meter.failed_at is not None:
        record.error_phase, record.error_step = meter.failed_at
    if outcome == "error":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        record.extra["traceback"] = tb[-4000:]
    # Frames in the traceback hold the step's tensors (activations, logits): drop them so memory is released.
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)


def _keep_warnings(caught, notes: list[str], limit: int = 8) -> None:
    seen = set()
    for w in caught:
        msg = f"warning: {w.category.__name__}: {str(w.message).strip().splitlines()[0][:240]}"
        if msg not in seen and len(seen) < limit:
            seen.add(msg)
            notes.append(msg)


def _release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        try:
            import torch

            torch.cuda.synchronize(0)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


# ================================================================================================ sweeps
def default_batch_sizes(start: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH) -> list[int]:
    """``start, 2*start, 4*start, ...`` up to ``max_batch_size``."""
    if start < 1 or max_batch_size < start:
        raise ProfileError(f"invalid batch range {start}..{max_batch_size}")
    out, b = [], start
    while b <= max_batch_size:
        out.append(b)
        b *= 2
    return out


def profile_sweep(setup, *, batch_sizes: Sequence[int] | None = None, max_batch_size: int = DEFAULT_MAX_BATCH,
                  out_dir: str | os.PathLike, device: str = "cpu", steps: int = 3,
                  gpu_memory_fraction: float | None = None, tensor_budget_bytes: int | None = None,
                  profiles_dir=None, seed: int = 0, on_record: Callable[[RunRecord], None] | None = None,
                  progress: bool = True, isolate: bool | None = None) -> list[RunRecord]:
    """One ``profile_run`` per batch size (default 1, 2, 4, ... ``max_batch_size``), each record saved to
    ``out_dir`` as soon as it finishes; stops after the first run that is not ``ok`` (an out-of-memory is the
    answer a sweep looks for; an error would repeat at every larger batch).

    ``isolate`` (default: on for cuda) runs every batch size in a fresh Python process, so that no run inherits
    the previous one's CUDA context, cached blocks, cuBLAS workspace or bitsandbytes' never-freed paged memory.
    ``on_record(record)`` is called after each save. A rich progress bar goes to stderr when ``progress`` and
    stderr is a terminal. Ctrl-C: finished records are already on disk, the interrupted run is saved with
    outcome ``"interrupted"``, then the ``KeyboardInterrupt`` propagates.
    """
    _check_args(device, steps, gpu_memory_fraction, tensor_budget_bytes)
    sizes = list(batch_sizes) if batch_sizes is not None else default_batch_sizes(1, max_batch_size)
    bad = [b for b in sizes if not isinstance(b, int) or isinstance(b, bool) or b < 1]
    if not sizes or bad:
        raise ProfileError(f"invalid batch sizes {sizes!r}; need positive integers")
    isolate = device == "cuda" if isolate is None else isolate
    # Bad setups fail here, with their own error, before any run (pure Python: the parent of isolated runs must
    # not create a CUDA context, which would take memory from the runs on the same card).
    from .models import load_model
    from .setups import resolve_setup

    resolve_setup(setup, load_model(setup.model, profiles_dir=profiles_dir), None)
    kwargs = dict(device=device, steps=steps, gpu_memory_fraction=gpu_memory_fraction,
                  tensor_budget_bytes=tensor_budget_bytes, profiles_dir=profiles_dir, seed=seed)
    records: list[RunRecord] = []
    with _progress(progress, len(sizes)) as bar:
        for b in sizes:
            bar.start(f"batch {b}")
            one = setup.with_(batch_size=b)
            try:
                rec = _run_isolated(one, kwargs) if isolate else profile_run(one, **kwargs)
            except RunInterrupted as exc:
                save_run(exc.record, out_dir)
                records.append(exc.record)
                if on_record is not None:
                    on_record(exc.record)
                raise
            save_run(rec, out_dir)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            bar.done(f"batch {b}: {rec.outcome}" + _peak_text(rec))
            if rec.outcome != "ok":
                break
    return records


def _peak_text(rec: RunRecord) -> str:
    from .units import format_bytes

    p = rec.peak or {}
    v = p.get("max_reserved_bytes") if rec.device == "cuda" else None
    v = v if v is not None else p.get("tensor_peak_bytes")
    return f", peak {format_bytes(v)}" if v is not None else ""


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def start(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._t, description=text)

    def done(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=1, description=text)


@contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar on stderr, or a no-op when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        yield _Bar(p, p.add_task("profiling", total=total))


# ---- isolation: one fresh process per run -----------------------------------------------------------------
# A plain subprocess running ``_isolated_main`` (not multiprocessing's spawn, which re-imports the parent's
# __main__: ``python -m memplan`` has no ``if __name__ == "__main__"`` guard). The request goes in on stdin as
# JSON, the record comes back in a JSON file; the child's stdout/stderr go to a log whose tail is kept in the
# record when the child dies.
_CHILD_CODE = "from memplan.profiler import _isolated_main; _isolated_main()"


def _isolated_main() -> None:  # pragma: no cover - runs in the child process
    import json
    import signal

    from .setups import TrainSetup

    def first_interrupt_only(signum, frame):
        # The terminal's Ctrl-C and the parent's forwarded SIGINT may both arrive: the first one interrupts the
        # run, later ones must not break the hand-over of the partial record.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first_interrupt_only)
    req = json.loads(sys.stdin.read())
    try:
        rec = profile_run(TrainSetup(**req["setup"]), **req["kwargs"])
        msg = {"kind": "record", "record": rec.to_dict()}
    except RunInterrupted as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the hand-over
        msg = {"kind": "interrupted", "record": exc.record.to_dict()}
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        msg = {"kind": "interrupted", "record": None}
    except BaseException as exc:  # noqa: BLE001 - e.g. InvalidSetupError: re-raised in the parent
        mine = isinstance(exc, MemplanError)
        msg = {"kind": "raise", "message": str(exc) if mine else f"{type(exc).__name__}: {exc}", "memplan": mine}
    write_atomic(req["result"], lambda f: json.dump(msg, f))  # the parent reads it whole or not at all


def _placeholder_record(setup, kwargs: dict, outcome: str, error: str, error_type: str) -> RunRecord:
    rec = RunRecord(outcome=outcome, setup=setup.to_dict(), device=kwargs["device"], steps=kwargs["steps"],
                    error=error, error_type=error_type)
    _summarize(rec, None, None, {})
    return rec


def _run_isolated(setup, kwargs: dict) -> RunRecord:
    """``profile_run(setup, **kwargs)`` in a fresh Python process; returns its record (or raises what it
    raised: ``ProfileError`` / ``RunInterrupted``)."""
    import json
    import signal
    import subprocess

    req_kwargs = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kwargs.items()}
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)  # the child imports this very memplan
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="memplan-run-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        request = json.dumps({"setup": setup.to_dict(), "kwargs": req_kwargs, "result": str(result)})
        interrupted = False
        with open(log, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env)
            try:
                proc.stdin.write(request.encode())
                proc.stdin.close()
                proc.wait()
            except KeyboardInterrupt:
                # The terminal's Ctrl-C reaches the child too (same process group); make sure it does, then let
                # it write its partial record.
                interrupted = True
                try:
                    proc.wait(timeout=5)  # it got the same Ctrl-C: give it time to write its record
                except subprocess.TimeoutExpired:
                    try:
                        proc.send_signal(signal.SIGINT)  # only the parent was signalled: forward it
                    except OSError:
                        pass
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        msg = None
        if result.exists():
            try:
                msg = json.loads(result.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                msg = None
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.exists() else ""
    if interrupted or (msg is not None and msg["kind"] == "interrupted"):
        rec = RunRecord.from_dict(msg["record"]) if msg and msg.get("record") else None
        if rec is None:
            rec = _placeholder_record(setup, kwargs, "interrupted", "interrupted", "KeyboardInterrupt")
        rec.outcome = "interrupted"
        raise RunInterrupted(rec)
    if msg is None:
        code = proc.returncode
        why = " (SIGKILL: possibly the Linux out-of-memory killer)" if code == -9 else ""
        rec = _placeholder_record(setup, kwargs, "error", f"the profiling process died with exit code {code}{why}",
                                  "ProcessDied")
        rec.extra["log_tail"] = tail
        return rec
    if msg["kind"] == "record":
        return RunRecord.from_dict(msg["record"])
    if msg.get("memplan"):
        raise ProfileError(msg["message"])
    raise ProfileError(f"the profiling process failed: {msg['message']}")
