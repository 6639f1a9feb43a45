"""The transmission fast path against the careful path, through the server's asyncio shell.

:class:`~cowbackup.nbd.transmission.Transmission` serves the usual requests of a receive on its fast
path (:meth:`~cowbackup.nbd.server.ServerProtocol.parse_fast`) and everything else through the core's
events.  With debug logging on, the core refuses the fast path, so the same byte stream can be run both
ways: the replies (per cookie), the disk afterwards, whether the connection ended and what was logged
must be the same, however the stream is cut into receives.  No sockets: the bytes go in through
``get_buffer``/``buffer_updated`` as asyncio would put them, replies are collected as they are sent.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import struct
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from nbd_harness import ALL_FLAGS, KiB, MiB

from cowbackup.block.drivers import open_node
from cowbackup.block.filters.fault import FaultNode
from cowbackup.block.graph import BlockGraph
from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.constants import (
    BASE_ALLOCATION,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from cowbackup.nbd.events import ExportSelected, Greeting, NeedData, SendData
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.handlers import ContextStatus, RequestHandler, base_allocation
from cowbackup.nbd.replies import Message
from cowbackup.nbd.server import ServerProtocol
from cowbackup.nbd.transmission import RECEIVE_SIZE, Transmission

SIZE = 1 * MiB
MAX_PAYLOAD = 256 * KiB
HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")


@dataclass
class Req:
    cookie: int
    cmd: int
    offset: int
    length: int
    flags: int = 0
    payload: bytes = b""
    magic: int = NBD_REQUEST_MAGIC

    def wire(self) -> bytes:
        return (
            HEADER.pack(self.magic, self.flags, self.cmd, self.cookie, self.offset, self.length)
            + self.payload
        )


def write(cookie: int, offset: int, length: int, flags: int = 0) -> Req:
    return Req(cookie, NBD_CMD_WRITE, offset, length, flags, random.Random(cookie).randbytes(length))


class _Output:
    """Replies as the bytes they were when sent (the shell may reuse nothing it sent, but check that)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: Message) -> None:
        self.sent.append(b"".join(bytes(piece) for piece in message))  # type: ignore[arg-type]

    def send_buffers(self, pieces: list[bytes | memoryview], nbytes: int) -> None:
        assert sum(len(piece) for piece in pieces) == nbytes
        self.send(list(pieces))

    def hold(self, held: bool) -> None:
        pass

    def congested(self) -> bool:
        return False

    async def drain(self) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: object) -> None:
        pass

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


def _handshake(
    info: ExportInfo, structured: bool, log: logging.Logger
) -> tuple[ServerProtocol, ExportSelected]:
    server = ServerProtocol(
        lookup=lambda name: info, list_exports=lambda: [info], max_payload=MAX_PAYLOAD, logger=log
    )
    client = ClientProtocol()
    client.receive_data(server.initial_bytes())
    contexts = (BASE_ALLOCATION,) if structured else ()
    for _ in range(100):
        while not isinstance(event := client.next_event(), NeedData):
            if isinstance(event, SendData):
                server.receive_data(event.data)
            elif isinstance(event, Greeting):
                server.receive_data(client.go(info.name, structured=structured, meta_contexts=contexts))
        while not isinstance(sevent := server.next_event(), NeedData):
            if isinstance(sevent, SendData):
                client.receive_data(sevent.data)
            elif isinstance(sevent, ExportSelected):
                return server, sevent
    raise AssertionError("the handshake does not settle")


@dataclass
class Outcome:
    replies: dict[int, bytes]
    disk: bytes
    ended: bool
    logged: list[str] = field(default_factory=list)
    sends: int = 0


def _split(sent: list[bytes], reads: dict[int, int]) -> dict[int, bytes]:
    """Reply bytes per cookie (``reads``: cookie -> length of the data of a successful simple read)."""
    out: dict[int, bytes] = defaultdict(bytes)
    stream = b"".join(sent)
    pos = 0
    while pos < len(stream):
        (magic,) = struct.unpack_from(">I", stream, pos)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            _, error, cookie = SIMPLE.unpack_from(stream, pos)
            end = pos + SIMPLE.size + (0 if error else reads.get(cookie, 0))
        else:
            assert magic == NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
            _, _, _, cookie, length = CHUNK.unpack_from(stream, pos)
            end = pos + CHUNK.size + length
        out[cookie] += stream[pos:end]
        pos = end
    return dict(out)


async def _node(graph: BlockGraph) -> FaultNode:
    mem = await open_node(graph, {"driver": "memory", "node-name": "mem", "size": SIZE})
    await mem.write(0, random.Random(7).randbytes(SIZE // 2))  # data, then zeroes
    fault = await open_node(graph, {"driver": "fault-inject", "node-name": "disk", "file": "mem"})
    assert isinstance(fault, FaultNode)
    return fault


async def _serve(
    stream: bytes,
    reads: dict[int, int],
    chunk: int | None,
    *,
    careful: bool,
    structured: bool = True,
    stall: int = 0,
    faults: bool = False,
    max_in_flight: int = 16,
) -> Outcome:
    """Serve ``stream`` cut into receives of ``chunk`` bytes (None: all at once, 0: random sizes), then
    EOF.  ``stall``: the first that many writes wait in the node until the connection stops reading or
    the stream is all in; ``faults``: the second write fails with ENOSPC, the first read with EIO."""
    graph = BlockGraph()
    node = await _node(graph)
    if stall:
        node.inject("any-write", nth=1, count=stall, stall=True)
    if faults:
        node.inject("write", nth=2, errno=errno.ENOSPC)
        node.inject("read", nth=1, errno=errno.EIO)
    log = logging.getLogger(f"test.fast.{'careful' if careful else 'fast'}")
    log.setLevel(logging.DEBUG if careful else logging.INFO)
    records = _Collect()
    log.addHandler(records)
    try:
        info = ExportInfo("disk", SIZE, ALL_FLAGS, max_block_size=MAX_PAYLOAD)
        server, selected = _handshake(info, structured, log)
        contexts: dict[int, ContextStatus] = {cid: base_allocation for cid, _ in selected.meta_contexts}
        handler = RequestHandler(lambda: node, server.replies, contexts)
        output = _Output()
        transport = _Transport()
        trans = Transmission(
            server, handler, output, stream_protocol=asyncio.Protocol(), max_in_flight=max_in_flight, log=log
        )
        trans.start(transport, b"", eof=False)  # type: ignore[arg-type]
        pos = 0
        rng = random.Random(1)
        while pos < len(stream) and not trans.done.done():
            if not transport.reading:  # every request slot is taken: let the stalled writes go
                node.release_all()
                await asyncio.sleep(0)
                continue
            buf = trans.get_buffer(-1)
            want = len(stream) if chunk is None else chunk or rng.randint(1, 70000)
            n = min(len(buf), len(stream) - pos, want)
            buf[:n] = stream[pos : pos + n]
            trans.buffer_updated(n)
            pos += n
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        node.release_all()
        if not trans.done.done():
            trans.eof_received()
        while trans.tasks:
            await asyncio.gather(*trans.tasks)
        disk = bytearray(SIZE)
        await node.read(0, disk)
        return Outcome(
            _split(output.sent, reads), bytes(disk), trans.done.done(), records.messages, len(output.sent)
        )
    finally:
        log.removeHandler(records)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(reqs: list[Req], chunk: int | None, tail: bytes = b"", **kw: object) -> tuple[Outcome, Outcome]:
    """The stream of ``reqs`` (then ``tail``) served the careful way and the fast way."""
    stream = b"".join(r.wire() for r in reqs) + tail
    reads = {r.cookie: r.length for r in reqs if r.cmd == NBD_CMD_READ}
    careful = asyncio.run(_serve(stream, reads, chunk, careful=True, **kw))  # type: ignore[arg-type]
    fast = asyncio.run(_serve(stream, reads, chunk, careful=False, **kw))  # type: ignore[arg-type]
    return careful, fast


def _mixed() -> list[Req]:
    """Usual and unusual requests, in a stream that goes on after each unusual one."""
    reqs = [
        write(1, 0, 4096),
        Req(2, NBD_CMD_READ, 4096, 4096),
        write(3, 100, 1),
        write(4, 8192, 0),
        Req(5, NBD_CMD_READ, 0, 0),
        write(6, 12345, 70000, NBD_CMD_FLAG_FUA),  # longer than a carried request
        Req(7, NBD_CMD_READ, 5000, 100000),  # sparse: through the handler
        Req(8, NBD_CMD_READ, SIZE // 2 - 4096, 100000, NBD_CMD_FLAG_DF),
        Req(9, NBD_CMD_FLUSH, 0, 0),
        Req(10, NBD_CMD_WRITE_ZEROES, 2000, 9000, NBD_CMD_FLAG_NO_HOLE),
        Req(11, NBD_CMD_WRITE_ZEROES, 20000, 9000, NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA),
        Req(12, NBD_CMD_TRIM, 40000, 5000, NBD_CMD_FLAG_FUA),
        Req(13, NBD_CMD_CACHE, 0, 4096),
        Req(14, NBD_CMD_BLOCK_STATUS, 0, SIZE, NBD_CMD_FLAG_REQ_ONE),
        Req(15, NBD_CMD_BLOCK_STATUS, 4096, SIZE - 4096),
        # unusual: each fails on its own, the connection goes on
        Req(16, NBD_CMD_READ, 0, 4096, 0x80),  # unknown flag
        write(17, SIZE - 100, 200),  # beyond the end: ENOSPC, payload dropped
        Req(18, NBD_CMD_READ, SIZE, 1),
        Req(19, NBD_CMD_READ, 0, MAX_PAYLOAD + 1),  # longer than the maximum
        write(20, 0, MAX_PAYLOAD + 512),  # oversized: payload dropped, EINVAL
        Req(21, 99, 0, 0),  # unknown command
        Req(22, NBD_CMD_WRITE, 0, 4096, NBD_CMD_FLAG_DF, bytes(4096)),  # DF is not for writes
        Req(23, NBD_CMD_FLUSH, SIZE, 10),  # a flush ignores its range (careful path)
        write(24, 300000, RECEIVE_SIZE + 1000),
        Req(25, NBD_CMD_READ, 300000, RECEIVE_SIZE + 1000, NBD_CMD_FLAG_DF),
    ]
    rng = random.Random(5)
    cookie = 100
    for _ in range(60):  # many small ones, as a queue depth of 16 sends them
        cookie += 1
        offset = rng.randrange(0, SIZE - 8192)
        if rng.random() < 0.6:
            reqs.append(
                write(cookie, offset, rng.choice((512, 4096, 4096, 8192)), rng.choice((0, NBD_CMD_FLAG_FUA)))
            )
        else:
            reqs.append(Req(cookie, NBD_CMD_READ, offset, rng.choice((512, 4096, 8192))))
    return reqs


CHUNKS = [None, 0, 1, 7, 28, 100, 4096 + 28, 4096 + 29, 65536]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("structured", [True, False])
def test_mixed_stream_same_as_careful_path(chunk: int | None, structured: bool) -> None:
    reqs = _mixed()
    if not structured:
        reqs = [r for r in reqs if r.cmd != NBD_CMD_BLOCK_STATUS]
    careful, fast = _run([*reqs, Req(999, NBD_CMD_DISC, 0, 0)], chunk, structured=structured)
    assert set(careful.replies) == {r.cookie for r in reqs}
    assert fast.replies == careful.replies
    assert fast.disk == careful.disk
    assert careful.ended and fast.ended
    assert fast.logged == careful.logged


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "tail",
    [
        HEADER.pack(0x25609514, 0, NBD_CMD_READ, 1000, 0, 512),  # bad magic
        HEADER.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, 1000, 0, 512)[:20],  # EOF in a header
        HEADER.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1000, 0, 4096) + bytes(100),  # EOF in a payload
        HEADER.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1000, 0, 200000) + bytes(100),  # a long one
        HEADER.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1000, 0, 1 << 30),  # beyond the hard limit
        HEADER.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 1000, 0, 0) + bytes(50),  # data after DISC
        b"",
    ],
)
def test_stream_ends_same_as_careful_path(chunk: int | None, tail: bytes) -> None:
    reqs = _mixed()[:12]
    careful, fast = _run(reqs, chunk, tail)
    assert fast.replies == careful.replies
    assert fast.disk == careful.disk
    assert fast.ended == careful.ended
    assert fast.logged == careful.logged


@pytest.mark.parametrize("chunk", [None, 4096 + 28, 1000])
def test_writes_that_wait_keep_their_payload(chunk: int | None) -> None:
    """Writes stalled in the node read their payload from a receive buffer while more requests arrive:
    that buffer must not be refilled under them."""
    reqs = [write(i, i * 4096, 4096) for i in range(1, 41)]
    for stall in (1, 5, 16):
        careful, fast = _run(reqs, chunk, stall=stall)
        assert fast.replies == careful.replies
        assert len(fast.replies) == 40
        assert fast.disk == careful.disk
        expected = bytearray(careful.disk)
        for r in reqs:
            expected[r.offset : r.offset + r.length] = r.payload
        assert fast.disk == bytes(expected)


def test_fast_path_sends_the_replies_of_a_receive_together() -> None:
    reqs = [write(i, i * 4096, 4096) for i in range(1, 17)] + [
        Req(i, NBD_CMD_READ, i * 4096, 4096) for i in range(17, 33)
    ]
    careful, fast = _run(reqs, None)
    assert fast.replies == careful.replies
    assert fast.sends == 1


def test_failed_requests_reply_with_their_error() -> None:
    reqs = [write(1, 0, 4096), write(2, 4096, 4096), Req(3, NBD_CMD_READ, 0, 4096), write(4, 0, 512)]
    careful, fast = _run(reqs, None, faults=True)
    assert fast.replies == careful.replies
    assert fast.disk == careful.disk
    assert len(fast.replies) == 4


def test_request_slots_bound_the_requests_that_wait() -> None:
    """At the limit of requests in flight the connection stops reading; nothing is lost."""
    reqs = [write(i, i * 4096, 4096) for i in range(1, 41)]
    careful, fast = _run(reqs, None, stall=40, max_in_flight=4)
    assert fast.replies == careful.replies
    assert len(fast.replies) == 40
    assert fast.disk == careful.disk


def test_os_random_payloads_survive_every_cut() -> None:
    """One WRITE carried over a receive boundary at every possible place."""
    payload = os.urandom(3000)
    reqs = [Req(1, NBD_CMD_WRITE, 777, len(payload), 0, payload), Req(2, NBD_CMD_READ, 777, 3000)]
    stream_len = sum(len(r.wire()) for r in reqs)
    for cut in range(1, stream_len, 97):
        careful, fast = _run(reqs, cut)
        assert fast.replies == careful.replies
        assert fast.replies[2].endswith(payload)
