"""Many libnbd connections to one NBD server at once.

Run by ``/usr/bin/python3`` (Debian's python3-libnbd)::

    nbdsh_connections.py URI IMAGE COUNT EXTRA

Opens COUNT connections and keeps them all open, then tries EXTRA more (which a server with a cap of
COUNT must refuse).  Every open connection then has one 64 KiB read in flight at the same time (at its
own offset), checked against IMAGE, the file the server serves.  If extra connections were refused, one
connection is closed and a new one must be accepted again within a deadline (the server frees the slot
when it sees the close).  Prints one JSON object.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any

#: Debian's python3-libnbd, imported by name: to mypy, run over the whole tree, ``nbd`` is tests/unit/nbd.
nbd: Any = importlib.import_module("nbd")

READ = 64 * 1024
#: How long the server may take to notice a closed connection and accept a new one.
SLOT_DEADLINE = 5.0


def connect(uri: str) -> Any:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def main() -> None:
    uri, image, count, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(image, "rb") as f:
        content = f.read()
    size = len(content)
    handles = [connect(uri) for _ in range(count)]
    refused: list[str] = []
    accepted_extra = 0
    for _ in range(extra):
        try:
            handles.append(connect(uri))
            accepted_extra += 1
        except nbd.Error as err:
            refused.append(err.string)

    # one read in flight on every connection at once
    reads = []
    for i, h in enumerate(handles):
        offset = (i * 4096 * 7) % (size - READ)
        buf = nbd.Buffer(READ)
        reads.append((h, h.aio_pread(buf, offset), buf, offset))
    correct = 0
    for h, cookie, buf, offset in reads:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        correct += buf.to_bytearray() == content[offset : offset + READ]

    reconnected = None
    if refused:
        handles.pop().shutdown()
        deadline = time.monotonic() + SLOT_DEADLINE
        while reconnected is None:
            try:
                handles.append(connect(uri))
                reconnected = round(SLOT_DEADLINE - (deadline - time.monotonic()), 3)
            except nbd.Error:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        # the new connection reads like the others
        if reconnected is not None:
            correct += handles[-1].pread(READ, 0) == content[:READ]

    for h in handles:
        h.shutdown()
    print(
        json.dumps(
            {
                "connected": count + accepted_extra,
                "refused": len(refused),
                "refusal": refused[:1],
                "correct_reads": correct,
                "reconnected_after": reconnected,
            }
        )
    )


if __name__ == "__main__":
    main()
