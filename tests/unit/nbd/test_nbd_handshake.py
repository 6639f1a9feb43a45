"""The handshake, end to end: a ServerProtocol wired to a ClientProtocol in memory.

Every scenario runs twice - all bytes at once, and one byte at a time - and must give the same events.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nbd_harness import MiB, Wire, make_server

from cowbackup.nbd import constants as c
from cowbackup.nbd import wire
from cowbackup.nbd.client import ClientProtocol, ClientState
from cowbackup.nbd.errors import OptionError, ProtocolError, StateError
from cowbackup.nbd.events import (
    ConnectionClosed,
    Disconnect,
    ExportEntry,
    ExportInfoReply,
    ExportList,
    ExportReady,
    ExportSelected,
    Greeting,
    MetaContexts,
    OptionAck,
    SendData,
    StartTLS,
)
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.meta import MetaContextRegistry, exact_names
from cowbackup.nbd.server import ServerProtocol, ServerState

Scenario = Callable[[Wire], None]


def both(
    scenario: Scenario, server: Callable[[], ServerProtocol] = make_server
) -> tuple[list[object], list[object]]:
    """Run ``scenario`` fed at once and byte by byte; return (server, client) events but SendData."""
    results = []
    for chunk in (None, 1):
        w = Wire(server(), chunk=chunk)
        w.run()
        scenario(w)
        w.run()
        results.append((w.s.events, w.c.events))
    assert results[0] == results[1]
    server_events, client_events = results[0]
    return (
        [e for e in server_events if not isinstance(e, SendData)],
        [e for e in client_events if not isinstance(e, SendData | Greeting)],
    )


def send(w: Wire, data: bytes) -> None:
    w.client_send(data)
    w.run()


# -- the happy paths ------------------------------------------------------------------------------------


def test_greeting() -> None:
    server = make_server()
    greeting = server.initial_bytes()
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    w = Wire(server).run()
    assert w.c.events == [
        SendData(wire.CLIENT_FLAGS.pack(c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES)),
        Greeting(3, fixed_newstyle=True, no_zeroes=True),
    ]
    assert server.state is ServerState.OPTIONS
    assert server.no_zeroes and server.fixed_newstyle


def test_go_with_structured_replies_and_base_allocation() -> None:
    server_events, client_events = both(lambda w: send(w, w.client.go("disk")))
    (ready,) = client_events
    assert isinstance(ready, ExportReady)
    assert (ready.name, ready.canonical_name, ready.description, ready.size) == (
        "disk",
        "disk",
        "the test disk",
        1 * MiB,
    )
    assert ready.structured_replies
    assert ready.meta_contexts == {"base:allocation": 1}
    assert ready.transmission_flags & c.NBD_FLAG_HAS_FLAGS
    assert ready.transmission_flags & c.NBD_FLAG_SEND_DF
    assert (ready.min_block_size, ready.preferred_block_size, ready.max_block_size) == (1, 4096, 32 * MiB)
    (selected,) = server_events
    assert isinstance(selected, ExportSelected)
    assert selected.option == c.NBD_OPT_GO
    assert selected.info.name == "disk"
    assert selected.structured_replies
    assert selected.meta_contexts == ((1, "base:allocation"),)
    assert selected.block_size_agreed
    assert selected.transmission_flags == ready.transmission_flags


def test_go_to_the_default_export_keeps_contexts() -> None:
    server_events, client_events = both(lambda w: send(w, w.client.go("")))
    (ready,) = client_events
    assert isinstance(ready, ExportReady)
    assert (ready.name, ready.canonical_name, ready.meta_contexts) == ("", "disk", {"base:allocation": 1})
    (selected,) = server_events
    assert isinstance(selected, ExportSelected)
    assert selected.meta_contexts == ((1, "base:allocation"),)


def test_go_without_structured_replies() -> None:
    server_events, client_events = both(lambda w: send(w, w.client.go("ro", structured=False)))
    (ready,) = client_events
    assert isinstance(ready, ExportReady)
    assert not ready.structured_replies and ready.meta_contexts == {}
    assert ready.transmission_flags & c.NBD_FLAG_READ_ONLY
    assert not ready.transmission_flags & c.NBD_FLAG_SEND_DF
    (selected,) = server_events
    assert isinstance(selected, ExportSelected)
    assert not selected.structured_replies and selected.meta_contexts == ()


def test_export_name() -> None:
    server_events, client_events = both(lambda w: send(w, w.client.opt_export_name("disk")))
    (ready,) = client_events
    assert isinstance(ready, ExportReady)
    assert (ready.size, ready.transmission_flags & c.NBD_FLAG_SEND_DF) == (1 * MiB, 0)
    assert ready.canonical_name is None
    (selected,) = server_events
    assert isinstance(selected, ExportSelected)
    assert selected.option == c.NBD_OPT_EXPORT_NAME and not selected.block_size_agreed


def test_export_name_keeps_structured_replies_and_contexts() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_set_meta_context("disk", ["base:allocation"]))
        send(w, w.client.opt_export_name("disk"))

    server_events, client_events = both(scenario)
    assert client_events[:2] == [
        OptionAck(c.NBD_OPT_STRUCTURED_REPLY),
        MetaContexts(c.NBD_OPT_SET_META_CONTEXT, {"base:allocation": 1}),
    ]
    ready = client_events[2]
    assert isinstance(ready, ExportReady) and ready.structured_replies
    assert ready.meta_contexts == {"base:allocation": 1}
    selected = server_events[0]
    assert isinstance(selected, ExportSelected) and selected.meta_contexts == ((1, "base:allocation"),)


def test_export_name_sends_the_zeroes_unless_no_zeroes() -> None:
    for client_flags, reply_len in (
        (c.NBD_FLAG_C_FIXED_NEWSTYLE, 134),
        (0, 134),
        (c.NBD_FLAG_C_NO_ZEROES, 10),
    ):
        server = make_server()
        server.receive_data(wire.CLIENT_FLAGS.pack(client_flags))
        server.receive_data(wire.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_EXPORT_NAME, 4) + b"disk")
        reply = server.next_event()
        assert isinstance(reply, SendData) and len(reply.data) == reply_len
        assert wire.EXPORT_NAME_REPLY.unpack(reply.data[:10])[0] == 1 * MiB
        assert isinstance(server.next_event(), ExportSelected)


def test_list() -> None:
    _, client_events = both(lambda w: send(w, w.client.opt_list()))
    assert client_events == [
        ExportList(
            (
                ExportEntry("disk", "the test disk"),
                ExportEntry("ro", ""),
                ExportEntry("plain", ""),
                ExportEntry("strict", ""),
            )
        )
    ]


def test_info_then_go() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_info("strict", [c.NBD_INFO_BLOCK_SIZE]))
        send(w, w.client.opt_go("strict", [c.NBD_INFO_BLOCK_SIZE]))

    server_events, client_events = both(scenario)
    info, ready = client_events
    assert type(info) is ExportInfoReply
    assert (info.min_block_size, info.preferred_block_size, info.max_block_size) == (512, 4096, 65536)
    assert info.canonical_name is None  # not asked for
    assert isinstance(ready, ExportReady) and ready.size == info.size
    assert [type(e) for e in server_events] == [ExportSelected]


def test_block_size_required() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_go("strict", []))
        assert w.client.state is ClientState.OPTIONS
        send(w, w.client.opt_info("strict", [c.NBD_INFO_NAME]))

    server_events, client_events = both(scenario)
    assert server_events == []
    assert [(e.option, e.reply_type) for e in client_events if isinstance(e, OptionError)] == [
        (c.NBD_OPT_GO, c.NBD_REP_ERR_BLOCK_SIZE_REQD),
        (c.NBD_OPT_INFO, c.NBD_REP_ERR_BLOCK_SIZE_REQD),
    ]


def test_abort() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_abort())
        w.client_close()

    server_events, client_events = both(scenario)
    assert server_events == [Disconnect("NBD_OPT_ABORT"), ConnectionClosed()]
    assert client_events == [Disconnect("NBD_OPT_ABORT")]


def test_abort_answered_by_closing() -> None:
    client = ClientProtocol()
    client.receive_data(make_server().initial_bytes())
    assert isinstance(client.next_event(), SendData)
    assert isinstance(client.next_event(), Greeting)
    client.opt_abort()
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


@pytest.mark.parametrize("option", [99, c.NBD_OPT_EXTENDED_HEADERS, c.NBD_OPT_PEEK_EXPORT])
def test_unknown_option_then_go(option: int) -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_raw(option, b"some data"))
        send(w, w.client.go("disk"))

    server_events, client_events = both(scenario)
    error, ready = client_events
    assert isinstance(error, OptionError) and (error.option, error.reply_type) == (
        option,
        c.NBD_REP_ERR_UNSUP,
    )
    assert isinstance(ready, ExportReady)
    assert [type(e) for e in server_events] == [ExportSelected]


def test_unknown_export() -> None:
    _, client_events = both(lambda w: send(w, w.client.go("nope")))
    (error,) = client_events
    assert isinstance(error, OptionError)
    assert (error.option, error.reply_type) == (c.NBD_OPT_GO, c.NBD_REP_ERR_UNKNOWN)
    assert "nope" in error.message


def test_unknown_export_with_export_name_ends_the_connection() -> None:
    server_events, client_events = both(lambda w: send(w, w.client.opt_export_name("nope")))
    assert server_events == [ProtocolError("NBD_OPT_EXPORT_NAME: export 'nope' not available")]
    assert client_events == [ProtocolError("the server closed the connection: export refused")]


# -- TLS ------------------------------------------------------------------------------------------------


def test_tls_required() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_list())
        send(w, w.client.go("disk"))  # structured reply and GO refused: TLS first
        send(w, w.client.opt_starttls())
        send(w, w.client.go("disk"))

    server_events, client_events = both(scenario, lambda: make_server(tls="required"))
    assert [(e.option, e.reply_type) for e in client_events if isinstance(e, OptionError)] == [
        (c.NBD_OPT_LIST, c.NBD_REP_ERR_TLS_REQD),
        (c.NBD_OPT_GO, c.NBD_REP_ERR_TLS_REQD),
    ]
    assert client_events[2] == StartTLS()
    ready = client_events[3]
    assert isinstance(ready, ExportReady) and ready.structured_replies
    assert server_events[0] == StartTLS()
    assert isinstance(server_events[1], ExportSelected)


def test_tls_required_export_name_ends_the_connection() -> None:
    server_events, _ = both(
        lambda w: send(w, w.client.opt_export_name("disk")), lambda: make_server(tls="required")
    )
    assert server_events == [ProtocolError("NBD_OPT_EXPORT_NAME before TLS, which is required")]


def test_starttls_resets_the_negotiation() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_starttls())
        assert w.server.tls_active and w.client.tls_active
        send(w, w.client.opt_raw(c.NBD_OPT_STARTTLS))  # a second STARTTLS
        send(w, w.client.opt_go("disk"))

    server_events, client_events = both(scenario, lambda: make_server(tls="on"))
    assert client_events[:2] == [OptionAck(c.NBD_OPT_STRUCTURED_REPLY), StartTLS()]
    error, ready = client_events[2:]
    assert isinstance(error, OptionError) and error.reply_type == c.NBD_REP_ERR_INVALID
    assert isinstance(ready, ExportReady) and not ready.structured_replies
    selected = server_events[1]
    assert isinstance(selected, ExportSelected) and not selected.structured_replies


def test_tls_off_refuses_starttls() -> None:
    _, client_events = both(lambda w: send(w, w.client.opt_starttls()))
    (error,) = client_events
    assert isinstance(error, OptionError)
    assert (error.option, error.reply_type) == (c.NBD_OPT_STARTTLS, c.NBD_REP_ERR_POLICY)


def test_data_after_starttls_before_the_ack_is_a_protocol_error() -> None:
    server = make_server(tls="on")
    server.receive_data(wire.CLIENT_FLAGS.pack(1))
    server.receive_data(wire.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_STARTTLS, 0) + b"\x16\x03\x01")
    assert isinstance(server.next_event(), SendData)  # the ACK went out
    assert server.next_event() == ProtocolError("client sent data before the NBD_OPT_STARTTLS reply")


def test_no_bytes_during_the_tls_handshake() -> None:
    server = make_server(tls="on")
    server.receive_data(
        wire.CLIENT_FLAGS.pack(1) + wire.OPTION_HEADER.pack(c.IHAVEOPT, c.NBD_OPT_STARTTLS, 0)
    )
    assert isinstance(server.next_event(), SendData)
    assert server.next_event() == StartTLS()
    with pytest.raises(StateError):
        server.next_event()
    with pytest.raises(StateError):
        server.receive_data(b"\x16")
    server.tls_started()
    with pytest.raises(StateError):
        server.tls_started()


# -- metadata contexts -----------------------------------------------------------------------------------


def qemu_server() -> ServerProtocol:
    registry = MetaContextRegistry.base()
    registry.register(
        "qemu", exact_names(lambda: ["qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
    )
    info = ExportInfo("vm", 1 * MiB, meta_contexts=registry)
    return make_server({"vm": info})


def test_list_and_set_meta_contexts_with_a_plugged_in_namespace() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_list_meta_context("vm"))
        send(w, w.client.opt_list_meta_context("vm", ["qemu:dirty-bitmap:"]))
        send(w, w.client.opt_set_meta_context("vm", ["qemu:dirty-bitmap:b1", "base:allocation", "x-n:a"]))
        send(w, w.client.opt_go("vm"))

    server_events, client_events = both(scenario, qemu_server)
    list_op, set_op = c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT
    assert client_events[1:4] == [
        MetaContexts(
            list_op,
            {
                n: 0
                for n in [
                    "base:allocation",
                    "qemu:allocation-depth",
                    "qemu:dirty-bitmap:b0",
                    "qemu:dirty-bitmap:b1",
                ]
            },
        ),
        MetaContexts(list_op, {"qemu:dirty-bitmap:b0": 0, "qemu:dirty-bitmap:b1": 0}),
        MetaContexts(set_op, {"qemu:dirty-bitmap:b1": 1, "base:allocation": 2}),
    ]
    ready = client_events[4]
    assert isinstance(ready, ExportReady) and ready.meta_contexts == {
        "qemu:dirty-bitmap:b1": 1,
        "base:allocation": 2,
    }
    selected = server_events[0]
    assert isinstance(selected, ExportSelected)
    assert selected.meta_contexts == ((1, "qemu:dirty-bitmap:b1"), (2, "base:allocation"))


def test_meta_context_errors() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_set_meta_context("disk", ["base:allocation"]))  # before structured replies
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_structured_reply())  # twice
        send(w, w.client.opt_set_meta_context("nope", ["base:allocation"]))
        send(w, w.client.opt_list_meta_context("disk", ["no-namespace"]))
        send(w, w.client.opt_raw(c.NBD_OPT_SET_META_CONTEXT, b"\x00\x00\x00\x09disk"))  # truncated
        send(w, w.client.opt_set_meta_context("disk", ["base:"]))  # selects nothing
        send(
            w,
            w.client.opt_list(),
        )

    _, client_events = both(scenario)
    summary = [
        (type(e).__name__, getattr(e, "reply_type", None), getattr(e, "contexts", None))
        for e in client_events
    ]
    assert summary == [
        ("OptionError", c.NBD_REP_ERR_INVALID, None),
        ("OptionAck", None, None),
        ("OptionError", c.NBD_REP_ERR_INVALID, None),
        ("OptionError", c.NBD_REP_ERR_UNKNOWN, None),
        ("OptionError", c.NBD_REP_ERR_INVALID, None),
        ("OptionError", c.NBD_REP_ERR_INVALID, None),
        ("MetaContexts", None, {}),
        ("ExportList", None, None),
    ]


def test_contexts_for_another_export_are_dropped() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_set_meta_context("ro", ["base:allocation"]))
        send(w, w.client.opt_go("disk"))

    server_events, client_events = both(scenario)
    ready = client_events[-1]
    assert isinstance(ready, ExportReady) and ready.meta_contexts == {}
    selected = server_events[0]
    assert isinstance(selected, ExportSelected) and selected.meta_contexts == ()


def test_failed_set_meta_context_clears_the_selection() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_structured_reply())
        send(w, w.client.opt_set_meta_context("disk", ["base:allocation"]))
        send(w, w.client.opt_set_meta_context("nope", ["base:allocation"]))
        send(w, w.client.opt_go("disk"))

    server_events, client_events = both(scenario)
    ready = client_events[-1]
    assert isinstance(ready, ExportReady) and ready.meta_contexts == {}
    selected = server_events[0]
    assert isinstance(selected, ExportSelected) and selected.meta_contexts == ()


# -- limits and violations --------------------------------------------------------------------------------


def test_big_option_data_is_skipped_and_refused() -> None:
    def scenario(w: Wire) -> None:
        send(w, w.client.opt_raw(c.NBD_OPT_LIST, bytes(70_000)))
        send(w, w.client.go("disk"))

    server_events, client_events = both(scenario)
    error, ready = client_events
    assert isinstance(error, OptionError) and error.reply_type == c.NBD_REP_ERR_TOO_BIG
    assert isinstance(ready, ExportReady)
    assert [type(e) for e in server_events] == [ExportSelected]


def raw_server_events(data: bytes, server: ServerProtocol | None = None) -> list[object]:
    server = server or make_server()
    server.receive_data(data)
    events = []
    for _ in range(10):
        event = server.next_event()
        events.append(event)
        if isinstance(event, ProtocolError):
            break
    return [e for e in events if not isinstance(e, SendData)]


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    return wire.OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data) if length is None else length) + data


FIXED = wire.CLIENT_FLAGS.pack(c.NBD_FLAG_C_FIXED_NEWSTYLE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (wire.CLIENT_FLAGS.pack(4), "unknown client flags 0x4"),
        (FIXED + b"IHAVEOPX" + bytes(8), "bad option magic"),
        (FIXED + option(c.NBD_OPT_LIST, length=128 * MiB), "NBD_OPT_LIST with 134217728 bytes of data"),
        (FIXED + option(c.NBD_OPT_EXPORT_NAME, length=5000), "NBD_OPT_EXPORT_NAME with a 5000-byte name"),
        (FIXED + option(c.NBD_OPT_EXPORT_NAME, b"a\0"), "NBD_OPT_EXPORT_NAME: string holds a NUL byte"),
        (
            wire.CLIENT_FLAGS.pack(0) + option(c.NBD_OPT_LIST),
            "NBD_OPT_LIST from a client without fixed newstyle",
        ),
        (FIXED + option(c.NBD_OPT_ABORT) + b"x", "data after the client disconnected"),
    ],
)
def test_handshake_violations(data: bytes, message: str) -> None:
    events = raw_server_events(data)
    assert isinstance(events[-1], ProtocolError)
    assert message in events[-1].message


def test_eof_between_and_inside_messages() -> None:
    server = make_server()
    server.receive_data(FIXED + option(c.NBD_OPT_LIST))
    server.receive_data(b"")
    assert [type(server.next_event()) for _ in range(3)] == [SendData, ConnectionClosed, ConnectionClosed]
    with pytest.raises(StateError):
        server.receive_data(b"x")
    server = make_server()
    server.receive_data(FIXED + option(c.NBD_OPT_LIST)[:10])
    server.receive_data(b"")
    assert server.next_event() == ProtocolError("connection closed in the middle of a message")
    assert server.state is ServerState.ERROR


def test_client_refuses_calls_in_the_wrong_state() -> None:
    client = ClientProtocol()
    with pytest.raises(StateError):
        client.opt_list()
    with pytest.raises(StateError):
        client.request_bytes(c.NBD_CMD_READ, 0, 0, 512, 1)
    client.receive_data(make_server().initial_bytes())
    client.next_event()
    client.next_event()
    client.opt_list()
    with pytest.raises(StateError):  # one option at a time
        client.opt_list()


def test_client_handshake_violations() -> None:
    def greeted() -> ClientProtocol:
        client = ClientProtocol()
        client.receive_data(make_server().initial_bytes())
        client.next_event()
        client.next_event()
        return client

    client = ClientProtocol()
    client.receive_data(wire.GREETING.pack(c.NBDMAGIC, c.CLISERV_MAGIC, 0))
    assert client.next_event() == ProtocolError("not a newstyle NBD server: an oldstyle server")

    client = greeted()
    client.opt_list()
    client.receive_data(wire.option_reply(c.NBD_OPT_GO, c.NBD_REP_ACK))
    assert client.next_event() == ProtocolError("reply to NBD_OPT_GO while NBD_OPT_LIST is pending")

    client = greeted()
    client.opt_go("disk")
    client.receive_data(wire.option_reply(c.NBD_OPT_GO, c.NBD_REP_ACK))
    assert client.next_event() == ProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")

    client = greeted()
    client.opt_go("disk")
    client.receive_data(wire.option_reply(c.NBD_OPT_GO, c.NBD_REP_SERVER, b"x"))
    event = client.next_event()
    assert isinstance(event, ProtocolError) and "unexpected reply type" in event.message

    client = greeted()
    client.opt_list()
    client.receive_data(
        wire.OPTION_REPLY_HEADER.pack(c.NBD_REP_MAGIC, c.NBD_OPT_LIST, c.NBD_REP_SERVER, 1 << 20)
    )
    event = client.next_event()
    assert isinstance(event, ProtocolError) and "1048576 bytes" in event.message


def test_go_falls_back_to_export_name() -> None:
    """A server that does not know NBD_OPT_GO (scripted by hand)."""
    client = ClientProtocol()
    client.receive_data(wire.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, c.NBD_FLAG_FIXED_NEWSTYLE))
    assert client.next_event() == SendData(wire.CLIENT_FLAGS.pack(c.NBD_FLAG_C_FIXED_NEWSTYLE))
    assert client.next_event() == Greeting(1, fixed_newstyle=True, no_zeroes=False)
    sent = client.go("disk", structured=False)
    assert wire.OPTION_HEADER.unpack(sent[:16])[1] == c.NBD_OPT_GO
    client.receive_data(wire.option_reply(c.NBD_OPT_GO, c.NBD_REP_ERR_UNSUP))
    fallback = client.next_event()
    assert fallback == SendData(option(c.NBD_OPT_EXPORT_NAME, b"disk"))
    client.receive_data(wire.EXPORT_NAME_REPLY.pack(4096, 3) + bytes(124))
    ready = client.next_event()
    assert isinstance(ready, ExportReady) and (ready.size, ready.transmission_flags) == (4096, 3)
    assert client.state is ClientState.TRANSMISSION


def test_non_fixed_newstyle_server_gets_export_name() -> None:
    client = ClientProtocol()
    client.receive_data(wire.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, 0))
    assert client.next_event() == SendData(wire.CLIENT_FLAGS.pack(0))
    client.next_event()
    with pytest.raises(StateError):
        client.opt_list()
    assert client.go("disk") == option(c.NBD_OPT_EXPORT_NAME, b"disk")
