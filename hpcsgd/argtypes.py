"""argparse value types that refuse what a flag cannot use: NaN, infinities, out-of-range and empty values.

argparse turns an ``ArgumentTypeError`` into one line naming the flag (``argument --reps: must
be an integer >= 1, got 0``) and exit 2, before anything runs. ``float`` alone accepts
``nan`` and ``inf``, and ``int`` any size: these types are what ``hpcsgd shard`` and
``hpcsgd bench`` use instead. (``hpcsgd train``'s values go through its config check, which
also reads them from TOML.)
"""

from __future__ import annotations

import argparse
import math


def integer(low: int, high: int | None = None) -> callable:
    """An integer in ``low..high`` (``high`` None: at most 2**63-1, as every integer key of hpcsgd)."""
    top = 2**63 - 1 if high is None else high
    span = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if not low <= value <= top:
            limit = " and at most 2**63-1" if high is None and value > top else ""
            raise argparse.ArgumentTypeError(f"must be an integer {span}{limit}, got {value}")
        return value

    return parse


def number(low: float, high: float, *, low_open: bool = False, unit: str = "") -> callable:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]" + (f" {unit}" if unit else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}") from None
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}")
        return value

    return parse


def nonempty(text: str) -> str:
    """A path or name that is not the empty string (``Path("")`` is the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


__all__ = ["integer", "nonempty", "number"]
