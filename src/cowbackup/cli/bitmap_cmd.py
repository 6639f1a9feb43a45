"""``cowbackup bitmap``: dirty bitmaps of a running daemon, over QMP.

::

    cowbackup bitmap add    --qmp SOCKET NODE NAME [--granularity SIZE] [--persistent] [--disabled]
    cowbackup bitmap list   --qmp SOCKET [NODE] [--json]     query-named-block-nodes' dirty-bitmaps
    cowbackup bitmap remove --qmp SOCKET NODE NAME
    cowbackup bitmap clear  --qmp SOCKET NODE NAME

Each is one QMP command (``block-dirty-bitmap-add`` / ``-remove`` / ``-clear``), so they work the same
against ``cowbackup daemon`` and ``qemu-storage-daemon``; a refusal is the daemon's message, on one line,
exit status 1. ``list`` prints one row per bitmap -- node, name, dirty bytes, granularity, and the
flags ``recording``, ``busy``, ``persistent``, ``inconsistent`` -- or the entries as JSON with ``--json``.
Anonymous bitmaps (a bitmap's successor while a backup uses it) are listed with the name ``-``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_OK, CliError
from cowbackup.cli.live import columns, connect, execute

_FLAGS = ("recording", "busy", "persistent", "inconsistent")


def add_parser(sub: Any) -> None:
    """Register ``bitmap`` and its verbs."""
    p = sub.add_parser(
        "bitmap",
        help="add, list, remove or clear the dirty bitmaps of a running daemon",
        description="Manage the dirty bitmaps of a running daemon's block nodes (incremental backups).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, helptext: str, named: bool = True) -> argparse.ArgumentParser:
        v: argparse.ArgumentParser = verbs.add_parser(name, help=helptext, description=helptext)
        v.add_argument("--qmp", metavar="SOCKET", required=True, help="the daemon's QMP monitor socket")
        if named:
            v.add_argument("node", metavar="NODE", help="the block node")
            v.add_argument("name", metavar="NAME", help="the bitmap's name")
        return v

    v = verb("add", "create a bitmap that records every write to NODE from now on")
    v.add_argument(
        "--granularity",
        type=argtypes.size,
        help="bytes per bit, a power of two >= 512 (default: the daemon's)",
    )
    v.add_argument("--persistent", action="store_true", help="store it with the image")
    v.add_argument("--disabled", action="store_true", help="create it not recording")
    v.set_defaults(func=run_add)
    verb("remove", "delete a bitmap").set_defaults(func=run_simple, qmp_command="block-dirty-bitmap-remove")
    verb("clear", "mark every bit clean").set_defaults(
        func=run_simple, qmp_command="block-dirty-bitmap-clear"
    )
    v = verb("list", "list the bitmaps of every node, or of NODE", named=False)
    v.add_argument("node", metavar="NODE", nargs="?", help="only this node")
    v.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    v.set_defaults(func=run_list)


async def _one(path: str, command: str, arguments: dict[str, Any]) -> Any:
    async with connect(path) as client:
        return await execute(client, command, arguments)


def run_add(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {"node": args.node, "name": args.name}
    if args.granularity is not None:
        arguments["granularity"] = args.granularity
    if args.persistent:
        arguments["persistent"] = True
    if args.disabled:
        arguments["disabled"] = True
    asyncio.run(_one(args.qmp, "block-dirty-bitmap-add", arguments))
    return EXIT_OK


def run_simple(args: argparse.Namespace) -> int:
    asyncio.run(_one(args.qmp, args.qmp_command, {"node": args.node, "name": args.name}))
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    nodes: list[dict[str, Any]] = asyncio.run(_one(args.qmp, "query-named-block-nodes", {"flat": True}))
    if args.node is not None and not any(n.get("node-name") == args.node for n in nodes):
        raise CliError(f"the daemon has no block node named '{args.node}'")
    rows = [
        {"node": n["node-name"], **entry}
        for n in nodes
        if args.node in (None, n["node-name"])
        for entry in n.get("dirty-bitmaps", [])
    ]
    print(json.dumps(rows) if args.json else table(rows))
    return EXIT_OK


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns NODE NAME DIRTY GRANULARITY FLAGS; DIRTY in bytes, as QEMU counts them."""
    lines: list[tuple[str, ...]] = [("NODE", "NAME", "DIRTY", "GRANULARITY", "FLAGS")]
    for row in rows:
        flags = ",".join(flag for flag in _FLAGS if row.get(flag)) or "-"
        lines.append((row["node"], row.get("name", "-"), str(row["count"]), str(row["granularity"]), flags))
    return columns(lines)
