"""The integrations wing: memplan where training scripts already run.

- ``training_configs`` (+ ``config_tables``): TrainingArguments / TRL / peft / BitsAndBytesConfig / axolotl
  files and objects -> setup fields, and ``merge_layers``, the one rule for combining sources;
- ``live_model``: reading a loaded transformers / peft model without touching its tensors;
- ``preflight``: ``memplan.preflight``, the check a script runs before it loads or trains;
- ``hf_callback``: ``MemplanCallback``, the same check inside a ``Trainer`` and a run record at the end.

``from memplan.integrations import MemplanCallback`` imports transformers (the callback subclasses its
``TrainerCallback``); nothing else here does.
"""

from __future__ import annotations

__all__ = ["MemplanCallback"]


def __getattr__(name: str):
    if name == "MemplanCallback":
        from .hf_callback import MemplanCallback

        return MemplanCallback
    raise AttributeError(f"module 'memplan.integrations' has no attribute {name!r}")
