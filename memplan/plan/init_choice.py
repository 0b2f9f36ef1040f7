"""The ``--init`` knob's values and its check: what ``resolve_setup`` needs of the initialisation, without the
initialisation phase's model (``memplan.plan.init_phase``), which plans load only for ``--init`` other than
``default``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

from .trainable import adapted_linears

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["INITS", "NITER", "resolve_init", "init_config_value", "check_init_name"]

INITS = ("default", "loftq", "pissa", "olora")
NITER = re.compile(r"^pissa_niter_([1-9][0-9]*)$")  # peft's fast PiSSA: init_lora_weights="pissa_niter_<q>"


def init_config_value(setup: TrainSetup) -> str:
    """``LoraConfig.init_lora_weights`` for the setup's init (``pissa``, ``pissa_niter_4``, ``olora``, ``loftq``)."""
    return setup.init


def check_init_name(init: str) -> None:
    if init not in INITS and not NITER.match(str(init)):
        raise InvalidSetupError(f"invalid init {init!r}; allowed: {', '.join(INITS)}, or pissa_niter_<q> "
                                f"(peft's fast PiSSA with q subspace iterations)")


def resolve_init(setup, spec, *, method: str, bits: int) -> dict:
    """Check ``setup.init`` against the method, the adapter and the model's targets (nothing to fill)."""
    check_init_name(setup.init)
    if setup.init == "default":
        return {}
    if method not in ("lora", "qlora"):
        raise InvalidSetupError(f"--init {setup.init} initialises LoRA adapters; method {method!r} has none "
                                f"(allowed with --method lora or qlora)")
    if setup.adapter in ("ia3", "vera"):
        raise InvalidSetupError(f"--init {setup.init} is a LoRA initialisation; --adapter {setup.adapter} has its "
                                f"own (allowed: --adapter lora, dora, lora-fa)")
    targets = setup.targets if setup.targets is not None else None
    try:
        lins = adapted_linears(spec, targets) if targets is not None else ()
    except Exception:  # noqa: BLE001  (bad targets are reported by resolve_setup itself)
        lins = ()
    wrapped = [lin.name for lin in lins if lin.peft_target == "parameter"]
    if wrapped:
        raise InvalidSetupError(f"--init {setup.init} on {', '.join(wrapped)}: peft 0.21's ParamWrapper (fused "
                                f"expert / router parameters) cannot decompose them; target modules only or "
                                f"--init default")
    return {}
