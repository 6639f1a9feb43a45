"""argparse value types shared by the ``cowbackup`` subcommands (and the benchmarks).

Each raises ``argparse.ArgumentTypeError`` with a message that says what was expected, so argparse
prints one usage line and exits 2.
"""

from __future__ import annotations

import argparse

from cowbackup.block.options import parse_size


def size(text: str) -> int:
    """A byte count with an optional binary suffix: ``65536``, ``64K``, ``100M``, ``1G``."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 65536, 64K, 100M, 1G)") from None


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def percent(text: str) -> float:
    """A percentage above 0 and at most 100 (``10``, ``2.5``, ``50%``)."""
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage '{text}'") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"a percentage must be more than 0 and at most 100, not {text}")
    return value
