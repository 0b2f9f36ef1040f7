"""Dynamic memory of derived specs (``ModelSpec.derived``): traced per regime instead of hand-written formulas.

``memplan.plan.activations`` writes each hand-written family's per-layer terms out; an architecture derived from
transformers' module tree (``memplan.catalog.models.derive``) has none, so its activations, logits, gradients and
transients at forward_end, backward_start, backward and backward_end come from coefficients traced with
``memplan simulate`` on 1 and 2 layers (``memplan.measure.derive_trace``) and fitted exactly in the tokens, the
sequence and the layers. The static terms (weights, quantized weights and constants, adapter, optimizer state)
and the optimizer step stay analytic (``estimate.py``).

Coefficients depend on everything that changes what a step saves: the regime key below. They are cached
beside the derived spec (one JSON per config in the user's cache folder), so only the first plan of a regime
needs torch; later ones read the cache (and this process keeps them in memory for the search).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError, MemplanError

from .derived_terms import predict

if TYPE_CHECKING:
    from memplan.catalog.models import ModelSpec

    from .setup import TrainSetup

__all__ = ["regime_key", "coefficients", "derived_dynamic", "predict", "NotTracedError", "CHECK_LIMIT", "clear_memo"]


CHECK_LIMIT = 0.05  # a regime whose traced terms miss the check point by more is refused


class NotTracedError(MemplanError):
    """A regime that is neither cached nor shipped, where nothing can trace it: not a setup the model cannot run
    (not an InvalidSetupError, which ``fit`` searches past: it would quietly drop a whole regime)."""

_MEMO: dict[tuple[str, str], dict] = {}


def regime_key(spec: ModelSpec, setup: TrainSetup) -> str:
    """What changes the traced terms. Not the optimizer (its step is analytic), not the batch or sequence (fitted
    terms), and not ``setup.versions``: the terms are traced on the installed stack, which the entry
    records (``stack``) and the estimate's notes name."""
    masked = bool(spec.sliding_window) and setup.seq_len >= spec.sliding_window
    parts = (setup.method, setup.bits, setup.quant_type, setup.double_quant, setup.dtype, setup.autocast,
             setup.upcast_non_quantized, setup.adapter_dtype, setup.targets if setup.trains_lora else None,
             setup.rank if setup.trains_lora else None, setup.lora_dropout if setup.trains_lora else None,
             bool(setup.grad_ckpt), setup.attn, masked)
    return "|".join(str(p) for p in parts)


def clear_memo() -> None:
    """Forget the regimes this process has looked up (the next lookup reads the cache again)."""
    _MEMO.clear()


def coefficients(spec: ModelSpec, setup: TrainSetup) -> dict:
    """The traced terms of this regime: from memory, the cache, or a trace (which needs torch)."""
    if setup.method == "full":
        # The traced terms of full fine-tuning miss an unfitted check point by 40-65% on the tiny configs (the
        # gradients and optimizer-step temporaries of every weight do not fit the per-layer form): refuse, not guess.
        raise InvalidSetupError(f"{spec.name}: full fine-tuning of an architecture without a hand-written family is "
                                f"not planned yet; plan --method lora or qlora")
    key = regime_key(spec, setup)
    found = _MEMO.get((spec.derived_key, key))
    if found is None:
        found = _lookup(spec, setup, key)
        _MEMO[(spec.derived_key, key)] = found
    if "error" in found:  # a regime the installed libraries cannot run (a crash in peft, a kernel's dtype)
        raise InvalidSetupError(f"{spec.name}: {found['error']}")
    check = found.get("check", {}).get("max_rel_error", 0.0)
    if check > CHECK_LIMIT:
        # Each phase's figure is its largest moment; where the moment changes between the fitted points (under
        # checkpointing, the logits' backward against a layer's recomputation: OLMo-3 16-bit all-linear, Llama-4
        # 4-bit), the fit is of no form and extrapolates wildly. Refused, not guessed; fit searches past it.
        raise InvalidSetupError(f"{spec.name}: the activation terms traced for this regime miss an unfitted point "
                                f"by {check:.0%} (the phase peak moves between the traced points); not planned")
    return found


def _lookup(spec: ModelSpec, setup: TrainSetup, key: str) -> dict:
    """The regime's entry from the cache (or shipped), else traced now and cached."""
    from memplan.catalog.models.derive import read_entry, update_entry

    entry = read_entry(spec.derived_key) if spec.derived_key else None
    found = (entry or {}).get("regimes", {}).get(key)
    if found is None:
        try:  # the measurement side, loaded by name only when a regime is traced (the plan wing imports no torch)
            trace_regime = importlib.import_module("memplan.measure.derive_trace").trace_regime
        except ImportError as exc:
            raise NotTracedError(f"{spec.name}: the activation terms of this regime are not cached yet and tracing "
                                 f"them needs {exc.name or 'torch'}: pip install 'memplan[profile]'") from None
        from dataclasses import replace

        from .versions import default_stack

        traced_on = default_stack().text  # the installed libraries, whatever stack the plan names
        try:
            found = {**trace_regime(spec, replace(setup, versions=traced_on), progress=True), "stack": traced_on}
        except Exception as exc:  # noqa: BLE001 - the model cannot run this regime: one line, why, remembered
            text = " ".join(str(exc).split())[:240] or type(exc).__name__
            if not isinstance(exc, InvalidSetupError):
                text = f"tracing this regime failed ({type(exc).__name__}: {text})"
            elif text.startswith(f"{spec.name}: "):
                text = text[len(spec.name) + 2:]
            found = {"error": text, "stack": traced_on}
        if spec.derived_key:
            update_entry(spec.derived_key, lambda e: {**e, "regimes": {**e.get("regimes", {}), key: found}})
        check = found.get("check", {}).get("max_rel_error", 0.0)
        if check > 0.01:
            print(f"memplan: note: the traced terms of {spec.name} miss an unfitted point by {check:.1%}",
                  file=sys.stderr)
    return found


def derived_dynamic(spec: ModelSpec, setup: TrainSetup, analytic: dict, *, ws: int, grad_bytes: int, new_grad: int,
                    held: bool) -> tuple[dict, str]:
    """``estimate_for``'s phase -> (activations, logits_loss, gradients, transients) for a derived spec, and the
    note that says where they come from: the traced
    terms at this batch and sequence (+ the cuBLAS workspace); the optimizer step as ``analytic`` has it. With
    gradient accumulation the earlier micro-batches' gradients are held (docs/memory-model.md), as analytic."""
    found = coefficients(spec, setup)
    at = predict(found["terms"], spec.num_layers, setup.batch_size, setup.seq_len)
    out = dict(analytic)
    for phase, comps in at.items():
        grads, trans = comps["gradients"], comps["transients"] + ws
        if held:
            grads = grad_bytes
            if phase == "backward":
                trans += new_grad
        out[phase] = (comps["activations"], comps["logits_loss"], grads, trans)
    stack = found.get("stack")
    note = (f"{spec.model_type} has no hand-written family in memplan: its parameters are read off transformers' "
            f"module tree and its activations traced with memplan simulate on 1-3 layers"
            + (f" with {stack.replace('=', ' ').replace(',', ', ')}" if stack and stack != setup.versions else ""))
    return out, note
