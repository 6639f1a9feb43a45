"""QEMU's rule for the ids users give to jobs, exports and objects (``id_wellformed()``).

A letter, then letters, digits, ``-``, ``.`` and ``_``.  Node names follow the same rule with a length
limit (:meth:`cowbackup.block.graph.BlockGraph.check_node_name`).
"""

from __future__ import annotations

import re

__all__ = ["is_wellformed_id"]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def is_wellformed_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None
