"""Property tests: whatever bytes arrive, the cores parse them or return a ProtocolError - nothing else.

Inputs are random bytes and well-framed messages with random fields, fed in random chunks.  Every run
ends with EOF, after which the core must end with a final event (never ask for more data), and feeding
the same bytes all at once must give the same events (except around STARTTLS, where the spec itself
makes the outcome depend on timing).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_harness import Wire, connect, make_server

from cowbackup.nbd import constants as c
from cowbackup.nbd import wire
from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.errors import OptionError, ProtocolError
from cowbackup.nbd.events import ConnectionClosed, NeedData, Request, SendData, StartTLS
from cowbackup.nbd.server import ServerProtocol, ServerState, TLSMode

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Proto = ServerProtocol | ClientProtocol


def drive(proto: Proto, data: bytes, chunk: int) -> list[object]:
    """Feed ``data`` in ``chunk``-byte pieces then EOF, like a shell would; return the events."""
    pieces = deque([data[i : i + chunk] for i in range(0, len(data), chunk)])
    pieces.append(b"")
    events: list[object] = []
    owed = 0
    for _ in range(100_000):
        if owed:
            owed -= len(proto.take_buffered(owed))
            if owed and pieces:
                proto.receive_data(pieces.popleft())
                continue
        event = proto.next_event()
        if isinstance(event, NeedData):
            assert pieces, "NeedData after EOF"
            proto.receive_data(pieces.popleft())
            continue
        events.append(event)
        if isinstance(event, ProtocolError | ConnectionClosed):
            assert proto.next_event() == event  # sticky
            return events
        if isinstance(event, StartTLS):
            proto.tls_started()
        owed = getattr(event, "payload_length", 0)
    raise AssertionError("the core does not settle")


def check(factory: Callable[[], Proto], prefix: bytes, data: bytes, chunk: int) -> None:
    """drive() a fresh core at ``chunk`` and all at once; the outcomes must agree."""
    results = [drive(factory(), prefix + data, size) for size in (chunk, len(prefix) + len(data) + 1)]
    timing = any(isinstance(e, StartTLS) or "STARTTLS" in str(e) for r in results for e in r)
    if not timing:
        assert results[0] == results[1]


chunks = st.one_of(st.integers(1, 8), st.integers(9, 4096))
tls_modes: st.SearchStrategy[TLSMode] = st.sampled_from(["off", "on", "required"])

# Pools of fields near the valid shapes and beside them: cheap to draw, and they reach deep code paths.
NAMES = ["", "disk", "ro", "strict", "nope", "x" * 5000, "a\0"]
LENGTHS32 = [0, 1, 4, 6, 8, 12, 600, 65537, 2**20, 2**25 + 1, 2**26 + 1, 2**27, 2**31, 2**32 - 1]


def _info_request(name: str, requests: list[int]) -> bytes:
    raw = name.encode()
    return (
        wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(requests)) + b"".join(map(wire.U16.pack, requests))
    )


def _meta_request(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    parts = [wire.U32.pack(len(raw)), raw, wire.U32.pack(len(queries))]
    parts += [wire.U32.pack(len(q.encode())) + q.encode() for q in queries]
    return b"".join(parts)


OPTION_DATA = [
    *(_info_request(n, r) for n in NAMES for r in ([], [3], [1, 2, 3, 9])),
    *(_meta_request(n, q) for n in NAMES for q in ([], ["base:allocation"], ["base:", "x-y:z"], ["nons"])),
    *(n.encode() for n in NAMES),
    wire.U32.pack(2**32 - 1),
    _meta_request("disk", [])[:-1] + b"\xff",
]

# -- server, handshake ------------------------------------------------------------------------------------

CLIENT_FLAGS = st.sampled_from([wire.CLIENT_FLAGS.pack(f) for f in (0, 1, 3)] + [b""])


@st.composite
def options(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([*range(13), 2**31, 2**32 - 1]))
    data = draw(st.one_of(st.sampled_from(OPTION_DATA), st.binary(max_size=24)))
    length = draw(st.one_of(st.just(len(data)), st.sampled_from(LENGTHS32)))
    return wire.OPTION_HEADER.pack(c.IHAVEOPT, opt, length) + data


@FUZZ
@given(prefix=CLIENT_FLAGS, data=st.binary(max_size=300), chunk=chunks, tls=tls_modes)
def test_server_handshake_random_bytes(prefix: bytes, data: bytes, chunk: int, tls: TLSMode) -> None:
    check(lambda: make_server(tls=tls), prefix, data, chunk)


@FUZZ
@given(
    flags=CLIENT_FLAGS,
    opts=st.lists(options(), max_size=6),
    tail=st.binary(max_size=30),
    chunk=chunks,
    tls=tls_modes,
)
def test_server_handshake_framed_options(
    flags: bytes, opts: list[bytes], tail: bytes, chunk: int, tls: TLSMode
) -> None:
    check(lambda: make_server(tls=tls), flags, b"".join(opts) + tail, chunk)


# -- server, transmission -----------------------------------------------------------------------------------


def _handshake_bytes() -> bytes:
    """Everything a client sends to reach transmission with go("disk"): its flags, then the options."""
    w = Wire()
    w.run()
    sent = bytearray()
    for event in w.c.events:  # the client flags, sent on the greeting
        if isinstance(event, SendData):
            sent += event.data
    seen = len(w.c.events)
    w.client_send(w.client.go("disk"))
    sent += w.s.inbox
    w.run()
    for event in w.c.events[seen:]:  # the options go() sent as SendData
        if isinstance(event, SendData):
            sent += event.data
    return bytes(sent)


HANDSHAKE = _handshake_bytes()


def test_handshake_bytes_reach_transmission() -> None:
    server = make_server()
    server.receive_data(HANDSHAKE)
    while not isinstance(server.next_event(), NeedData):
        pass
    assert server.state is ServerState.TRANSMISSION


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from([*range(10), 0xFFFF]))
    flags = draw(st.one_of(st.integers(0, 63), st.just(0xFFFF)))
    offset = draw(st.sampled_from([0, 512, 2**20 - 1, 2**20, 2**63, 2**64 - 1]))
    length = draw(st.sampled_from(LENGTHS32))
    magic = draw(st.sampled_from([c.NBD_REQUEST_MAGIC] * 8 + [c.NBD_EXTENDED_REQUEST_MAGIC, 0]))
    payload = bytes(length) if cmd == c.NBD_CMD_WRITE and length <= 600 else b""
    return wire.REQUEST.pack(magic, flags, cmd, draw(st.integers(0, 9)), offset, length) + payload


@FUZZ
@given(data=st.binary(max_size=300), chunk=chunks)
def test_server_transmission_random_bytes(data: bytes, chunk: int) -> None:
    check(make_server, HANDSHAKE, data, chunk)


@FUZZ
@given(reqs=st.lists(requests(), max_size=6), tail=st.binary(max_size=30), chunk=chunks)
def test_server_transmission_framed_requests(reqs: list[bytes], tail: bytes, chunk: int) -> None:
    check(make_server, HANDSHAKE, b"".join(reqs) + tail, chunk)


@FUZZ
@given(reqs=st.lists(requests(), max_size=8), tail=st.binary(max_size=30))
def test_server_parse_fast_agrees_with_the_events(reqs: list[bytes], tail: bytes) -> None:
    """The fast path's requests are the careful path's first requests, all valid; it stops at the first
    request it leaves to the careful path, or at an incomplete one, and keeps nothing of them."""
    data = b"".join(reqs) + tail
    fast = make_server()
    fast.receive_data(HANDSHAKE)
    while not isinstance(fast.next_event(), NeedData):
        pass
    found, pos, wanted = fast.parse_fast(memoryview(data), len(data))
    careful = [e for e in drive(make_server(), HANDSHAKE + data, len(HANDSHAKE) + len(data) + 1)]
    requests_ = [e for e in careful if isinstance(e, Request)]
    assert len(found) <= len(requests_)
    end = 0
    for (cookie, cmd, flags, offset, length, start), event in zip(found, requests_, strict=False):
        payload = length if cmd == c.NBD_CMD_WRITE else 0
        assert event == Request(cookie, cmd, flags, offset, length, payload)
        assert start == end + wire.REQUEST.size
        end = start + payload
    assert pos == end
    if wanted:
        assert len(data) - pos < wanted
    # Nothing of it stays in the core: it goes on as if it had seen nothing.
    assert fast.parse_fast(memoryview(data), len(data)) == (found, pos, wanted)
    assert isinstance(fast.next_event(), NeedData)


# -- client ------------------------------------------------------------------------------------------

GREETING = make_server().initial_bytes()
OPTION_CALLS: list[Callable[[ClientProtocol], bytes]] = [
    lambda p: p.opt_list(),
    lambda p: p.opt_go("disk"),
    lambda p: p.opt_info("disk"),
    lambda p: p.opt_structured_reply(),
    lambda p: p.opt_set_meta_context("disk", ["base:allocation"]),
    lambda p: p.opt_list_meta_context("disk"),
    lambda p: p.opt_starttls(),
    lambda p: p.opt_abort(),
    lambda p: p.opt_export_name("disk"),
    lambda p: p.go("disk"),
]
OPTION_REPLY_DATA = [
    wire.INFO_EXPORT.pack(c.NBD_INFO_EXPORT, 4096, 1),
    wire.INFO_BLOCK_SIZE.pack(c.NBD_INFO_BLOCK_SIZE, 1, 4096, 2**20),
    wire.U16.pack(c.NBD_INFO_NAME) + b"disk",
    wire.U16.pack(c.NBD_INFO_NAME) + b"\xff",
    wire.U16.pack(9),
    *(wire.U32.pack(len(n.encode())) + n.encode() + b"description" for n in NAMES),
    wire.U32.pack(1) + b"base:allocation",
    wire.EXPORT_NAME_REPLY.pack(4096, 1),
]


@st.composite
def option_replies(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([*range(1, 12), 2**32 - 1]))
    rtype = draw(st.sampled_from([*range(1, 6), *range(2**31, 2**31 + 11), 2**32 - 1]))
    data = draw(st.one_of(st.sampled_from(OPTION_REPLY_DATA), st.binary(max_size=24)))
    length = draw(st.one_of(st.just(len(data)), st.sampled_from(LENGTHS32)))
    return wire.OPTION_REPLY_HEADER.pack(c.NBD_REP_MAGIC, opt, rtype, length) + data


def greeted_client(call: int) -> ClientProtocol:
    client = ClientProtocol()
    client.receive_data(GREETING)
    client.next_event()
    client.next_event()
    OPTION_CALLS[call](client)
    return client


@FUZZ
@given(
    call=st.integers(0, len(OPTION_CALLS) - 1),
    replies=st.lists(option_replies(), max_size=5),
    data=st.binary(max_size=200),
    cut=st.integers(0, len(GREETING)),
    chunk=chunks,
)
def test_client_handshake(call: int, replies: list[bytes], data: bytes, cut: int, chunk: int) -> None:
    check(lambda: greeted_client(call), b"".join(replies), data, chunk)
    check(ClientProtocol, GREETING[:cut], data, chunk)


def _client_in_transmission() -> ClientProtocol:
    client = connect().client
    send = client.request_bytes
    send(c.NBD_CMD_READ, 0, 0, 4096, 1)
    send(c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 512, 1024, 2)
    send(c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE, 0, 4096, 3)
    send(c.NBD_CMD_WRITE, 0, 0, 10, 4)
    send(c.NBD_CMD_BLOCK_STATUS, 0, 0, 4096, 5)
    return client


CLIENT_IN_TRANSMISSION = _client_in_transmission()


def client_in_transmission() -> ClientProtocol:
    return copy.deepcopy(CLIENT_IN_TRANSMISSION)


#: Chunk payloads near the valid shapes: offsets inside and outside the reads, holes, block status
#: for known and unknown contexts, error chunks with good and bad message lengths.
REPLY_PAYLOADS = [
    *(wire.OFFSET_DATA.pack(o) + bytes(n) for o in (0, 512, 4000, 5000) for n in (0, 1, 96, 512)),
    *(wire.OFFSET_HOLE.pack(o, n) for o in (0, 512, 4095) for n in (0, 1, 512, 4096)),
    *(
        wire.BLOCK_STATUS.pack(i) + b"".join(wire.BLOCK_DESCRIPTOR.pack(*x) for x in e)
        for i in (0, 1, 2)
        for e in ([], [(4096, 0)], [(0, 3)], [(512, 1), (9000, 2**32 - 1)])
    ),
    *(wire.ERROR.pack(e, m) + b"msg" for e in (0, 5, 99) for m in (0, 3, 9)),
]


@st.composite
def reply_messages(draw: st.DrawFn) -> bytes:
    cookie = draw(st.integers(0, 6))
    if draw(st.integers(0, 3)) == 0:
        return wire.SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, draw(st.sampled_from([0, 5, 22, 99])), cookie)
    rtype = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 0x8001, 0x8002, 0x8077, 0xFFFF]))
    flags = draw(st.integers(0, 3))
    payload = draw(st.one_of(st.sampled_from(REPLY_PAYLOADS), st.binary(max_size=32)))
    length = draw(st.one_of(st.just(len(payload)), st.sampled_from([0, 6, 8, 12, 2**31, 2**32 - 1])))
    magic = draw(st.sampled_from([c.NBD_STRUCTURED_REPLY_MAGIC] * 6 + [c.NBD_EXTENDED_REPLY_MAGIC]))
    return wire.STRUCTURED_REPLY.pack(magic, flags, rtype, cookie, length) + payload


@FUZZ
@given(msgs=st.lists(reply_messages(), max_size=6), data=st.binary(max_size=100), chunk=chunks)
def test_client_transmission(msgs: list[bytes], data: bytes, chunk: int) -> None:
    check(client_in_transmission, b"".join(msgs), data, chunk)


def test_option_error_events_are_not_protocol_errors() -> None:
    """A refused option leaves the connection usable (the fuzz tests rely on the difference)."""
    client = greeted_client(0)
    events = drive(client, wire.option_reply(c.NBD_OPT_LIST, c.NBD_REP_ERR_POLICY, b"no"), 1000)
    assert events[0] == OptionError(c.NBD_OPT_LIST, c.NBD_REP_ERR_POLICY, "no")
    assert events[1] == ConnectionClosed()
