"""Byte units and formatting. Bytes are integers everywhere inside memplan; GiB appear only at the edge
(CLI, reports), always labelled GiB (1 GiB = 2**30 bytes), never "GB"."""

from __future__ import annotations

__all__ = ["KiB", "MiB", "GiB", "format_gib", "format_bytes", "ceil_div", "round_up"]

KiB = 1024
MiB = 1024**2
GiB = 1024**3


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division (a, b > 0)."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return ceil_div(n, multiple) * multiple


def format_gib(n_bytes: int | float, precision: int = 1) -> str:
    """``12.3 GiB``."""
    return f"{n_bytes / GiB:.{precision}f} GiB"


def format_bytes(n_bytes: int | float) -> str:
    """A human size with an IEC unit chosen by magnitude: ``512 B``, ``3.0 MiB``, ``12.3 GiB``."""
    n = float(n_bytes)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
