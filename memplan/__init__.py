"""memplan: plan GPU memory for LoRA / QLoRA / full fine-tuning before anything is loaded.

>>> import memplan
>>> e = memplan.estimate(memplan.TrainSetup("opt-13b", rank=16, targets="q_proj,v_proj"))
>>> e.total_bytes, e.peak_phase, e.dominant          # doctest: +SKIP

Importing ``memplan`` is cheap: names are loaded on first use (PEP 562), and nothing here imports torch.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TrainSetup": "setups",
    "resolve_setup": "setups",
    "Estimate": "estimate",
    "estimate": "estimate",
    "estimate_for": "estimate",
    "FitResult": "fit",
    "fit": "fit",
    "ModelSpec": "models",
    "load_model": "models",
    "list_models": "models",
    "GPUSpec": "gpus",
    "load_gpu": "gpus",
    "list_gpus": "gpus",
    "detect_local_gpu": "gpus",
    "MemplanError": "errors",
    "UnknownModelError": "errors",
    "UnknownGPUError": "errors",
    "InvalidSetupError": "errors",
    "ConfigError": "errors",
    "WontFitError": "errors",
    "preflight": "check",
    "NoDeviceError": "check",
    "PreflightWarning": "check",
    "UnreadableModelError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memplan' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
