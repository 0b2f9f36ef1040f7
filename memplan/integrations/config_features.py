"""Converters for the config keys that switch on adapter variants, initialisations, losses, packing and
activation offloading (memplan.plan.adapters, init_phase, loss, seq_shapes, offload): what
``memplan.integrations.config_tables`` maps them through. Each returns the setup value, or a ``Skip``."""

from __future__ import annotations

import json

from memplan.errors import InvalidSetupError

from .config_skip import SILENT, Skip

__all__ = ["as_bool", "module_names", "token_rows", "lora_init", "peft_type", "packed", "padding_free", "liger_plugin"]


def as_bool(v, raw=None) -> bool:
    """``true`` / ``false``, as YAML or JSON gives it or as a string; anything else is an error naming it."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise InvalidSetupError(f"expected true or false, got {v!r}")


def module_names(v, raw=None) -> str | Skip:  # peft modules_to_save: a list of module names (or null)
    if not v:
        return SILENT
    names = [v] if isinstance(v, str) else list(v)
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise InvalidSetupError(f"expected a list of module names, got {v!r}")
    return ",".join(n.strip() for n in names)


def token_rows(v, raw=None) -> int:  # peft trainable_token_indices: [ids] or {embedding name: [ids]}
    rows = v.values() if isinstance(v, dict) else [v or []]
    if not all(isinstance(r, list) for r in rows):
        raise InvalidSetupError(f"expected a list of token ids (or a dict of lists), got {v!r}")
    return sum(len(set(r)) for r in rows)


def lora_init(v, raw=None) -> str | Skip:  # peft LoraConfig.init_lora_weights
    if v in (True, False, "gaussian", "true", "false") or v is None:
        return SILENT  # the default initialisation (False: B random too; the same memory)
    name = str(v).lower()
    if name in ("loftq", "pissa", "olora") or name.startswith("pissa_niter_"):
        return name
    return Skip("warning", f"init_lora_weights {v!r} is not modelled: the initialisation's own peak is not shown")


def peft_type(v, raw=None) -> str | Skip:
    kind = str(getattr(v, "value", v)).upper()  # (a live LoraConfig holds the PeftType enum)
    if kind == "IA3":
        return "ia3"
    if kind != "LORA":
        raise InvalidSetupError(f"peft_type {v!r}: memplan plans LORA (with its variants) and IA3 adapters")
    return SILENT


def packed(v, raw=None) -> str | Skip:
    """TRL ``packing`` (bfd: bins + padding-free rows) and axolotl ``sample_packing``; TRL's ``packing_strategy:
    wrapped`` cuts the stream into full rows, which is what memplan plans without packing."""
    if not as_bool(v) or (raw or {}).get("packing_strategy") == "wrapped":
        return SILENT
    return "packed"


def padding_free(v, raw=None) -> str | Skip:  # TRL's bfd packing turns padding_free on itself
    return "padding-free" if as_bool(v) and not _true_key(raw, "packing") else SILENT


def _true_key(raw, key: str) -> bool:
    return str(raw.get(key, "")).lower() == "true" or raw.get(key) is True


def liger_plugin(v, raw=None) -> str | Skip:  # axolotl plugins: Liger's with its fused cross-entropy switch on
    if any("liger" in str(p).lower() for p in (v or ())) and _true_key(raw, "liger_fused_linear_cross_entropy"):
        return "liger"
    return SILENT


def show_value(v) -> str:
    """A config value as a message shows it (lists comma-joined, booleans and null as JSON)."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)
