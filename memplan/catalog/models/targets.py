"""Which modules a LoRA adapter lands on: peft's ``LoraConfig.target_modules`` rules, reproduced without peft.

``LoraTargets`` is mixed into ``ModelSpec`` (``memplan.catalog.models.spec``); it reads only the spec's fields.
Versions reproduced: peft 0.21 (target matching, ``all-linear``, the transformers-v5 MoE target conversion),
read from its source and checked by ``tests/catalog/test_models.py`` against peft on meta-device models.

- a list (or a comma-separated string ``"q_proj,v_proj"``): a module matches a name ``t`` when its full name
  equals ``t`` or ends with ``"." + t`` (peft/tuners/tuners_utils.py ``check_target_module_exists``);
- a single string other than ``"all-linear"``: a regex ``re.fullmatch``-ed against the full module name --
  except that a bare name which fully matches no module (``"c_attn"``; peft would raise) is read as the
  one-name list ``["c_attn"]``, since memplan's CLI and setups pass target lists as comma-separated strings;
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output embedding (lm_head)
  (tuners_utils.py ``_maybe_include_all_linear_layers``).

memplan is stricter than peft in one way: every name in a list must match something (peft silently ignores
a list entry that matches nothing as long as another one matches), so a typo is reported, not ignored.
Only linear layers (and Mixtral's router / fused experts) are modelled as targets: a regex that peft would
also match against a non-linear module (peft then refuses it) is checked against linears only.

A per-layer ``LinearSpec`` returned by ``resolve_targets`` carries ``layers=None`` when every layer has it
adapted (the normal case) and the tuple of layer indices when the targets pick some layers only;
``ModelSpec.instances(spec)`` gives the number of adapted copies either way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memplan.errors import InvalidSetupError

if TYPE_CHECKING:
    from .spec import LinearSpec

__all__ = ["ALL_LINEAR", "LoraTargets", "normalize_targets", "lora_target_arg", "DEFAULT_LORA_TARGETS",
           "PEFT_V5_MOE_TARGETS", "PEFT_V5_MOE_FUSED"]

ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a module name: no regex syntax but the dot


@dataclass(frozen=True)
class _Candidate:
    """One module (or parameter) instance in the model that a LoRA target can pick."""

    full_name: str
    spec: LinearSpec
    layer: int | None  # None for modules outside the layer stack


class LoraTargets:
    """The target-matching half of ``ModelSpec`` (a mixin: it uses the spec's layer and module fields)."""

    # ------------------------------------------------------------------ module names

    @functools.cached_property
    def _candidate_list(self) -> tuple[_Candidate, ...]:
        out = [
            _Candidate(f"{self.layer_prefix}.{i}.{lin.name}", lin, i)
            for i in range(self.num_layers)
            for lin in self.layer_linears
        ]
        out += [_Candidate(lin.name, lin, None) for lin in self.top_linears + self.tied_linears]
        return tuple(out)

    def _candidates(self) -> list[_Candidate]:
        """Every targetable module / parameter instance, in model order (layers first)."""
        return list(self._candidate_list)

    def linear_module_names(self) -> list[str]:
        """Full names (as ``model.named_modules()`` gives them) of every nn.Linear / Conv1D, all layers."""
        return [c.full_name for c in self._candidates() if c.spec.peft_target == "module"]

    def targetable_names(self) -> list[str]:
        """Short names a LoRA target list can use (``q_proj``, ``v_proj`` ...), in model order."""
        names = [lin.name.rsplit(".", 1)[-1] for lin in self.layer_linears + self.top_linears + self.tied_linears
                 if lin.peft_target == "module"]
        names += list(self._moe_map())
        return list(dict.fromkeys(names))

    def instances(self, lin: LinearSpec) -> int:
        """How many copies of ``lin`` the model holds (or, for a resolved target, how many peft adapts)."""
        if lin.layers is not None:
            return len(lin.layers)
        if any(lin.name == x.name for x in self.layer_linears):
            return self.num_layers
        return 1

    def _moe_map(self) -> dict[str, str]:
        """v4 target name -> v5 parameter peft adapts instead (catalog table, or a derived spec's own)."""
        return PEFT_V5_MOE_TARGETS.get(self.model_type) or dict(self.moe_targets)

    def default_lora_targets(self) -> tuple[str, ...]:
        """peft's default ``target_modules`` for this model_type (LoraConfig without target_modules)."""
        return DEFAULT_LORA_TARGETS.get(self.model_type) or self.lora_defaults

    # ------------------------------------------------------------------ LoRA targets

    def _resolve(self, targets: str | Sequence[str] | None) -> list[_Candidate]:
        """Every module / parameter instance peft adapts for ``targets``, in model order."""
        norm = normalize_targets(self.default_lora_targets() if targets is None else targets)
        cands = self._candidates()
        if isinstance(norm, str) and norm != ALL_LINEAR and _PLAIN_NAME.fullmatch(norm):
            # A bare module name ("c_attn") as a peft regex matches nothing and peft raises; memplan's CLI and
            # setups pass target lists as comma-separated strings, so read it as the one-name list it means.
            if not any(c.full_name == norm or re.fullmatch(norm, c.full_name) for c in cands):
                norm = [norm]
        # (only where the experts are fused parameters: transformers 4.x's per-expert modules match by name)
        fused = any(lin.peft_target == "parameter" for lin in self.layer_linears)
        moe_map = self._moe_map() if fused else {}
        strict = True  # every name of a user's list must match (see the module docstring)
        if moe_map and isinstance(norm, str):
            resolved = self._moe_resolve_string(norm, cands, moe_map)
            if resolved is not None:
                norm, strict = resolved, False
        if isinstance(norm, str):
            hits = self._match_string(norm, cands)
        else:
            hits = self._match_list(norm, cands, moe_map, strict=strict)
        chosen = {c.full_name for c in hits}
        return [c for c in cands if c.full_name in chosen]

    def _match_string(self, pattern: str, cands: list[_Candidate]) -> list[_Candidate]:
        modules = [c for c in cands if c.spec.peft_target == "module"]
        if pattern == ALL_LINEAR:
            # every nn.Linear / Conv1D except the output embedding (model.get_output_embeddings())
            return [c for c in modules if c.spec.role != "lm_head"]
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSetupError(f"LoRA target regex {pattern!r} is not a valid regular expression: {e}") from None
        hits = [c for c in modules if rx.fullmatch(c.full_name)]
        if not hits:
            raise self._bad_target(pattern, regex=True)
        return hits

    def _match_list(self, targets: list[str], cands: list[_Candidate], moe_map: dict[str, str],
                    strict: bool = True) -> list[_Candidate]:
        modules = [c for c in cands if c.spec.peft_target == "module"]
        params = [c for c in cands if c.spec.peft_target == "parameter"]
        # peft's transformers-v5 MoE conversion (transformers_weight_conversion.py _convert_peft_config_moe):
        # v4 names (gate, w1, w3, w2) become target_parameters on the v5 router / fused expert tensors.
        param_targets: dict[str, str] = {}  # user target -> v5 parameter name
        v4_names: set[str] = set()
        for t in targets:
            for old, new in moe_map.items():
                if t == old or t.endswith("." + old):
                    param_targets[t] = new
                    v4_names.add(old)
                    break
        for new, olds in (PEFT_V5_MOE_FUSED.get(self.model_type) or dict(self.moe_fused)).items():
            present = v4_names & set(olds)
            if 0 < len(present) < len(olds):
                raise InvalidSetupError(
                    f"LoRA target(s) {', '.join(sorted(present))} cannot be used without "
                    f"{', '.join(sorted(set(olds) - present))}: transformers 5 fuses them into one {new} tensor "
                    f"(peft raises the same error)"
                )
        hits: list[_Candidate] = []
        for t in targets:
            if t in param_targets:
                p = param_targets[t]
                found = [c for c in params if c.full_name == p or c.full_name.endswith("." + p)]
            else:
                found = [c for c in modules if c.full_name == t or c.full_name.endswith("." + t)]
            if not found and strict:
                raise self._bad_target(t)
            hits += found
        if not hits:
            raise self._bad_target(",".join(targets))
        return hits

    def _moe_resolve_string(self, pattern: str, cands: list[_Candidate], moe_map: dict[str, str]) -> list[str] | None:
        """peft's ``_resolve_string_target_modules``: on a converted MoE model a string target (regex or
        all-linear) is turned into the set of LEAF names it matches, then handled as a list (so a regex that
        picks one layer ends up adapting that leaf name in every layer, as peft 0.21 does)."""
        if pattern == ALL_LINEAR:
            linear = self._match_string(ALL_LINEAR, cands)
            return list(dict.fromkeys([c.full_name.rsplit(".", 1)[-1] for c in linear] + list(moe_map)))
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise InvalidSetupError(f"LoRA target regex {pattern!r} is not a valid regular expression: {e}") from None
        keys: list[str] = []  # the module and parameter names memplan knows of
        containers: dict[str, set[str]] = {}
        for c in cands:
            if c.spec.peft_target == "module":
                keys += [c.full_name, c.full_name + ".weight"] + ([c.full_name + ".bias"] if c.spec.bias else [])
            else:
                keys.append(c.full_name)
                container, _, leaf = c.full_name.rpartition(".")
                if leaf == "weight":  # the router: a module holding .weight
                    keys.append(container)
                containers.setdefault(leaf, set()).add(container)
        matched = {k.rsplit(".", 1)[-1] for k in keys if rx.fullmatch(k)}
        # the v4 expert names live inside a fused tensor: probe "<container>.w1" etc. against the regex
        for old, new in moe_map.items():
            if old not in matched and any(rx.fullmatch(f"{ct}.{old}") for ct in containers.get(new, ())):
                matched.add(old)
        if not matched:
            return None  # peft leaves it as a regex -> the usual "matches nothing" error
        return sorted(matched)

    def _bad_target(self, target: str, regex: bool = False) -> InvalidSetupError:
        embeddings = {p.name.rsplit(".", 2)[-2] for p in self.params
                      if p.kind in ("embedding", "position_embedding") and "." in p.name}
        if target in embeddings:
            why = f"LoRA target {target!r} is an embedding of {self.name}; memplan models LoRA on linear layers only"
        elif regex:
            why = (f"LoRA target regex {target!r} fully matches no module name of {self.name} (as in peft, a "
                   f"single string is a regex matched against the full name, e.g. "
                   f"'{self.linear_module_names()[0]}'; to name modules use a comma-separated list)")
        else:
            why = f"LoRA target {target!r} matches no module of {self.name}"
        return InvalidSetupError(f"{why}; targetable modules: {', '.join(self.targetable_names())} (or 'all-linear')")

    def resolve_targets(self, targets: str | Sequence[str] | None = None) -> tuple[LinearSpec, ...]:
        """The per-layer and top-level specs peft adapts for ``targets`` (None: peft's default).

        Per-layer specs adapted in only some layers come back with ``layers`` set (see ``instances``).
        """
        hits = self._resolve(targets)
        out: list[LinearSpec] = []
        for lin in self.layer_linears:
            idx = tuple(c.layer for c in hits if c.spec is lin)
            if idx:
                out.append(lin if len(idx) == self.num_layers else replace(lin, layers=idx))
        out += [lin for lin in self.top_linears + self.tied_linears if any(c.spec is lin for c in hits)]
        return tuple(out)

    def adapted_names(self, targets: str | Sequence[str] | None = None) -> list[str]:
        """Full names peft reports as adapted: ``targeted_module_names`` + ``targeted_parameter_names``."""
        return [c.full_name for c in self._resolve(targets)]

    def lora_trainable_params(self, rank: int, targets: str | Sequence[str] | None = None) -> int:
        """What peft's ``print_trainable_parameters`` reports as trainable for LoRA at ``rank``."""
        if rank <= 0:
            raise InvalidSetupError(f"LoRA rank must be a positive integer, got {rank}")
        return sum(c.spec.lora_params(rank) for c in self._resolve(targets))



def normalize_targets(targets: str | Sequence[str]) -> str | list[str]:
    """peft's forms: "all-linear", a regex string, or a list of names. A comma-separated string is a list."""
    if isinstance(targets, str):
        s = targets.strip()
        if s.lower() == ALL_LINEAR:  # peft compares case-insensitively
            return ALL_LINEAR
        if "," in s:
            names = [t.strip() for t in s.split(",") if t.strip()]
            if not names:
                raise InvalidSetupError(f"empty LoRA target list {targets!r}")
            return names
        if not s:
            raise InvalidSetupError("empty LoRA target string")
        return s
    names = [str(t).strip() for t in targets]
    if not names or not all(names):
        raise InvalidSetupError(f"empty LoRA target in {list(targets)!r}")
    return names




# peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21.2), the entries for the
# supported model types. phi3 has no entry: peft raises "Please specify `target_modules`"; memplan then uses the
# fused qkv_proj, the analogue of the q_proj+v_proj default the other decoders get.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),  # not peft's: see above
    "falcon": ("query_key_value",),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "stablelm": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "gpt_bigcode": ("c_attn",),
}

# peft/utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING / _MOE_FUSED_TARGETS: for model types
# transformers 5 converts (conversion_mapping.get_checkpoint_conversion_mapping), the v4 target names and the
# v5 parameter peft adapts instead. Order matters (peft takes the first match).
PEFT_V5_MOE_TARGETS: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
}
PEFT_V5_MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {"mixtral": {"gate_up_proj": ("w1", "w3")}}


def lora_target_arg(spec, targets: str):
    """``LoraConfig.target_modules`` for memplan's target string, as a user passes it to peft.

    A comma list becomes a list; "all-linear" stays; a bare module name that fully matches no module is the
    one-name list memplan means by it (see the module docstring); anything else is a regex peft full-matches.
    """
    s = targets.strip()
    if "," in s:
        return [t.strip() for t in s.split(",") if t.strip()]
    if s.lower() == ALL_LINEAR:
        return ALL_LINEAR
    if _PLAIN_NAME.fullmatch(s) and not any(re.fullmatch(s, n) for n in spec.linear_module_names()):
        return [s]
    return s
