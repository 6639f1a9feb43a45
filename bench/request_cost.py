"""Per-request cost of the block layer under an NBD export, in-process and deterministic.

Runs 4 KiB NBD WRITE and READ requests through :class:`cowbackup.nbd.handlers.RequestHandler` -- what
the server's connection calls for each request -- on four node stacks over a file in ``--dir``:

* ``file``            one ``file`` node;
* ``raw/file``        ``raw`` over ``file`` (what users run);
* ``cbw/raw/file``    a copy-before-write filter over the same, every cluster already copied;
* ``cbw+inflight``    the same while a copy of an unrelated cluster is in flight (its target stalls);
* ``cbw-first/raw/file``  first touch: every write lands on a cluster not copied yet, so each request
                      first copies one 64 KiB cluster (random data) to a target ``file`` node in ``--dir``
                      (opened as daemon_vs_qsd.py opens its targets).  Each pass over the disk's
                      clusters starts a new snapshot (the copy bitmap set again, ``done`` cleared), a
                      cost of a few instructions per request.

On tmpfs every request completes without suspending, so the handler's coroutine is driven with
``send(None)`` and no event-loop turn is measured: what remains is the Python of the request path.
Prints the minimum over ``--repeat`` runs of ``--count`` requests, in µs per request.

``--through server`` measures the connection's per-request work as well: the requests go in as wire
bytes through :class:`cowbackup.nbd.transmission.Transmission` (what the event loop calls when the
socket has data: parse, start, serve, reply) after a handshake in memory, ``--batch`` requests per
receive (1: one request per recv, as at queue depth 1; 16: what a client at queue depth 16 sends in
one go), and the replies are written to ``/dev/null`` by the connection's
:class:`~cowbackup.nbd.vector_writer.VectorWriter`.  Still no event-loop turn, socket or kernel time.

For instruction counts, run one stack and operation under callgrind at two counts and divide the
difference (the start-up cost cancels out)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/request_cost.py \\
        --only raw/file --op write --count 2000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable

from cowbackup.block.copy import CopyCall
from cowbackup.block.drivers import open_node
from cowbackup.block.filters.cbw import cbw_append
from cowbackup.block.graph import BlockGraph, Root
from cowbackup.block.node import BlockNode
from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.constants import (
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_REQUEST_MAGIC,
)
from cowbackup.nbd.events import ExportSelected, Greeting, NeedData, Request, SendData
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.handlers import RequestHandler
from cowbackup.nbd.replies import ReplyBuilder
from cowbackup.nbd.server import ServerProtocol
from cowbackup.nbd.transmission import Transmission
from cowbackup.nbd.vector_writer import VectorWriter

STACKS = ("file", "raw/file", "cbw/raw/file", "cbw+inflight", "cbw-first/raw/file")
SIZE = 64 * 1024 * 1024
BLOCK = 4096
CLUSTER = 64 * 1024


def _nothing() -> None:
    pass


async def _stack(
    graph: BlockGraph, kind: str, path: str, target: str
) -> tuple[BlockNode, list[object], Callable[[], None]]:
    """The export's node for ``kind``, what must stay alive while it is used, and what makes every
    cluster "to copy" again (a no-op but for ``cbw-first``)."""
    keep: list[object] = []
    rearm: Callable[[], None] = _nothing
    file_opts = {"driver": "file", "node-name": "disk-file", "filename": path}
    if kind == "file":
        top = await open_node(graph, file_opts)
    else:
        await open_node(graph, file_opts)
        top = await open_node(graph, {"driver": "raw", "node-name": "disk", "file": "disk-file"})
    root = Root("export 'bench'")
    graph.attach(root, "root", top)
    keep.append(root)
    if kind == "cbw-first/raw/file":
        await open_node(
            graph,
            {
                "driver": "file",
                "node-name": "tgt",
                "filename": target,
                "discard": "unmap",
                "detect-zeroes": "unmap",
            },
        )
        filt, bcs = cbw_append(graph, top.node_name, "tgt")
        done = filt.done
        assert done is not None

        def new_snapshot() -> None:
            bcs.bitmap.set_all()
            done.clear()

        rearm = new_snapshot
        rearm()
    elif kind.startswith("cbw"):
        # The target's writes stall for a minute: a copy started there stays in flight.
        await open_node(
            graph, {"driver": "null-co", "node-name": "tgt", "size": SIZE, "latency-ns": 60 * 10**9}
        )
        _filt, bcs = cbw_append(graph, top.node_name, "tgt")
        if kind == "cbw+inflight":
            far = SIZE - CLUSTER
            bcs.bitmap.set(far, CLUSTER)
            bcs.target_is_zero = True
            task = asyncio.ensure_future(bcs.copy(CopyCall(far, CLUSTER, ignore_ratelimit=True)))
            keep.append(task)
            await asyncio.sleep(0)  # the copy runs until the target stalls it
            assert bcs.in_flight_bytes == CLUSTER
    return root.node, keep, rearm


def _drive(make: Callable[[], Awaitable[object]], count: int) -> None:
    for _ in range(count):
        coro = make()
        try:
            coro.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            continue
        raise RuntimeError("a request suspended: use a memory-backed --dir (tmpfs)")


#: An NBD request header (magic, flags, type, cookie, offset, length), as a client sends it.
_REQUEST = struct.Struct(">IHHQQI")


def _handshake(node: BlockNode) -> ServerProtocol:
    """A server core in transmission for an export of ``node``, negotiated in memory with our client
    (structured replies, no metadata contexts)."""
    info = ExportInfo(
        "bench", node.size, NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_WRITE_ZEROES
    )
    server = ServerProtocol(lookup=lambda name: info, list_exports=lambda: [info])
    client = ClientProtocol()
    client.receive_data(server.initial_bytes())
    for _ in range(100):
        moved = False
        while not isinstance(event := client.next_event(), NeedData):
            moved = True
            if isinstance(event, SendData):
                server.receive_data(event.data)
            elif isinstance(event, Greeting):  # our client flags went out just before
                server.receive_data(client.go("bench", meta_contexts=()))
        while not isinstance(sevent := server.next_event(), NeedData):
            moved = True
            if isinstance(sevent, SendData):
                client.receive_data(sevent.data)
            elif isinstance(sevent, ExportSelected):
                return server
        if not moved:
            break
    raise RuntimeError("the handshake does not settle")


class _Transport:
    """What :class:`Transmission` uses of a socket transport; the bench feeds it bytes itself."""

    def set_protocol(self, protocol: object) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        raise RuntimeError("a request suspended: use a memory-backed --dir (tmpfs)")

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


def _serve_loop(
    node: BlockNode, reqs: list[Request], payload: bytes, batch: int, rearm: Callable[[], None]
) -> Callable[[int], None]:
    """A function running ``n`` requests through a connection's transmission, ``batch`` per receive
    (``rearm`` called before each pass over ``reqs``)."""
    server = _handshake(node)
    loop = asyncio.get_running_loop()
    devnull = os.open(os.devnull, os.O_WRONLY)
    writer = VectorWriter(loop, devnull)
    os.close(devnull)  # the writer keeps its own duplicate
    handler = RequestHandler(lambda: node, server.replies, {})
    log = logging.getLogger("bench")
    trans = Transmission(
        server, handler, writer, stream_protocol=asyncio.Protocol(), max_in_flight=16, log=log
    )
    trans.start(_Transport(), b"", eof=False)  # type: ignore[arg-type]
    wire = [
        _REQUEST.pack(NBD_REQUEST_MAGIC, 0, r.type, r.cookie, r.offset, r.length)
        + (payload if r.type == NBD_CMD_WRITE else b"")
        for r in reqs
    ]
    # Groups of ``batch`` consecutive requests, as one receive each.
    groups = [b"".join(wire[i : i + batch]) for i in range(0, len(wire), batch)]
    it = iter(range(1 << 62))

    def run(n: int) -> None:
        for _ in range(n // batch):
            i = next(it) % len(groups)
            if not i:
                rearm()
            data = groups[i]
            buf = trans.get_buffer(len(data))
            buf[: len(data)] = data
            trans.buffer_updated(len(data))
        if trans.tasks or trans.in_flight or writer.queued:
            raise RuntimeError("a request suspended: use a memory-backed --dir (tmpfs)")

    return run


async def _measure(
    kind: str, op: str, count: int, repeat: int, directory: str, through: str = "handler", batch: int = 1
) -> float:
    graph = BlockGraph()
    with tempfile.NamedTemporaryFile(dir=directory) as f, tempfile.NamedTemporaryFile(dir=directory) as t:
        f.write(os.urandom(SIZE // 16) * 16)
        f.flush()
        t.truncate(SIZE)  # a fresh sparse target
        node, keep, rearm = await _stack(graph, kind, f.name, t.name)
        handler = RequestHandler(lambda: node, ReplyBuilder(structured=True, meta_contexts={}), {})
        payload = memoryview(os.urandom(BLOCK))
        cmd = NBD_CMD_WRITE if op == "write" else NBD_CMD_READ
        # Offsets in the first half, a cluster apart: never the stalled copy's cluster.  First touch:
        # every cluster of the disk once per pass (7919 is odd, so this is a permutation of 1024).
        span = SIZE // CLUSTER if kind == "cbw-first/raw/file" else SIZE // 2 // CLUSTER
        reqs = [Request(i, cmd, 0, (i * 7919 % span) * CLUSTER, BLOCK) for i in range(1024)]
        it = iter(range(1 << 62))

        def make() -> Awaitable[object]:
            i = next(it) & 1023
            if not i:
                rearm()
            return handler.handle(reqs[i], payload if op == "write" else None)

        if through == "server":
            run = _serve_loop(node, reqs, bytes(payload), batch, rearm)
        else:

            def run(n: int) -> None:
                _drive(make, n)

        run(len(reqs))  # warm up: first-time paths (each cluster marked done, caches)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            run(count)
            best = min(best, (time.perf_counter_ns() - t0) / count / 1000)
        for obj in keep:
            if isinstance(obj, asyncio.Future):
                obj.cancel()
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", choices=STACKS, action="append")
    parser.add_argument("--op", choices=("write", "read"), action="append")
    parser.add_argument("--through", choices=("handler", "server"), default="handler")
    parser.add_argument("--batch", type=int, default=1, help="requests per receive (--through server)")
    args = parser.parse_args()
    for op in args.op or ("write", "read"):
        for kind in args.only or STACKS:
            us = asyncio.run(_measure(kind, op, args.count, args.repeat, args.dir, args.through, args.batch))
            print(f"{op:5} {kind:18} {us:7.2f} µs/request")


if __name__ == "__main__":
    main()
