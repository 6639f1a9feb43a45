"""``fault-inject``: a filter that fails or stalls scripted requests (a simpler QEMU blkdebug).

A rule picks requests by operation (and optionally by byte range) and counts them *as they arrive at the
filter*, before anything is awaited, so a script like "succeed, succeed, EIO" is deterministic however
the requests are scheduled afterwards::

    rule = node.inject("write", nth=3, errno=errno.ENOSPC)   # the 3rd write from now fails with ENOSPC
    rule = node.inject("read", stall=True)                   # the next read waits ...
    await rule.wait_hits(1)                                  # ... (it has arrived) ...
    rule.release()                                           # ... until released, then passes through

Matching requests ``nth .. nth+count-1`` (1-based, counted from when the rule was added) fire; ``count=0``
means every matching request from the ``nth`` on.  A fired error rule fails the request with ``errno``
without passing it on; a fired stall rule holds it until :meth:`Rule.release` (or
:meth:`FaultNode.release_all`), then lets it through.  When several rules fire on one request, all stalls
are waited for first, then the first error rule (in order of injection) wins.  Other requests pass to the
child unchanged.  Every request, stalled ones included, counts as in flight on this node for ``drain``.

Operations: ``read``, ``write``, ``write_zeroes``, ``discard``, ``flush``, ``block_status`` and
``any-write`` (write, write-zeroes or discard).

Options (``blockdev-add``):

=========  ================================================================================================
``file``   the child: a node name or an inline definition (required)
``rules``  a list of ``{"op", "nth": 1, "count": 1, "errno": "EIO", "stall": false, "offset", "length"}``;
           ``errno`` is a number or a name (``"ENOSPC"``); ``offset``/``length`` restrict the rule to
           requests overlapping that range (flushes never match a range).  A stall rule added this way
           can be released only from Python.
others     every node's options (:mod:`cowbackup.block.drivers`).  As with QEMU's blkdebug, a discard
           reaches the rules only on a node opened with ``discard=unmap``; by default it is dropped first.
=========  ================================================================================================
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
from collections.abc import Mapping
from typing import Any

from cowbackup.block.drivers import open_child
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, FilterNode, RequestFlags
from cowbackup.block.options import Options

OPS = ("read", "write", "write_zeroes", "discard", "flush", "block_status", "any-write")
_WRITES = frozenset({"write", "write_zeroes", "discard"})
_NO_END = 1 << 63


class Rule:
    """One scripted fault.  ``seen`` counts matching requests, ``hits`` those it failed or stalled.

    Touched only from the event loop, by the filter and by the test that holds the rule.
    """

    def __init__(
        self,
        op: str,
        *,
        nth: int = 1,
        count: int = 1,
        errno: int = errno_mod.EIO,
        stall: bool = False,
        offset_range: tuple[int, int] | None = None,
    ) -> None:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
        if nth < 1 or count < 0 or errno <= 0:
            raise ValueError(f"bad rule: nth={nth} (>= 1), count={count} (>= 0), errno={errno} (> 0)")
        self.op = op
        self.nth = nth
        self.count = count
        self.errno = errno
        self.stall = stall
        self.offset_range = offset_range
        self.seen = 0
        self.hits = 0
        #: Requests currently held by this (stall) rule.
        self.waiting = 0
        self._released = asyncio.Event()
        self._hit = asyncio.Event()

    def __repr__(self) -> str:
        action = "stall" if self.stall else errno_mod.errorcode.get(self.errno, str(self.errno))
        return (
            f"<Rule {self.op} nth={self.nth} count={self.count} {action} seen={self.seen} hits={self.hits}>"
        )

    def _matches(self, op: str, offset: int | None, length: int) -> bool:
        if op != self.op and not (self.op == "any-write" and op in _WRITES):
            return False
        if self.offset_range is None:
            return True
        if offset is None:
            return False
        start, end = self.offset_range
        return offset < end and start < offset + max(length, 1)

    def _arrive(self, op: str, offset: int | None, length: int) -> bool:
        """Count a request; True when the rule fires on it."""
        if not self._matches(op, offset, length):
            return False
        self.seen += 1
        if self.seen < self.nth or (self.count and self.seen >= self.nth + self.count):
            return False
        self.hits += 1
        self._hit.set()
        return True

    @property
    def exhausted(self) -> bool:
        """True once every request the rule can fire on has arrived."""
        return bool(self.count) and self.seen >= self.nth + self.count - 1

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Let the requests this stall rule holds, and any it would hold later, pass through."""
        self._released.set()

    async def wait_hits(self, n: int = 1) -> None:
        """Wait until the rule has fired on ``n`` requests (a stalled request has then arrived)."""
        while self.hits < n:
            self._hit.clear()
            await self._hit.wait()

    async def _hold(self) -> None:
        self.waiting += 1
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1


class FaultNode(FilterNode):
    """The ``fault-inject`` filter.  ``rules`` is in order of injection; the filter only reads it."""

    driver_name = "fault-inject"
    reads_unchanged = False

    def __init__(self, node_name: str, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only)
        self.rules: list[Rule] = []

    def inject(
        self,
        op: str,
        *,
        nth: int = 1,
        count: int = 1,
        errno: int = errno_mod.EIO,
        stall: bool = False,
        offset_range: tuple[int, int] | None = None,
    ) -> Rule:
        """Add a rule (see the module docstring); ValueError for a bad operation or numbers."""
        rule = Rule(op, nth=nth, count=count, errno=errno, stall=stall, offset_range=offset_range)
        self.rules.append(rule)
        return rule

    def release_all(self) -> None:
        """Release every stall rule."""
        for rule in self.rules:
            rule.release()

    def clear(self) -> None:
        """Release every stall and forget all rules."""
        self.release_all()
        self.rules.clear()

    async def _intercept(self, op: str, offset: int | None, length: int, flags: RequestFlags) -> None:
        fired = [rule for rule in self.rules if rule._arrive(op, offset, length)]
        for rule in fired:
            if rule.stall:
                await rule._hold()
        for rule in fired:
            if not rule.stall:
                where = "" if offset is None else f" at offset {offset}"
                message = f"{os.strerror(rule.errno)} (injected into {op}{where} by '{self.node_name}')"
                raise RequestError(rule.errno, message)


def fault_append(graph: BlockGraph, below: BlockNode, node_name: str | None = None) -> FaultNode:
    """Add a fault filter above ``below``, re-pointing all its parents to the filter.

    Remove it with ``graph.drop_filter(node)``.  BlockError for a duplicate or invalid name.
    """
    if node_name is not None:
        graph.check_node_name(node_name)
    node = FaultNode(node_name or graph.auto_name())
    graph.add(node)
    graph.insert_filter(node, below)
    return node


# ---------------------------------------------------------------------- blockdev-add


def _parse_errno(value: Any, name: str) -> int:
    number: Any = value
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if text.isdigit() else getattr(errno_mod, text.upper(), None)
    if isinstance(number, bool) or not isinstance(number, int) or number not in errno_mod.errorcode:
        raise BlockError(f"Parameter '{name}' does not accept value '{value}'")
    return number


def _parse_rules(value: Any) -> list[dict[str, Any]]:
    """The ``rules`` option as keyword arguments of :meth:`FaultNode.inject`."""
    if isinstance(value, Mapping) and all(str(k).isdigit() for k in value):
        value = [value[k] for k in sorted(value, key=int)]  # dotted command line: rules.0.op=...
    if not isinstance(value, list):
        raise BlockError("Invalid parameter type for 'rules', expected: array")
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise BlockError(f"Invalid parameter type for 'rules.{i}', expected: object")
        opts = Options(item, prefix=f"rules.{i}.")
        spec: dict[str, Any] = {
            "op": opts.get_enum("op", OPS),
            "nth": opts.get_int("nth", 1, minimum=1),
            "count": opts.get_int("count", 1, minimum=0),
            "errno": _parse_errno(opts.raw("errno", errno_mod.EIO), f"rules.{i}.errno"),
            "stall": opts.get_bool("stall", False),
        }
        start = opts.get_int("offset", None, minimum=0)
        length = opts.get_int("length", None, minimum=1)
        if start is not None or length is not None:
            start = start or 0
            spec["offset_range"] = (start, _NO_END if length is None else start + length)
        opts.finish()
        specs.append(spec)
    return specs


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    """Open a ``fault-inject`` node (options in the module docstring)."""
    specs = _parse_rules(opts.raw("rules", []))
    child = await open_child(graph, opts, "file")
    if child is None:
        raise BlockError("Parameter 'file' is missing")
    node = FaultNode(node_name)
    graph.attach(node, "file", child)
    node.refresh_limits()
    for spec in specs:
        node.inject(**spec)
    return node
