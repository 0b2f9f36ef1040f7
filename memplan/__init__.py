"""memplan: plan GPU memory for LoRA / QLoRA / full fine-tuning before anything is loaded.

>>> import memplan
>>> e = memplan.estimate(memplan.TrainSetup("opt-13b", rank=16, targets="q_proj,v_proj"))
>>> e.total_bytes, e.peak_phase, e.dominant          # doctest: +SKIP

Importing ``memplan`` is cheap: names are loaded on first use (PEP 562), and nothing here imports torch.
The package is organised by wing, dependencies pointing one way (README, "How memplan is built"):
``catalog`` <- ``plan`` <- ``measure`` <- ``integrations`` / ``reports`` <- ``cli``.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TrainSetup": "plan.setup",
    "resolve_setup": "plan.setup",
    "Estimate": "plan.estimate",
    "estimate": "plan.estimate",
    "estimate_for": "plan.estimate",
    "Budget": "plan.budget",
    "FitResult": "plan.search",
    "fit": "plan.search",
    "ModelSpec": "catalog.models",
    "load_model": "catalog.models",
    "list_models": "catalog.models",
    "GPUSpec": "catalog.gpus",
    "load_gpu": "catalog.gpus",
    "list_gpus": "catalog.gpus",
    "detect_local_gpu": "catalog.gpus",
    "MemplanError": "errors",
    "UnknownModelError": "errors",
    "UnknownGPUError": "errors",
    "InvalidSetupError": "errors",
    "ConfigError": "errors",
    "WontFitError": "errors",
    "UnreadableModelError": "errors",
    "preflight": "integrations.preflight",
    "NoDeviceError": "integrations.preflight",
    "PreflightWarning": "integrations.preflight",
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
