"""``Stack``: the versions of the four packages that change what a fine-tuning step allocates, and how memplan
compares versions (``parse_version``: release numbers only, no ``packaging``). ``memplan.plan.versions`` parses
``--versions`` and fills defaults; ``memplan.plan.version_rules`` holds what differs between versions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Stack", "PACKAGES", "NEWEST_KNOWN", "OLDEST_MODELLED", "parse_version", "public_version"]

PACKAGES = ("transformers", "peft", "bitsandbytes", "torch")


@dataclass(frozen=True)
class Stack:
    """One version of each package memplan models (release strings such as ``4.48.3``)."""

    transformers: str
    peft: str
    bitsandbytes: str
    torch: str

    @property
    def text(self) -> str:
        """``transformers=5.24.0,peft=0.21.2,bitsandbytes=0.50.2,torch=2.13.0``: what ``setup.versions`` holds."""
        return ",".join(f"{p}={getattr(self, p)}" for p in PACKAGES)

    def describe(self) -> str:
        return ", ".join(f"{p} {getattr(self, p)}" for p in PACKAGES)

    def release(self, package: str) -> tuple[int, int, int]:
        return parse_version(getattr(self, package))


# What the estimator models today (docs/memory-model.md, "Versions and symbols": the reference measurements ran on
# torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2).
NEWEST_KNOWN = Stack(transformers="5.24.0", peft="0.21.2", bitsandbytes="0.50.2", torch="2.13.0")
# The oldest release of each package whose source the rules were read against (the wheels of transformers
# 4.36.2, peft 0.7.1, bitsandbytes 0.41.3, torch 2.4.1 and every release cited in RULES). An older version is
# planned with the oldest rules, and the estimate says so (``memplan.plan.stack_effects.stack_caveats``): they
# may change more than the rules say (peft < 0.7 keeps LoRA in one lora.py of another shape).
OLDEST_MODELLED = Stack(transformers="4.36.0", peft="0.7.0", bitsandbytes="0.41.0", torch="2.4.0")

_RELEASE = re.compile(r"\s*v?(\d+(?:\.\d+)*)")


@lru_cache(maxsize=1024)
def parse_version(text: str) -> tuple[int, int, int]:
    """The release numbers of a version string, padded to three: ``2.13.0+cpu`` -> (2, 13, 0), ``0.41.3.post2``
    -> (0, 41, 3), ``4.48`` -> (4, 48, 0). Pre-, post- and dev-release tags and local labels are ignored (no
    rule depends on them). Raises ValueError for text that does not start with a number."""
    m = _RELEASE.match(str(text))
    if not m:
        raise ValueError(f"not a version: {text!r}")
    nums = tuple(int(x) for x in m.group(1).split("."))[:3]
    return nums + (0,) * (3 - len(nums))  # type: ignore[return-value]


def public_version(text: str) -> str:
    """The version without a local label: ``2.13.0+cpu`` -> ``2.13.0`` (the build tag changes no rule)."""
    return str(text).split("+", 1)[0].strip()
