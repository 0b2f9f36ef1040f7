"""Model specs: what memplan knows of an architecture, from its ``config.json`` values (no torch).

- ``spec``: ``ModelSpec`` / ``LinearSpec`` / ``ParamSpec`` and the exact parameter counts;
- ``targets``: which modules a LoRA adapter lands on (peft's ``target_modules`` rules);
- ``families``: config.json -> ``ModelSpec``, one builder per ``model_type`` (``llama_like``, ``gpt_like``);
- ``load``: catalog names, local config files and model folders -> ``ModelSpec``.
"""

from .families import SUPPORTED_MODEL_TYPES, spec_from_config
from .load import CatalogModel, list_models, load_model
from .spec import ALL_LINEAR, LinearSpec, ModelSpec, ParamSpec

__all__ = ["ALL_LINEAR", "CatalogModel", "LinearSpec", "ModelSpec", "ParamSpec", "SUPPORTED_MODEL_TYPES",
           "list_models", "load_model", "spec_from_config"]
