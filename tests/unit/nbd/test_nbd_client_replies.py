"""The client's transmission phase: request checks and every malformed reply -> ProtocolError."""

from __future__ import annotations

import pytest
from nbd_harness import Payload, Wire, connect, make_server

from cowbackup.nbd import constants as c
from cowbackup.nbd import wire
from cowbackup.nbd.errors import ProtocolError, StateError
from cowbackup.nbd.events import BlockStatusChunk, ConnectionClosed, ErrorChunk, NoneChunk, SimpleReply
from cowbackup.nbd.exports import ExportInfo

STRUCTURED = c.NBD_STRUCTURED_REPLY_MAGIC
DONE = c.NBD_REPLY_FLAG_DONE


def chunk(cookie: int, rtype: int, payload: bytes, flags: int = DONE) -> bytes:
    return wire.STRUCTURED_REPLY.pack(STRUCTURED, flags, rtype, cookie, len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = DONE) -> bytes:
    return chunk(cookie, c.NBD_REPLY_TYPE_OFFSET_DATA, wire.OFFSET_DATA.pack(offset) + data, flags)


def hole_chunk(cookie: int, offset: int, length: int, flags: int = DONE) -> bytes:
    return chunk(cookie, c.NBD_REPLY_TYPE_OFFSET_HOLE, wire.OFFSET_HOLE.pack(offset, length), flags)


def status_chunk(cookie: int, context: int, extents: list[tuple[int, int]], flags: int = DONE) -> bytes:
    payload = wire.BLOCK_STATUS.pack(context) + b"".join(wire.BLOCK_DESCRIPTOR.pack(*e) for e in extents)
    return chunk(cookie, c.NBD_REPLY_TYPE_BLOCK_STATUS, payload, flags)


def error_chunk(
    cookie: int,
    error: int,
    message: bytes,
    rtype: int = c.NBD_REPLY_TYPE_ERROR,
    tail: bytes = b"",
    flags: int = DONE,
) -> bytes:
    return chunk(cookie, rtype, wire.ERROR.pack(error, len(message)) + message + tail, flags)


def simple(cookie: int, error: int = 0) -> bytes:
    return wire.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def with_requests(structured: bool = True) -> Wire:
    """A client in transmission with: 1 READ [0, 4096), 2 READ [0, 4096) with DF, 3 BLOCK_STATUS, 4 FLUSH,
    5 BLOCK_STATUS with REQ_ONE, 6 WRITE."""
    w = connect(structured=structured, meta_contexts=("base:allocation",) if structured else ())
    send = w.client.request_bytes
    send(c.NBD_CMD_READ, 0, 0, 4096, 1)
    send(c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF if structured else 0, 0, 4096, 2)
    if structured:
        send(c.NBD_CMD_BLOCK_STATUS, 0, 0, 4096, 3)
    send(c.NBD_CMD_FLUSH, 0, 0, 0, 4)
    if structured:
        send(c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 0, 4096, 5)
    send(c.NBD_CMD_WRITE, 0, 0, 10, 6)
    return w


def replies(data: bytes, *, structured: bool = True, close: bool = False) -> list[object]:
    w = with_requests(structured)
    w.server_send(data)
    if close:
        w.server_close()
    w.run()
    return w.take_client_events()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (simple(99), "unknown cookie 0x63"),
        (data_chunk(99, 0, b"x"), "unknown cookie 0x63"),
        (b"\x67\x44\x66\x99" + bytes(12), "bad reply magic"),
        (simple(1), "simple reply to NBD_CMD_READ although structured"),
        (simple(3), "successful simple reply to NBD_CMD_BLOCK_STATUS"),
        (chunk(1, c.NBD_REPLY_TYPE_OFFSET_DATA, wire.OFFSET_DATA.pack(0)), "with length 8"),
        (data_chunk(1, 4000, b"x" * 100), "outside the request"),
        (data_chunk(1, 0, b"x" * 100, 0) + data_chunk(1, 50, b"x" * 100), "overlaps"),
        (data_chunk(1, 100, b"x" * 100, 0) + hole_chunk(1, 0, 101), "overlaps"),
        (data_chunk(1, 0, b"x" * 100), "ends after 100 of 4096 bytes"),
        (data_chunk(2, 0, b"x" * 100, 0) + hole_chunk(2, 100, 3996), "NBD_CMD_FLAG_DF"),
        (hole_chunk(1, 0, 0), "of 0 bytes"),
        (chunk(1, c.NBD_REPLY_TYPE_OFFSET_HOLE, bytes(11)), "with length 11"),
        (hole_chunk(4, 0, 1), "unexpected NBD_REPLY_TYPE_OFFSET_HOLE chunk for NBD_CMD_FLUSH"),
        (chunk(4, c.NBD_REPLY_TYPE_NONE, b"", 0), "with length 0 and flags 0x0"),
        (chunk(4, c.NBD_REPLY_TYPE_NONE, b"x"), "with length 1"),
        (status_chunk(1, 1, [(512, 0)]), "unexpected NBD_REPLY_TYPE_BLOCK_STATUS chunk for NBD_CMD_READ"),
        (status_chunk(3, 7, [(512, 0)]), "context 7, unknown or already answered"),
        (status_chunk(3, 1, [(512, 0)], 0) + status_chunk(3, 1, [(512, 0)]), "already answered"),
        (status_chunk(3, 1, [(0, 0)]), "empty extent"),
        (status_chunk(3, 1, []), "with length 4"),
        (status_chunk(5, 1, [(512, 0), (512, 3)]), "NBD_CMD_FLAG_REQ_ONE"),
        (status_chunk(5, 1, [(8192, 0)]), "NBD_CMD_FLAG_REQ_ONE"),
        (error_chunk(4, 0, b"no error"), "with error 0"),
        (chunk(4, c.NBD_REPLY_TYPE_ERROR, wire.ERROR.pack(c.NBD_EIO, 16)), "16-byte message in 6 bytes"),
        (
            error_chunk(1, c.NBD_EIO, b"m", c.NBD_REPLY_TYPE_ERROR_OFFSET, wire.ERROR_OFFSET.pack(4096)),
            "outside",
        ),
        (error_chunk(1, c.NBD_EIO, b"m", c.NBD_REPLY_TYPE_ERROR_OFFSET), "1-byte message in 7 bytes"),
        (chunk(4, 77, b""), "unexpected unknown(0x4d) chunk"),
        (
            chunk(3, c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, bytes(24)),
            "unexpected NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
        ),
        (
            wire.STRUCTURED_REPLY.pack(STRUCTURED, 0, c.NBD_REPLY_TYPE_BLOCK_STATUS, 3, 1 << 30),
            "bytes of payload",
        ),
    ],
)
def test_malformed_replies(data: bytes, message: str) -> None:
    events = replies(data)
    error = events[-1]
    assert isinstance(error, ProtocolError), events
    assert message in error.message


def test_structured_chunk_without_structured_replies() -> None:
    (error,) = replies(chunk(4, c.NBD_REPLY_TYPE_NONE, b""), structured=False)
    assert error == ProtocolError("structured reply chunk although structured replies were not negotiated")


def test_unknown_error_chunk_types_are_errors_not_violations() -> None:
    events = replies(error_chunk(4, c.NBD_ENOSPC, b"odd", rtype=c.NBD_REPLY_TYPE_FLAG_ERROR | 77))
    (event,) = events
    assert isinstance(event, ErrorChunk)
    assert (event.type, event.error, event.message, event.offset, event.done) == (
        0x804D,
        28,
        "odd",
        None,
        True,
    )


def test_replies_complete_requests() -> None:
    data = (
        data_chunk(1, 0, b"x" * 96, 0)
        + error_chunk(1, c.NBD_EIO, b"m", c.NBD_REPLY_TYPE_ERROR_OFFSET, wire.ERROR_OFFSET.pack(200), 0)
        + status_chunk(3, 1, [(512, 0), (8192, 3)])
        + chunk(4, c.NBD_REPLY_TYPE_NONE, b"")
        + status_chunk(5, 1, [(4096, 0)])
        + simple(6, c.NBD_ENOSPC)
        + chunk(1, c.NBD_REPLY_TYPE_NONE, b"")  # errored: incomplete coverage is fine
    )
    events = replies(data)
    assert [type(e).__name__ for e in events] == [
        "OffsetDataChunk",
        "Payload",
        "ErrorChunk",
        "BlockStatusChunk",
        "NoneChunk",
        "BlockStatusChunk",
        "SimpleReply",
        "NoneChunk",
    ]
    assert isinstance(events[1], Payload) and events[1].data == b"x" * 96
    assert isinstance(events[3], BlockStatusChunk) and events[3].extents == ((512, 0), (8192, 3))
    assert isinstance(events[4], NoneChunk) and events[4].done
    reply = events[6]
    assert isinstance(reply, SimpleReply)
    exc = reply.exception()
    assert exc is not None and exc.errno == 28


def test_eof_with_requests_in_flight() -> None:
    events = replies(b"", close=True)
    assert events == [ProtocolError("the server closed the connection with 6 requests in flight")]
    w = connect()
    w.server_close()
    w.run()
    assert w.take_client_events() == [ConnectionClosed()]


def test_request_checks() -> None:
    w = connect("ro", structured=False, meta_contexts=())
    send = w.client.request_bytes
    with pytest.raises(ValueError, match="flags 0x4"):
        send(c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 0, 512, 1)  # no SEND_DF without structured replies
    with pytest.raises(ValueError, match="metadata context"):
        send(c.NBD_CMD_BLOCK_STATUS, 0, 0, 512, 1)
    with pytest.raises(ValueError, match="unknown command"):
        send(42, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        send(c.NBD_CMD_READ, 0, 0, 2**32, 1)
    with pytest.raises(ValueError, match="flags 0x10"):
        send(c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FAST_ZERO, 0, 512, 1)
    with pytest.raises(ValueError, match="flags 0x1"):
        send(c.NBD_CMD_READ, c.NBD_CMD_FLAG_FUA, 0, 512, 1)  # ro does not advertise FUA
    send(c.NBD_CMD_READ, 0, 0, 512, 1)
    with pytest.raises(StateError, match="already in flight"):
        send(c.NBD_CMD_READ, 0, 0, 512, 1)
    plain = connect("plain", server=make_server({"plain": ExportInfo("plain", 4096)}), structured=False)
    with pytest.raises(ValueError, match="not supported"):
        plain.client.request_bytes(c.NBD_CMD_FLUSH, 0, 0, 0, 1)


def test_request_honours_block_sizes() -> None:
    w = connect("strict")  # min 512, max 64 KiB, agreed with NBD_INFO_BLOCK_SIZE
    send = w.client.request_bytes
    with pytest.raises(ValueError, match="aligned"):
        send(c.NBD_CMD_READ, 0, 100, 512, 1)
    with pytest.raises(ValueError, match="aligned"):
        send(c.NBD_CMD_TRIM, 0, 0, 100, 1)
    with pytest.raises(ValueError, match="maximum block size"):
        send(c.NBD_CMD_WRITE, 0, 0, 128 * 1024, 1)
    with pytest.raises(ValueError, match="maximum block size"):
        send(c.NBD_CMD_WRITE_ZEROES, 0, 0, 128 * 1024, 1)
    send(c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FAST_ZERO, 0, 64 * 1024, 1)
    send(c.NBD_CMD_TRIM, 0, 0, 64 * 1024, 2)  # no maximum for trim
