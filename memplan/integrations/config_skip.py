"""``Skip``: a config converter's answer for a value that sets no setup field."""

from __future__ import annotations

__all__ = ["Skip", "SILENT"]


class Skip:
    """A converter's answer for a value that sets no field: silent, or a note / warning with its reason."""

    __slots__ = ("level", "reason")

    def __init__(self, level: str = "silent", reason: str = ""):
        self.level, self.reason = level, reason


SILENT = Skip()
