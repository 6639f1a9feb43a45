"""The transmission phase: requests the server parses and checks, the payload bypass, and replies."""

from __future__ import annotations

import pytest
from nbd_harness import GiB, KiB, MiB, Payload, Wire, connect, make_server

from cowbackup.nbd import constants as c
from cowbackup.nbd import wire
from cowbackup.nbd.errors import ProtocolError, StateError
from cowbackup.nbd.events import (
    ConnectionClosed,
    Disconnect,
    ErrorChunk,
    NeedData,
    NoneChunk,
    OffsetDataChunk,
    OffsetHoleChunk,
    ReplyData,
    Request,
    SimpleReply,
)
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.meta import MetaContextRegistry, exact_names
from cowbackup.nbd.replies import ReadSegment, split_read
from cowbackup.nbd.server import ServerProtocol


def raw_request(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, cookie: int = 7) -> bytes:
    return wire.REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def requests_of(events: list[object]) -> list[Request]:
    return [e for e in events if isinstance(e, Request)]


# -- every command, fed at once and byte by byte, payloads through both paths ----------------------------

ALL_COMMANDS = [
    (c.NBD_CMD_READ, 0, 0, 4096),
    (c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF | c.NBD_CMD_FLAG_FUA, 512, 512),
    (c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_FUA, 4096, 3000),
    (c.NBD_CMD_FLUSH, 0, 0, 0),
    (c.NBD_CMD_TRIM, 0, 0, 1 * MiB),
    (c.NBD_CMD_CACHE, 0, 0, 1 * MiB),
    (c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_NO_HOLE | c.NBD_CMD_FLAG_FAST_ZERO, 1000, 10),
    (c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 0, 1 * MiB),
    (c.NBD_CMD_WRITE, 0, 1 * MiB - 1, 1),
    (c.NBD_CMD_READ, 0, 0, 0),
]


def run_all_commands(chunk: int | None, bypass: bool) -> list[object]:
    w = connect(chunk=chunk)
    w.bypass = bypass
    for cookie, (cmd, flags, offset, length) in enumerate(ALL_COMMANDS):
        header = w.client.request_bytes(cmd, flags, offset, length, cookie)
        payload = bytes(range(256)) * (length // 256) + bytes(length % 256) if cmd == c.NBD_CMD_WRITE else b""
        w.client_send(header + payload)
    w.run()  # all requests pipelined in one buffer
    return w.take_server_events()


def test_every_command() -> None:
    events = run_all_commands(None, True)
    requests = requests_of(events)
    assert [(r.type, r.flags, r.offset, r.length) for r in requests] == ALL_COMMANDS
    assert all(r.error == 0 for r in requests)
    assert [r.cookie for r in requests] == list(range(len(ALL_COMMANDS)))
    payloads = [e.data for e in events if isinstance(e, Payload)]
    assert [len(p) for p in payloads] == [3000, 1]
    assert payloads[0][:256] == bytes(range(256))
    assert requests[1].df and requests[1].fua and requests[6].no_hole and requests[6].fast_zero
    assert requests[7].req_one and requests[2].is_write


@pytest.mark.parametrize(("chunk", "bypass"), [(None, False), (1, True), (1, False), (7, True), (4096, True)])
def test_every_command_any_chunking_same_events(chunk: int | None, bypass: bool) -> None:
    assert run_all_commands(chunk, bypass) == run_all_commands(None, True)


# -- errors the core finds itself ---------------------------------------------------------------------------


def custom_server() -> ServerProtocol:
    exports = {
        "disk": ExportInfo("disk", 1 * MiB, c.NBD_FLAG_SEND_FUA | c.NBD_FLAG_SEND_WRITE_ZEROES),
        "ro": ExportInfo(
            "ro", 1 * MiB, c.NBD_FLAG_READ_ONLY | c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES
        ),
        "big": ExportInfo("big", 8 * GiB, c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES),
    }
    return make_server(exports, max_payload=1 * MiB)


ERROR_CASES = [
    # export, structured, cmd, flags, offset, length, expected error
    ("disk", True, 9, 0, 0, 0, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_RESIZE, 0, 0, 0, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_READ, c.NBD_CMD_FLAG_NO_HOLE, 0, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_READ, 0x40, 0, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_READ, c.NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512, c.NBD_EINVAL),
    ("disk", False, c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 0, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FAST_ZERO, 0, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_DF, 0, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_TRIM, 0, 0, 512, c.NBD_EINVAL),  # not advertised
    ("disk", True, c.NBD_CMD_FLUSH, 0, 0, 0, c.NBD_EINVAL),  # not advertised
    ("disk", True, c.NBD_CMD_READ, 0, 1 * MiB - 511, 512, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_READ, 0, 2**64 - 1, 1, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_CACHE, 0, 1 * MiB, 1, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_WRITE_ZEROES, 0, 1 * MiB, 1, c.NBD_ENOSPC),
    ("disk", True, c.NBD_CMD_BLOCK_STATUS, 0, 1 * MiB, 1, c.NBD_EINVAL),
    ("disk", True, c.NBD_CMD_READ, 0, 0, 1 * MiB + 1, c.NBD_EINVAL),  # beyond the end
    ("big", True, c.NBD_CMD_READ, 0, 0, 1 * MiB + 1, c.NBD_EINVAL),  # longer than max_payload
    ("big", False, c.NBD_CMD_BLOCK_STATUS, 0, 0, 512, c.NBD_EINVAL),  # no metadata context
    ("ro", True, c.NBD_CMD_TRIM, 0, 0, 512, c.NBD_EPERM),
    ("ro", True, c.NBD_CMD_WRITE_ZEROES, 0, 0, 512, c.NBD_EPERM),
    ("ro", True, c.NBD_CMD_READ, 0, 0, 512, 0),
    ("big", True, c.NBD_CMD_TRIM, 0, 0, 2**32 - 1, 0),
    ("big", True, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FUA, 4 * GiB, 2**32 - 1, 0),
    ("big", True, c.NBD_CMD_BLOCK_STATUS, 0, 0, 2**32 - 1, 0),
    ("big", True, c.NBD_CMD_CACHE, 0, 0, 2**32 - 1, 0),
    ("big", True, c.NBD_CMD_READ, 0, 8 * GiB, 0, 0),
    ("big", True, c.NBD_CMD_FLUSH, 0, 123, 456, c.NBD_EINVAL),
]


@pytest.mark.parametrize(("export", "structured", "cmd", "flags", "offset", "length", "error"), ERROR_CASES)
def test_request_checks(
    export: str, structured: bool, cmd: int, flags: int, offset: int, length: int, error: int
) -> None:
    w = connect(export, server=custom_server(), structured=structured)
    w.client_send(raw_request(cmd, offset, length, flags=flags) + raw_request(c.NBD_CMD_READ, 0, 1, cookie=8))
    w.run()
    first, second = requests_of(w.take_server_events())
    assert (first.type, first.error) == (cmd, error), first.error_message
    assert (first.cookie, first.payload_length) == (7, 0)
    assert bool(first.error_message) == bool(error)
    assert (second.cookie, second.error) == (8, 0)


@pytest.mark.parametrize(
    ("export", "offset", "length", "error"),
    [
        ("ro", 0, 4096, c.NBD_EPERM),
        ("disk", 1 * MiB - 10, 4096, c.NBD_ENOSPC),
        ("big", 0, 2 * MiB, c.NBD_EINVAL),  # over max_payload, under the discard limit
    ],
)
@pytest.mark.parametrize("chunk", [None, 1000])
def test_failed_write_payload_is_discarded(
    export: str, offset: int, length: int, error: int, chunk: int | None
) -> None:
    w = connect(export, server=custom_server(), chunk=chunk)
    w.client_send(raw_request(c.NBD_CMD_WRITE, offset, length) + bytes(length))
    w.client_send(raw_request(c.NBD_CMD_READ, 0, 1, cookie=8))
    w.run()
    events = w.take_server_events()
    assert [type(e) for e in events] == [Request, Request]
    failed, read = requests_of(events)
    assert (failed.error, failed.payload_length, failed.length) == (error, 0, length)
    assert (read.cookie, read.error) == (8, 0)


def test_absurd_write_ends_the_connection() -> None:
    w = connect("big", server=custom_server())
    w.client_send(raw_request(c.NBD_CMD_WRITE, 0, 2**32 - 1))
    w.run()
    (error,) = w.take_server_events()
    assert error == ProtocolError("NBD_CMD_WRITE with a 4294967295-byte payload")


def test_disconnect_then_nothing_more() -> None:
    w = connect()
    w.client_send(w.client.request_bytes(c.NBD_CMD_DISC, 0, 0, 0, 99))
    with pytest.raises(StateError):
        w.client.request_bytes(c.NBD_CMD_READ, 0, 0, 1, 1)
    w.run()
    assert w.take_server_events() == [Disconnect("NBD_CMD_DISC")]
    w.client_send(raw_request(c.NBD_CMD_READ, 0, 1))
    w.run()
    assert w.take_server_events() == [ProtocolError("data after the client disconnected")]


def test_disconnect_then_eof() -> None:
    w = connect()
    w.client_send(raw_request(c.NBD_CMD_DISC))
    w.client_close()
    w.run()
    assert w.take_server_events() == [Disconnect("NBD_CMD_DISC"), ConnectionClosed()]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (wire.EXTENDED_REQUEST.pack(c.NBD_EXTENDED_REQUEST_MAGIC, 0, 0, 1, 0, 512), "extended headers"),
        (b"\x25\x60\x95\x14" + bytes(24), "bad request magic 0x25609514"),
    ],
)
def test_bad_request_magic(data: bytes, message: str) -> None:
    w = connect()
    w.client_send(data)
    w.run()
    (error,) = w.take_server_events()
    assert isinstance(error, ProtocolError) and message in error.message


# -- the payload contract ----------------------------------------------------------------------------------


def server_in_transmission() -> ServerProtocol:
    w = connect()
    return w.server


def test_payload_bypass_contract() -> None:
    server = server_in_transmission()
    chunk = raw_request(c.NBD_CMD_WRITE, 0, 10) + b"0123"
    server.receive_data(chunk)
    request = server.next_event()
    assert isinstance(request, Request) and request.payload_length == 10
    assert server.payload_pending == 10
    with pytest.raises(StateError, match="payload bytes not accounted"):
        server.next_event()
    with pytest.raises(StateError, match="take_buffered"):
        server.payload_consumed(6)  # four payload bytes are still buffered
    view = server.take_buffered(100)
    assert bytes(view) == b"0123" and view.obj is chunk  # zero-copy: a view of the received bytes
    with pytest.raises(StateError):
        server.payload_consumed(7)  # more than owed
    server.payload_consumed(6)  # "read from the socket" by the shell
    assert server.payload_pending == 0
    with pytest.raises(StateError):
        server.take_buffered(1)
    assert isinstance(server.next_event(), NeedData)
    server.receive_data(raw_request(c.NBD_CMD_FLUSH))
    assert bytes(view) == b"0123"  # still valid
    event = server.next_event()
    assert isinstance(event, Request) and event.type == c.NBD_CMD_FLUSH


def test_payload_split_over_chunks_and_followed_by_a_request() -> None:
    server = server_in_transmission()
    data = raw_request(c.NBD_CMD_WRITE, 0, 6) + b"abcdef" + raw_request(c.NBD_CMD_READ, 0, 1, cookie=8)
    for i in range(0, len(data), 5):
        server.receive_data(data[i : i + 5])
    request = server.next_event()
    assert isinstance(request, Request)
    assert bytes(server.take_buffered(6)) == b"abcdef"  # joined across chunks
    server.payload_consumed(0)
    read = server.next_event()
    assert isinstance(read, Request) and read.cookie == 8


def test_eof_in_the_middle_of_a_payload() -> None:
    server = server_in_transmission()
    server.receive_data(raw_request(c.NBD_CMD_WRITE, 0, 10) + b"01")
    assert isinstance(server.next_event(), Request)
    server.receive_data(b"")
    with pytest.raises(StateError):
        server.next_event()
    assert bytes(server.take_buffered(10)) == b"01"
    assert server.next_event() == ProtocolError("connection closed in the middle of a payload")


def test_eof_with_requests_answered() -> None:
    w = connect()
    w.client_close()
    w.run()
    assert w.take_server_events() == [ConnectionClosed()]


# -- replies: server builder -> client parser ------------------------------------------------------------


def test_simple_replies() -> None:
    for chunk in (None, 1):
        w = connect(structured=False, chunk=chunk)
        send = w.client.request_bytes
        w.client_send(send(c.NBD_CMD_READ, 0, 0, 5, 1) + send(c.NBD_CMD_READ, 0, 5, 3, 2))
        w.client_send(send(c.NBD_CMD_WRITE, 0, 0, 2, 3) + b"hi" + send(c.NBD_CMD_READ, 0, 0, 0, 4))
        w.run()
        r1, r2, write, empty = requests_of(w.take_server_events())
        replies = w.server.replies
        w.server_send(replies.read(r1, memoryview(b"hello")))
        w.server_send(replies.error(r2, c.NBD_EIO, "ignored without structured replies"))
        w.server_send(replies.ok(write))
        w.server_send(replies.read(empty, b""))
        w.run()
        assert w.take_client_events() == [
            ReplyData(1, 0, 5),
            Payload(b"hello"),
            SimpleReply(2, c.NBD_EIO),
            SimpleReply(3, 0),
            SimpleReply(4, 0),
        ]
        assert w.client.in_flight == 0
        with pytest.raises(StateError):
            replies.offset_hole(r1, 0, 1)


def read_back(events: list[object], offset: int, length: int) -> bytes:
    out = bytearray(length)
    for i, event in enumerate(events):
        if isinstance(event, OffsetDataChunk):
            payload = events[i + 1]
            assert isinstance(payload, Payload)
            out[event.offset - offset : event.offset - offset + event.length] = payload.data
        elif isinstance(event, OffsetHoleChunk):
            assert not any(out[event.offset - offset : event.offset - offset + event.length])
    return bytes(out)


@pytest.mark.parametrize("df", [False, True])
@pytest.mark.parametrize("chunk", [None, 1])
def test_sparse_read(df: bool, chunk: int | None) -> None:
    w = connect(chunk=chunk)
    disk = bytearray(64 * KiB)
    disk[0:4096] = b"a" * 4096
    disk[20480:24576] = b"b" * 4096
    extents = [(3072, False), (16384, True), (4096, False), (40960, True)]  # block status from 1024
    flags = c.NBD_CMD_FLAG_DF if df else 0
    w.client_send(w.client.request_bytes(c.NBD_CMD_READ, flags, 1024, 32768, 5))
    w.run()
    (req,) = requests_of(w.take_server_events())
    segments = split_read(req.offset, req.length, extents)
    assert segments == [
        ReadSegment(1024, 3072, False),
        ReadSegment(4096, 16384, True),
        ReadSegment(20480, 4096, False),
        ReadSegment(24576, 9216, True),
    ]
    parts = [(seg, None if seg.zero else memoryview(disk)[seg.offset : seg.end]) for seg in segments]
    message = w.server.replies.read_segments(req, parts)
    assert any(piece.obj is disk for piece in message if isinstance(piece, memoryview))  # no copy
    w.server_send(message)
    w.run()
    events = w.take_client_events()
    chunks = [e for e in events if isinstance(e, OffsetDataChunk | OffsetHoleChunk)]
    assert len(chunks) == len([e for e in events if not isinstance(e, Payload)])
    assert [e.done for e in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) == (1 if df else 4)
    assert read_back(events, 1024, 32768) == bytes(disk[1024 : 1024 + 32768])
    assert w.client.in_flight == 0


def test_split_read() -> None:
    assert split_read(0, 100, []) == [ReadSegment(0, 100, False)]
    assert split_read(0, 100, [(10, True), (10, True), (500, False)]) == [
        ReadSegment(0, 20, True),
        ReadSegment(20, 80, False),
    ]
    assert split_read(0, 100, [(10, False), (5, True), (200, False)], min_hole=8) == [
        ReadSegment(0, 100, False)
    ]
    assert split_read(50, 0, [(10, True)]) == []
    with pytest.raises(ValueError, match="positive"):
        split_read(0, 10, [(0, True)])


def test_read_errors_and_error_offsets() -> None:
    w = connect()
    w.client_send(w.client.request_bytes(c.NBD_CMD_READ, 0, 0, 8192, 1))
    w.client_send(w.client.request_bytes(c.NBD_CMD_READ, 0, 0, 8192, 2))
    w.client_send(w.client.request_bytes(c.NBD_CMD_FLUSH, 0, 0, 0, 3))
    w.run()
    r1, r2, flush = requests_of(w.take_server_events())
    replies = w.server.replies
    with pytest.raises(StateError):
        replies.ok(r1)  # never a simple reply to a READ once structured replies are agreed
    w.server_send(replies.error(r1, c.NBD_EIO, "disk on fire " + "\0" + "x" * 5000))
    w.server_send(replies.offset_data(r2, 0, b"\1" * 4096))
    w.server_send(replies.error_chunk(r2, c.NBD_EIO, "bad sector", offset=4096))
    w.server_send(replies.done(r2))
    w.server_send(replies.error(flush, c.NBD_ENOSPC, "full"))
    w.run()
    events = w.take_client_events()
    first = events[0]
    assert isinstance(first, ErrorChunk) and first.done and first.error == c.NBD_EIO
    assert first.message.startswith("disk on fire  x") and len(first.message) == 4096
    assert first.exception().errno == 5
    offset_error = events[3]
    assert isinstance(offset_error, ErrorChunk)
    assert (offset_error.type, offset_error.offset, offset_error.message) == (
        c.NBD_REPLY_TYPE_ERROR_OFFSET,
        4096,
        "bad sector",
    )
    assert isinstance(events[4], NoneChunk) and events[4].done
    assert isinstance(events[5], ErrorChunk) and events[5].message == "full"
    assert w.client.in_flight == 0


def qemu_connect() -> Wire:
    registry = MetaContextRegistry.base()
    registry.register("qemu", exact_names(lambda: ["qemu:dirty-bitmap:b0"]))
    server = make_server({"vm": ExportInfo("vm", 1 * MiB, meta_contexts=registry, min_block_size=512)})
    return connect("vm", server=server, meta_contexts=["base:allocation", "qemu:dirty-bitmap:b0"])


def test_block_status_two_contexts_and_req_one() -> None:
    w = qemu_connect()
    assert w.client.meta_contexts == {"base:allocation": 1, "qemu:dirty-bitmap:b0": 2}
    w.client_send(w.client.request_bytes(c.NBD_CMD_BLOCK_STATUS, 0, 0, 8192, 1))
    w.client_send(w.client.request_bytes(c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 0, 8192, 2))
    w.run()
    full, one = requests_of(w.take_server_events())
    replies = w.server.replies
    allocation = [(4096, 0), (4096, c.NBD_STATE_HOLE | c.NBD_STATE_ZERO), (1 * MiB, 0)]
    dirty = [(2**40, c.NBD_STATE_DIRTY)]
    with pytest.raises(ValueError, match="contexts"):
        replies.block_status(full, {1: allocation})
    w.server_send(replies.block_status(full, {1: allocation, 2: dirty}))
    w.server_send(replies.block_status(one, {2: dirty, 1: allocation}))
    w.run()
    events = w.take_client_events()
    summary = [(e.cookie, e.context_id, e.extents, e.done) for e in events]  # type: ignore[attr-defined]
    assert summary == [
        (1, 1, ((4096, 0), (4096, 3)), False),
        (1, 2, ((2**32 - 512, 1),), True),
        (2, 2, ((8192, 1),), False),
        (2, 1, ((4096, 0),), True),
    ]


def test_builder_refusals() -> None:
    w = connect()
    w.client_send(w.client.request_bytes(c.NBD_CMD_READ, 0, 0, 100, 1))
    w.client_send(w.client.request_bytes(c.NBD_CMD_BLOCK_STATUS, 0, 0, 100, 2))
    w.run()
    read, status = requests_of(w.take_server_events())
    replies = w.server.replies
    with pytest.raises(ValueError, match="NBD error value"):
        replies.error(read, 30)  # EROFS is not an NBD error: errno_to_nbd first
    with pytest.raises(ValueError, match="outside"):
        replies.offset_data(read, 50, b"x" * 51)
    with pytest.raises(ValueError, match="outside"):
        replies.error_chunk(read, c.NBD_EIO, offset=100)
    with pytest.raises(ValueError, match="continue"):
        replies.read_segments(read, [(ReadSegment(10, 90, True), None)])
    with pytest.raises(ValueError, match="end"):
        replies.read_segments(read, [(ReadSegment(0, 90, True), None)])
    with pytest.raises(ValueError, match="without data"):
        replies.read_segments(read, [(ReadSegment(0, 100, False), None)])
    with pytest.raises(ValueError, match="read reply"):
        replies.read(status, b"x" * 100)
    with pytest.raises(StateError):
        replies.ok(status)
    with pytest.raises(ValueError, match="at least one"):
        replies.block_status(status, {1: []})
    with pytest.raises(ValueError, match="invalid extent"):
        replies.block_status(status, {1: [(0, 0)]})
    with pytest.raises(StateError):
        make_server().replies  # noqa: B018 - no export selected
