"""Plan from the training config files users already have: transformers ``TrainingArguments`` JSON, TRL
``SFTConfig`` JSON / YAML, peft ``adapter_config.json``, a bitsandbytes ``BitsAndBytesConfig``, axolotl YAML,
an accelerate config YAML and a DeepSpeed config JSON.

``load_training_config`` reads one file, recognises its format by content (not by extension) and maps every key
that changes training memory onto ``TrainSetup`` fields through the format's table
(``memplan.integrations.config_tables``), then the multi-GPU keys (``config_distributed``). Keys that matter for
memory but that memplan does not model are reported in ``ignored`` with a reason, as a warning or a note.
``merge_configs`` layers several files and then the command-line flags with ``merge_layers``, memplan's one rule
for combining sources (``preflight`` uses it too). Pure standard library: pyyaml is imported only when a YAML file
is read.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError, InvalidSetupError, NoModelError
from memplan.fileio import read_text
from memplan.plan.setup import TrainSetup

from .config_distributed import DEEPSPEED_MARKERS, apply_distributed
from .config_features import show_value
from .config_tables import (ACCELERATE_MARKERS, AXOLOTL_MARKERS, EXCLUSIVE, FORMAT_NAMES, FORMATS, NESTED,
                            TA_MARKERS, TABLES, TRL_MARKERS, Skip)

__all__ = ["TrainingConfig", "MergeReport", "load_training_config", "map_training_config", "merge_configs",
           "merge_layers", "show_value", "FORMATS", "TABLES"]


def merge_layers(*layers: Mapping[str, Any]) -> dict:
    """memplan's one rule for combining the sources of a setup: ``layers`` go from the least to the most
    specific, and a later layer's value wins over an earlier one (``None`` is "not set").

    ``--config`` files come in the order given, then the flags; ``preflight`` goes config objects
    (TrainingArguments, LoraConfig, BitsAndBytesConfig), then what the live model says, then its keyword
    arguments."""
    out: dict = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if v is not None})
    return out


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class TrainingConfig:
    """One training config file read into ``TrainSetup`` fields.

    ``used`` lists (config key, value in the file, setup field) for every key that set a field; ``ignored``
    lists (key, reason) for keys that matter for memory but are not modelled (each also in ``warnings`` or
    ``notes``)."""

    path: str
    format: str
    model: str | None
    fields: dict
    used: tuple[tuple[str, Any, str], ...]
    ignored: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "model": self.model, "fields": dict(self.fields),
                "used": [{"key": k, "value": v, "field": f} for k, v, f in self.used],
                "ignored": [{"key": k, "reason": r} for k, r in self.ignored],
                "warnings": list(self.warnings), "notes": list(self.notes)}


def _read(p: Path) -> tuple[dict, bool]:
    """The file's top-level mapping, and whether it was YAML."""
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise ConfigError(f"{p}: the folder holds no adapter_config.json; pass a config file")
        p = p / "adapter_config.json"
    text = read_text(p, missing="config file not found")
    is_yaml = p.suffix.lower() in (".yml", ".yaml") or (p.suffix.lower() != ".json" and
                                                        not text.lstrip().startswith("{"))
    if is_yaml:
        try:
            import yaml  # lazy: only YAML files need pyyaml (the `yaml` extra)
        except ImportError:
            raise ConfigError(f"{p}: reading YAML needs pyyaml: pip install 'memplan[yaml]'") from None
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(f"{p}: YAML nested too deeply to be a training config") from None
        except yaml.YAMLError as exc:
            if p.suffix.lower() not in (".yml", ".yaml"):  # neither JSON nor YAML: say what is read
                raise ConfigError(f"{p}: not a training config memplan recognises; it reads {FORMAT_NAMES}") from None
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            msg = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"{p}: invalid YAML{where}: {msg}") from None
    else:
        try:
            data = json.loads(text)
        except RecursionError:
            raise ConfigError(f"{p}: JSON nested too deeply to be a training config") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        if is_yaml and p.suffix.lower() not in (".yml", ".yaml"):
            raise ConfigError(f"{p}: not a training config memplan recognises; it reads {FORMAT_NAMES}")
        raise ConfigError(f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data, is_yaml


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out[key] = v
        if k in NESTED and isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
    return out


def _detect(raw: Mapping) -> str | None:
    keys = set(raw)
    if "peft_type" in keys:
        return "peft"
    training = AXOLOTL_MARKERS | TRL_MARKERS | TA_MARKERS
    if raw.get("quant_method") == "bitsandbytes" or (not keys & training and (
            keys & {"load_in_4bit", "load_in_8bit"} or any(k.startswith(("bnb_4bit_", "llm_int8_")) for k in keys))):
        return "bnb"
    if keys & AXOLOTL_MARKERS:
        return "axolotl"
    if keys & TRL_MARKERS:
        return "trl"
    if keys & DEEPSPEED_MARKERS:
        return "deepspeed"
    if keys & {"per_device_train_batch_size", "optim"} or len(keys & TA_MARKERS) >= 2:
        return "training_args"
    if len(keys & ACCELERATE_MARKERS) >= 2:
        return "accelerate"
    return None


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read one training config file and map it onto ``TrainSetup`` fields.

    Args:
        path: a TrainingArguments / TRL JSON, a TRL or axolotl YAML, a peft adapter_config.json (or the adapter
            folder holding it), a BitsAndBytesConfig JSON, an accelerate config YAML or a DeepSpeed config JSON.
            The format is recognised by content.

    Returns:
        The ``TrainingConfig``: fields set, keys used, keys ignored with a reason, warnings and notes.

    Raises:
        ConfigError: a missing or unparsable file, or a format memplan does not recognise.
        InvalidSetupError: a bad value (unknown optimizer, 4 and 8 bits at once ...), naming file and key.
    """
    p = Path(path)
    raw, hand_written = _read(p)
    fmt = _detect(raw)
    if fmt is None:
        if "model_type" in raw:
            raise ConfigError(f"{p}: a model config.json (model_type {raw['model_type']!r}); pass it as MODEL or "
                              f"--model, not --config")
        raise ConfigError(f"{p}: not a training config memplan recognises; it reads {FORMAT_NAMES}")
    return map_training_config(raw, fmt, source=str(path), hand_written=hand_written,
                               base_dir=p if p.is_dir() else p.parent)


def map_training_config(raw: Mapping[str, Any], fmt: str, *, source: str, hand_written: bool = False,
                        base_dir: str | Path | None = None) -> TrainingConfig:
    """Map one config's values (a parsed file, or ``to_dict()`` of a ``TrainingArguments`` / ``LoraConfig`` /
    ``BitsAndBytesConfig`` object: ``memplan.preflight`` uses this) of format ``fmt`` (one of ``FORMATS``) onto
    ``TrainSetup`` fields. ``source`` names it in messages; ``hand_written`` turns on the misspelt-key check;
    ``base_dir`` is where a relative path it names (a DeepSpeed JSON) is looked for before the working directory."""
    if fmt not in TABLES:
        raise ConfigError(f"{source}: unknown config format {fmt!r}; allowed: {', '.join(FORMATS)}")
    p = source
    if fmt == "peft" and str(raw.get("peft_type")).rsplit(".", 1)[-1].upper() not in ("LORA", "IA3"):
        raise ConfigError(f"{p}: peft_type {str(raw.get('peft_type')).rsplit('.', 1)[-1]!r} is not modelled; "
                          f"memplan plans LoRA adapters (peft_type LORA, with DoRA / rsLoRA / LoftQ / PiSSA / "
                          f"OLoRA) and IA3")
    flat = _flatten(raw)
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    used: list[tuple[str, Any, str]] = []
    ignored: list[tuple[str, str]] = []
    warnings: list[str] = []
    notes: list[str] = []
    for key, (field, conv) in TABLES[fmt].items():
        value = flat.get(key)
        if value is None or value == "":  # YAML `key:` with nothing after it is unset
            continue
        try:
            out = conv(value, flat)
        except InvalidSetupError as exc:
            raise InvalidSetupError(f"{p}: {key}: {exc}") from None
        if isinstance(out, Skip):
            if out.level != "silent":
                ignored.append((key, out.reason))
                (warnings if out.level == "warning" else notes).append(f"{key}={show_value(value)}: {out.reason}")
            continue
        prev = origin.get(field)
        if prev is not None and fields[field] != out:
            if {prev.rsplit(".", 1)[-1].lstrip("_"), key.rsplit(".", 1)[-1].lstrip("_")} in EXCLUSIVE:
                raise InvalidSetupError(f"{p}: contradictory settings {prev}: {show_value(flat[prev])} and "
                                        f"{key}: {show_value(value)}; keep one")
            warnings.append(f"{prev}={show_value(flat[prev])} and {key}={show_value(value)} both set {field}; "
                            f"using {key}")
        if prev is not None:
            used = [u for u in used if u[0] != prev]
        fields[field], origin[field] = out, key
        used.append((key, value, field))
    # GPUs, nodes, FSDP / DeepSpeed: keys that span each other and other files (memplan.integrations.config_distributed)
    apply_distributed(fmt, raw, source=p, base_dir=base_dir, fields=fields, origin={f: (k, flat[k]) for f, k in
                      origin.items()}, used=used, ignored=ignored, warnings=warnings, notes=notes)
    if fmt == "axolotl":
        _axolotl_post(flat, fields, used, ignored, warnings, notes)
    if fields.get("method") == "qlora" and fields.get("bits") not in (None, 4):
        raise InvalidSetupError(f"{p}: contradictory settings {origin['method']}: qlora and "
                                f"{origin['bits']}: {show_value(flat[origin['bits']])} (QLoRA is 4-bit); keep one")
    if hand_written:  # JSON files are written by the libraries themselves: no typos to catch
        warnings += _typos(raw, TABLES[fmt])
    model = fields.pop("model", None)
    return TrainingConfig(source, fmt, model, fields, tuple(used), tuple(ignored), tuple(warnings), tuple(notes))


def _typos(raw: Mapping, table: Mapping) -> list[str]:
    """A key close to one memplan reads (``micro_batchsize``) is probably a typo the training tool rejects or
    ignores; a documented extension of a read key (``eval_sample_packing``, ``torch_compile_mode``) is not."""
    out = []
    top = [t for t in table if "." not in t]
    for key in raw:
        if key in table or any(key.startswith(t + "_") or key.endswith("_" + t) for t in top):
            continue
        hits = difflib.get_close_matches(key, top, n=1, cutoff=0.85)
        if hits:
            out.append(f"{key}: not a key memplan reads (did you mean {hits[0]}?)")
    return out


def _true(v) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() == "true")


def _axolotl_post(flat, fields, used, ignored, warnings, notes) -> None:
    """axolotl rules that span keys: no adapter trains every parameter; offloaded checkpointing."""
    if not flat.get("adapter"):
        fields["method"] = "full"
        used.append(("adapter", None, "method"))
        notes.append("adapter=null: axolotl trains every parameter (full fine-tuning)")
    if (_true(flat.get("bfloat16")) or _true(flat.get("float16"))) and "autocast" not in fields:
        # axolotl: bfloat16 / float16 load the weights in half precision and train without AMP (bf16 / fp16
        # are the AMP flags)
        fields["autocast"] = "off"
        used.append(("bfloat16" if _true(flat.get("bfloat16")) else "float16", True, "autocast"))
    ckpt = flat.get("gradient_checkpointing")
    if isinstance(ckpt, str) and ckpt.strip().lower() in ("offload", "unsloth"):
        reason = "checkpoints offloaded to host memory are not modelled: counted on the GPU"
        ignored.append(("gradient_checkpointing", reason))
        warnings.append(f"gradient_checkpointing={ckpt}: {reason}")


# ------------------------------------------------------------------------------------------------ merging


@dataclass(frozen=True)
class MergeReport:
    """What ``merge_configs`` did: the files, where the model came from, file-over-file conflicts and the flags
    that overrode a file."""

    configs: tuple[TrainingConfig, ...]
    model_source: str | None  # a file's path, or None when the model was given directly
    conflicts: tuple[str, ...]
    overrides: tuple[str, ...]

    def lines(self) -> list[tuple[str, str]]:
        """(kind, text) lines for a terminal: kind is "used", "warning" or "note"."""
        out: list[tuple[str, str]] = []
        for c in self.configs:
            used = ", ".join(f"{k}={show_value(v)} -> {f}" for k, v, f in c.used) or "no setting memplan models"
            out.append(("used", f"from {c.path}: {used}"))
            out += [("warning", f"warning: {c.path}: {w}") for w in c.warnings]
            out += [("note", f"note: {c.path}: {n}") for n in c.notes]
        out += [("warning", f"warning: {w}") for w in self.conflicts]
        out += [("note", f"note: {o}") for o in self.overrides]
        return out

    def to_dict(self) -> dict:
        return {"files": [c.to_dict() for c in self.configs], "model_source": self.model_source,
                "conflicts": list(self.conflicts), "overrides": list(self.overrides)}


def _same_model(a: str, b: str) -> bool:
    """Names that differ only by org, case or an ``-hf`` suffix (``meta-llama/Llama-2-7b-hf``, ``llama-2-7b``)
    are the same model to a reader: no conflict to report."""
    def norm(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")
    return norm(a) == norm(b)


def _key_for(cfg: TrainingConfig, field: str) -> str:
    return next((k for k, _, f in reversed(cfg.used) if f == field), field)


def merge_configs(configs: Iterable[TrainingConfig], flags: Mapping[str, Any], model: str | None = None
                  ) -> tuple[TrainSetup, frozenset[str], MergeReport]:
    """Layer config files (later ones win) and then flags into one ``TrainSetup``.

    Args:
        configs: loaded files, in the order given; a later file overrides an earlier one (reported).
        flags: ``TrainSetup`` field -> value from the command line; ``None`` means not given.
        model: the model named directly (positional MODEL or ``--model``); else the last file that names one.

    Returns:
        (setup, pinned, report): ``pinned`` holds every knob set by a file or a flag (``fit`` keeps them).

    Raises:
        ConfigError: no model anywhere.
    """
    configs = tuple(configs)
    values: dict[str, Any] = {}
    source: dict[str, TrainingConfig] = {}
    conflicts: list[str] = []
    overrides: list[str] = []
    file_model, model_source = None, None
    for cfg in configs:
        if cfg.model is not None:
            if file_model is not None and not _same_model(cfg.model, file_model):
                conflicts.append(f"model {file_model} from {model_source} overridden by {cfg.model} from {cfg.path}")
            file_model, model_source = cfg.model, cfg.path
        for field, value in cfg.fields.items():
            if field in values and values[field] != value:
                prev = source[field]
                k1, k2 = _key_for(prev, field), _key_for(cfg, field)
                conflicts.append(f"{k1} {show_value(values[field])} from {prev.path} overridden by "
                                 f"{show_value(value)} from {cfg.path}" + (f" ({k2})" if k2 != k1 else ""))
            values[field], source[field] = value, cfg
    given = {f: v for f, v in flags.items() if v is not None}
    for field, value in given.items():
        if field in values and values[field] != value:
            overrides.append(f"flag {field}={show_value(value)} overrides {_key_for(source[field], field)}="
                             f"{show_value(values[field])} from {source[field].path}")
    pinned = frozenset(values) | frozenset(given)
    values = merge_layers(*(cfg.fields for cfg in configs), given)
    if model is None:
        model = file_model
    else:
        if file_model is not None and not _same_model(file_model, model):
            overrides.append(f"model {model} overrides {file_model} from {model_source}")
        model_source = None
    if model is None:
        raise NoModelError([c.path for c in configs])
    values.pop("model", None)
    setup = TrainSetup(model=model, **values)
    return setup, pinned - {"model", "gpu"}, MergeReport(configs, model_source, tuple(conflicts), tuple(overrides))
