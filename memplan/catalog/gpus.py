"""The GPU catalog: cards from ``profiles/gpus.json`` and ad-hoc memory budgets (``24GiB``).

Standard library only. ``load_gpu(name)`` takes a catalog id / alias / name (case-insensitive; spaces, hyphens
and underscores ignored; a leading "NVIDIA" / "GeForce" / "Tesla" optional), a memory budget (``24GiB``,
``24GB`` = 24e9 bytes, ``12000MiB``, ``500MB``), or ``cuda`` / ``local`` for the card in this machine
(``local_gpu``, through NVML). Unknown names raise ``UnknownGPUError`` with close matches. What a plan may
use of a card (total - CUDA context - headroom) is ``memplan.plan.budget``'s, not the catalog's.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from memplan.catalog import paths
from memplan.catalog.local_gpu import nvml_device
from memplan.catalog.paths import read_json
from memplan.errors import ConfigError, InvalidSetupError, UnknownGPUError, close_matches
from memplan.units import GiB, MiB, format_gib

__all__ = [
    "GPUSpec",
    "GENERIC_CUDA_CONTEXT_BYTES",
    "list_gpus",
    "load_gpu",
    "as_gpu",
    "card_label",
    "custom_gpu",
    "detect_local_gpu",
    "gpu_from_device",
    "normalize_gpu_name",
]

# CUDA context for cards whose family is unknown (memory budgets, unrecognised local cards) and for estimates
# made without a card: a typical PyTorch 2.x + CUDA 12 context with lazy module loading. The per-family figures
# in gpus.json's context_defaults say where they come from (docs/memory-model.md, "Runtime terms").
GENERIC_CUDA_CONTEXT_BYTES = 500 * MiB

GPUS_FILE = "gpus.json"
SCHEMA_VERSION = 1

# NVML reports the compute capability; map it to a catalog family for local cards not in the catalog.
# (CUDA C Programming Guide, compute capabilities table.)
_CC_FAMILY = {
    "7.0": "volta",
    "7.5": "turing",
    "8.0": "ampere-datacenter",
    "8.6": "ampere-consumer",
    "8.9": "ada",
    "9.0": "hopper",
    "10.0": "blackwell-datacenter",
    "12.0": "blackwell-consumer",
}

# Words NVML and users put in front of a card name that add nothing ("NVIDIA GeForce RTX 3090" = "RTX 3090").
_VENDOR_PREFIXES = ("nvidia", "geforce", "tesla")

# Memory budgets: TiB/GiB/MiB/KiB (and Ti/Gi/Mi/Ki) are binary (2**40 ...), TB/GB/MB/KB and the bare T/G/M/K
# decimal (10**12 ...), as on spec sheets ("a 24 GB card") and as Kubernetes reads "24G". "B" exists so that
# every ad-hoc card's id round-trips through load_gpu (see _budget_id).
_BUDGET_UNITS = {"tib": 2**40, "ti": 2**40, "tb": 10**12, "t": 10**12, "gib": GiB, "gi": GiB, "gb": 10**9, "g": 10**9,
                 "mib": MiB, "mi": MiB, "mb": 10**6, "m": 10**6, "kib": 1024, "ki": 1024, "kb": 1000, "k": 1000,
                 "b": 1}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(tib|ti|tb|t|gib|gi|gb|g|mib|mi|mb|m|kib|ki|kb|k|b)\s*$",
                        re.IGNORECASE)
# No GPU or GPU budget comes near a pebibyte: a larger number is a typo (and would overflow float arithmetic).
_MAX_BUDGET_BYTES = 2**50

_LOCAL_NAMES = ("cuda", "local")

# A local card matches its catalog entry by NVML name only if its memory is within this fraction of the entry:
# same-name variants differ by 20-50% (RTX 3060 8/12 GB, RTX 4060 Ti 8/16 GB), while ECC on/off and driver
# versions move the reported total by at most ~6% (A10G: 23028 MiB with ECC vs 24 GiB spec).
_DETECT_MEMORY_TOLERANCE = 0.10


@dataclass(frozen=True)
class GPUSpec:
    id: str
    name: str
    aliases: tuple[str, ...]
    total_bytes: int  # what the driver reports (nvidia-smi memory.total), total_mib * 2**20
    compute_capability: str  # "8.6"
    bf16: bool
    family: str
    cuda_context_bytes: int  # device memory the process holds outside PyTorch's caching allocator
    source: str  # where total_bytes comes from

    @property
    def label(self) -> str:
        """Short display name: ``RTX 3090`` for ``NVIDIA GeForce RTX 3090``."""
        return card_label(self.name)


def card_label(name: str) -> str:
    """A card's name without the vendor and brand words: ``RTX 3090`` for ``NVIDIA GeForce RTX 3090``."""
    words = name.split()
    while len(words) > 1 and words[0].lower() in _VENDOR_PREFIXES:
        words = words[1:]
    return " ".join(words)


def normalize_gpu_name(name: str) -> str:
    """The matching key: lower case without spaces, hyphens and underscores (``RTX-3090`` -> ``rtx3090``)."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def _key_variants(key: str) -> list[str]:
    """``key`` and the keys left after stripping vendor prefixes one by one."""
    variants = [key]
    stripped = True
    while stripped:
        stripped = False
        for prefix in _VENDOR_PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key = key[len(prefix):]
                variants.append(key)
                stripped = True
    return variants


# --- catalog loading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    gpus: list[GPUSpec]
    index: dict[str, GPUSpec]  # normalized key -> card
    context_defaults: dict[str, int]  # family -> bytes

    def find(self, name: str) -> GPUSpec | None:
        for key in _key_variants(normalize_gpu_name(name)):
            if key in self.index:
                return self.index[key]
        return None


def _load_catalog(override=None) -> _Catalog:
    # Read on every call: the file is small and this keeps MEMPLAN_PROFILES / file edits effective at once.
    path = paths.profiles_dir(override) / GPUS_FILE
    data = read_json(path)

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object with 'schema_version', 'context_defaults' and 'gpus'")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")

    raw_ctx = data.get("context_defaults")
    if not isinstance(raw_ctx, dict):
        raise bad("'context_defaults' must be an object mapping family -> {\"bytes\": N, \"source\": ...}")
    context: dict[str, int] = {}
    for family, entry in raw_ctx.items():
        n = entry.get("bytes") if isinstance(entry, dict) else None
        if not _is_int(n) or n < 0:
            raise bad(f"context_defaults[{family!r}].bytes must be a non-negative integer, got {n!r}")
        context[family] = n

    raw_gpus = data.get("gpus")
    if not isinstance(raw_gpus, list) or not raw_gpus:
        raise bad("'gpus' must be a non-empty list")
    gpus: list[GPUSpec] = []
    index: dict[str, GPUSpec] = {}
    for i, entry in enumerate(raw_gpus):
        spec = _parse_entry(entry, f"gpus[{i}]", context, bad)
        keys = [spec.id, spec.name, *spec.aliases]
        for key in {normalize_gpu_name(k) for k in keys}:
            owner = index.get(key)
            if owner is not None and owner.id != spec.id:
                raise bad(f"alias/id {key!r} of {spec.id!r} is already used by {owner.id!r}")
            index[key] = spec
        gpus.append(spec)
    return _Catalog(gpus, index, context)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(entry, where: str, context: dict[str, int], bad) -> GPUSpec:
    if not isinstance(entry, dict):
        raise bad(f"{where} must be an object")
    where = f"{where} ({entry.get('id', '?')})"

    def field(key: str, ok, what: str):
        if key not in entry:
            raise bad(f"{where}: missing field '{key}'")
        v = entry[key]
        if not ok(v):
            raise bad(f"{where}: field '{key}' must be {what}, got {v!r}")
        return v

    def is_text(v) -> bool:
        return isinstance(v, str) and v.strip() != ""

    total_mib = field("total_mib", lambda v: _is_int(v) and v > 0, "a positive integer (MiB)")
    cc = field("compute_capability", lambda v: isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v), 'like "8.6"')
    family = field("family", is_text, "a non-empty string")
    if family not in context:
        raise bad(f"{where}: family {family!r} has no entry in context_defaults (known: {', '.join(sorted(context))})")
    aliases = field("aliases", lambda v: isinstance(v, list) and all(is_text(a) for a in v), "a list of strings")
    return GPUSpec(
        id=field("id", is_text, "a non-empty string"),
        name=field("name", is_text, "a non-empty string"),
        aliases=tuple(aliases),
        total_bytes=total_mib * MiB,
        compute_capability=cc,
        bf16=field("bf16", lambda v: isinstance(v, bool), "true or false"),
        family=family,
        cuda_context_bytes=context[family],
        source=field("source", is_text, "a non-empty string"),
    )


# --- public API -------------------------------------------------------------------------------------------


def list_gpus(*, profiles_dir=None) -> list[GPUSpec]:
    """Every catalog card, in file order."""
    return list(_load_catalog(profiles_dir).gpus)


def load_gpu(name: str, *, profiles_dir=None) -> GPUSpec:
    """A catalog card, a memory budget (``24GiB``) or the local card (``cuda``/``local``); see module docstring."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownGPUError(f"GPU name must be a non-empty string, got {name!r}")
    if name.strip().lower() in _LOCAL_NAMES:
        local = detect_local_gpu(profiles_dir=profiles_dir)
        if local is None:
            raise UnknownGPUError(
                f"GPU {name!r}: no local NVIDIA GPU found (pynvml, the NVML library or the driver is missing); "
                "name a card or a memory budget such as 24GiB"
            )
        return local
    cat = _load_catalog(profiles_dir)
    spec = cat.find(name)
    if spec is not None:
        return spec
    budget = _parse_budget(name)
    if budget is not None:
        return _custom_from_bytes(budget, name=None)
    raise UnknownGPUError(f"unknown GPU {_shown(name)}{_suggest(name, cat)}")


def as_gpu(gpu, *, profiles_dir=None) -> GPUSpec | None:
    """What the Python API takes for a card: a ``GPUSpec``, a name or budget for ``load_gpu``, or None (no
    card). Anything else is refused naming it (``fit(setup, 24)`` means nothing: ``"24GiB"`` does)."""
    if gpu is None or isinstance(gpu, GPUSpec):
        return gpu
    if isinstance(gpu, str):
        return load_gpu(gpu, profiles_dir=profiles_dir)
    raise UnknownGPUError(f"invalid GPU {gpu!r} ({type(gpu).__name__}); give a card name such as '3090', a budget "
                          f"such as '24GiB', or a GPUSpec")


def _shown(name: str) -> str:
    """A name as an error message shows it: quoted, and cut when it is longer than any card name."""
    return repr(name) if len(name) <= 60 else repr(name[:57] + "...")


def _suggest(name: str, cat: _Catalog) -> str:
    """`` (did you mean: RTX 3090, RTX 3090 Ti?)``, matching against every id/alias but naming cards by label."""
    word = normalize_gpu_name(name)
    hits = close_matches(word, cat.index, n=len(cat.index))
    # difflib breaks score ties by reverse string order (rtx5090 before rtx3090 for "rtx3095"); prefer keys
    # sharing a longer prefix with what was typed, keeping difflib's order otherwise (sort is stable).
    hits.sort(key=lambda k: -len(os.path.commonprefix([k, word])))
    labels: list[str] = []
    for key in hits:
        label = cat.index[key].label
        if label not in labels:
            labels.append(label)
    if not labels:
        return "; name a catalog card, 'cuda' for the local card, or a memory budget such as 24GiB"
    # Same wording as errors.suggestion_suffix.
    return f" (did you mean: {', '.join(labels[:3])}?)"


def _parse_budget(text: str) -> int | None:
    """Bytes for ``24GiB`` / ``24 GB`` / ``12000MiB`` / ``22.5GiB``, else None. Exact (no float rounding)."""
    m = _BUDGET_RE.match(text)
    if m is None:
        return None
    if len(m.group(1)) > 20:  # no budget has 20 digits: refuse before doing arithmetic on the number
        raise InvalidSetupError(f"GPU memory budget {text.strip()[:40]}... is not a plausible size; give one such as "
                                f"24GiB")
    from fractions import Fraction  # exact decimals (22.5GiB); fractions imports decimal: only when a budget is read

    return round(Fraction(m.group(1)) * _BUDGET_UNITS[m.group(2).lower()])


def _budget_id(total_bytes: int) -> str:
    """An id that load_gpu parses back to the same bytes: the largest unit that divides evenly."""
    for unit in ("GiB", "GB", "MiB", "MB", "B"):
        size = _BUDGET_UNITS[unit.lower()]
        if total_bytes % size == 0:
            return f"{total_bytes // size}{unit}"
    raise AssertionError("unreachable: B divides everything")


def custom_gpu(total_gib: float, *, name: str | None = None) -> GPUSpec:
    """An ad-hoc card with ``total_gib`` GiB (2**30 bytes) of memory and the generic context."""
    if isinstance(total_gib, bool) or not isinstance(total_gib, (int, float)) or not math.isfinite(total_gib):
        raise InvalidSetupError(f"GPU memory budget must be a number of GiB, got {total_gib!r}")
    from fractions import Fraction

    return _custom_from_bytes(round(Fraction(total_gib) * GiB), name=name)


def _custom_from_bytes(total_bytes: int, *, name: str | None) -> GPUSpec:
    if total_bytes <= 0:
        raise InvalidSetupError(f"GPU memory budget must be positive, got {total_bytes} bytes")
    if total_bytes > _MAX_BUDGET_BYTES:
        raise InvalidSetupError(f"GPU memory budget of {total_bytes:.3g} bytes is larger than any card or machine "
                                f"(limit 1 PiB); give one such as 24GiB")
    budget_id = _budget_id(total_bytes)
    # the id round-trips through load_gpu; people read whole units better than 322122547B
    shown = format_gib(total_bytes, 2).replace(" ", "") if budget_id[-2].isdigit() else budget_id
    return GPUSpec(
        id=budget_id,
        name=name or f"custom {shown} card",
        aliases=(),
        total_bytes=total_bytes,
        # A budget says nothing about the chip. Assume Ampere or newer (bf16, flash-attention capable): that
        # is what LoRA/QLoRA fine-tuning runs on today, and fp16 vs bf16 does not change the memory plan.
        compute_capability="8.0",
        bf16=True,
        family="unknown",
        cuda_context_bytes=GENERIC_CUDA_CONTEXT_BYTES,
        source=f"user-given memory budget {budget_id} ({format_gib(total_bytes, 2)})",
    )


# --- the local card ---------------------------------------------------------------------------------------


def detect_local_gpu(*, profiles_dir=None) -> GPUSpec | None:
    """The card in this machine, or None when pynvml / NVML / the driver / a visible GPU is missing.

    A catalog card whose NVML name and memory match is returned with the memory NVML reports (the local
    truth). Otherwise an ad-hoc card (id ``local``) is built from NVML's name, memory and compute capability,
    with the context default of the matching family. NVML trouble never raises; a broken catalog file does
    (ConfigError), as it would for any other card.
    """
    device = nvml_device()
    if device is None:
        return None
    nvml_name, total, cc = device
    return gpu_from_device(nvml_name, total, cc, source=f"NVML on this machine: {nvml_name}, {total // MiB} MiB",
                           profiles_dir=profiles_dir)


def gpu_from_device(nvml_name: str, total: int, cc: str, *, source: str, profiles_dir=None) -> GPUSpec:
    """A ``GPUSpec`` for a card a driver describes (name, total bytes, compute capability): its catalog entry
    with the reported memory when name and memory match, else an ad-hoc card with its family's context."""
    cat = _load_catalog(profiles_dir)
    spec = cat.find(nvml_name)
    if spec is not None and abs(total - spec.total_bytes) <= _DETECT_MEMORY_TOLERANCE * spec.total_bytes:
        return replace(spec, total_bytes=total, source=f"{source} (catalog entry {spec.id})")
    family = spec.family if spec is not None else _CC_FAMILY.get(cc, "unknown")
    return GPUSpec(
        id="local",
        name=nvml_name,
        aliases=(),
        total_bytes=total,
        compute_capability=cc,
        bf16=int(cc.split(".")[0]) >= 8,
        family=family,
        cuda_context_bytes=cat.context_defaults.get(family, GENERIC_CUDA_CONTEXT_BYTES),
        source=source,
    )
