"""The client side of NBD, sans-I/O: :class:`ClientProtocol`.

Bytes in (``receive_data()``), events out (``next_event()``), no I/O.  Methods that *start* an exchange
(``opt_*()``, ``go()``, ``request_bytes()``) return the bytes to write; bytes the core must send in
reaction to input (the client flags, the next option of a ``go()`` plan) come as
:class:`~cowbackup.nbd.events.SendData` events.  Transmission replies are parsed by
:class:`~cowbackup.nbd._client_replies.ReplyParser`; read data bypasses the parser (the payload contract
of :mod:`cowbackup.nbd._core`).

States (``ClientState``; anything else from the server is a ProtocolError)::

    GREETING --NBDMAGIC IHAVEOPT flags--> OPTIONS          (SendData(client flags), Greeting)
    OPTIONS --opt_*()--> OPTION_REPLY --final reply--> OPTIONS     (one option in flight, as the spec asks)
    OPTION_REPLY --ACK to NBD_OPT_STARTTLS--> TLS_HANDSHAKE --tls_started()--> OPTIONS
    OPTION_REPLY --ACK to NBD_OPT_GO--> TRANSMISSION                                   (ExportReady)
    OPTIONS --opt_export_name()--> EXPORT_NAME_REPLY --size, flags--> TRANSMISSION     (ExportReady)
    OPTION_REPLY --ACK to NBD_OPT_ABORT--> CLOSED                                       (Disconnect)
    TRANSMISSION --request_bytes()/replies--> TRANSMISSION --EOF, nothing in flight--> CLOSED

``go(name)`` runs the usual negotiation as one plan - NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT
(``base:allocation`` and any others), NBD_OPT_GO with information requests, falling back to
NBD_OPT_EXPORT_NAME if the server does not know NBD_OPT_GO - and ends with one
:class:`~cowbackup.nbd.events.ExportReady` or :class:`~cowbackup.nbd.errors.OptionError`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cowbackup.nbd._client_replies import ReplyParser
from cowbackup.nbd._core import ProtocolCore
from cowbackup.nbd.constants import (
    BASE_ALLOCATION,
    CLISERV_MAGIC,
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_UNSUP,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBDMAGIC,
    opt_name,
    rep_name,
)
from cowbackup.nbd.errors import OptionError, StateError
from cowbackup.nbd.events import (
    ClientEvent,
    ConnectionClosed,
    Disconnect,
    ExportEntry,
    ExportInfoReply,
    ExportList,
    ExportReady,
    Greeting,
    MetaContexts,
    OffsetDataChunk,
    OptionAck,
    ReplyData,
    SendData,
    StartTLS,
)
from cowbackup.nbd.wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    U16,
    WireError,
    decode_message,
    decode_rep_meta_context,
    decode_rep_server,
    decode_string,
    encode_info_request,
    encode_meta_context_request,
    encode_string,
)

__all__ = ["MAX_OPTION_REPLY", "ClientProtocol", "ClientState"]

log = logging.getLogger(__name__)

#: Longest option reply data the client accepts (names and descriptions are at most 4 KiB each).
MAX_OPTION_REPLY = 64 * 1024
#: What go() asks NBD_OPT_GO for by default.
DEFAULT_INFO_REQUESTS = (NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE)


class ClientState(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    OPTION_REPLY = "option-reply"
    EXPORT_NAME_REPLY = "export-name-reply"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


_S = ClientState
_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.GREETING: frozenset({_S.OPTIONS, _S.CLOSED, _S.ERROR}),
    _S.OPTIONS: frozenset({_S.OPTION_REPLY, _S.EXPORT_NAME_REPLY, _S.CLOSED, _S.ERROR}),
    _S.OPTION_REPLY: frozenset({_S.OPTIONS, _S.TLS_HANDSHAKE, _S.TRANSMISSION, _S.CLOSED, _S.ERROR}),
    _S.EXPORT_NAME_REPLY: frozenset({_S.TRANSMISSION, _S.ERROR}),
    _S.TLS_HANDSHAKE: frozenset({_S.OPTIONS, _S.ERROR}),
    _S.TRANSMISSION: frozenset({_S.CLOSED, _S.ERROR}),
    _S.CLOSED: frozenset({_S.ERROR}),
    _S.ERROR: frozenset(),
}


@dataclass
class _Pending:
    """The option in flight and what its replies told so far."""

    option: int
    export: str = ""
    size_flags: tuple[int, int] | None = None  # NBD_INFO_EXPORT
    block_sizes: tuple[int, int, int] = (1, 4096, 0xFFFFFFFF)  # NBD_INFO_BLOCK_SIZE, or the defaults
    canonical_name: str | None = None  # NBD_INFO_NAME
    description: str | None = None  # NBD_INFO_DESCRIPTION
    exports: list[ExportEntry] = field(default_factory=list)
    contexts: dict[str, int] = field(default_factory=dict)


@dataclass
class _GoPlan:
    """The steps of go(): structured replies, metadata contexts, NBD_OPT_GO (or NBD_OPT_EXPORT_NAME)."""

    export: str
    structured: bool
    meta_contexts: tuple[str, ...]
    info_requests: tuple[int, ...]


class ClientProtocol(ProtocolCore[ClientEvent]):
    """One NBD client connection, sans-I/O (see the module docstring)."""

    def __init__(self, *, logger: logging.Logger | None = None) -> None:
        super().__init__(logger or log)
        self._state = ClientState.GREETING
        self.handshake_flags = 0
        self.client_flags = 0
        self.tls_active = False
        # negotiation state; STARTTLS resets it
        self.structured = False
        self.meta_contexts: dict[str, int] = {}
        self._meta_export: str | None = None
        self._pending: _Pending | None = None
        self._plan: _GoPlan | None = None
        self._replies: ReplyParser | None = None
        self.export: ExportReady | None = None

    # -- public API: handshake ---------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    def tls_started(self) -> None:
        """The TLS handshake is done; negotiation starts over (structured replies, contexts)."""
        if self._state is not ClientState.TLS_HANDSHAKE:
            raise StateError(f"tls_started() in state {self._state.value}")
        self.tls_active = True
        self._set_state(ClientState.OPTIONS)

    def opt_structured_reply(self) -> bytes:
        return self._send_option(NBD_OPT_STRUCTURED_REPLY)

    def opt_list(self) -> bytes:
        return self._send_option(NBD_OPT_LIST)

    def opt_starttls(self) -> bytes:
        if self.tls_active:
            raise StateError("TLS is already active")
        return self._send_option(NBD_OPT_STARTTLS)

    def opt_abort(self) -> bytes:
        return self._send_option(NBD_OPT_ABORT)

    def opt_info(self, export: str, info_requests: Sequence[int] = DEFAULT_INFO_REQUESTS) -> bytes:
        return self._send_option(NBD_OPT_INFO, encode_info_request(export, list(info_requests)), export)

    def opt_go(self, export: str, info_requests: Sequence[int] = DEFAULT_INFO_REQUESTS) -> bytes:
        return self._send_option(NBD_OPT_GO, encode_info_request(export, list(info_requests)), export)

    def opt_list_meta_context(self, export: str, queries: Sequence[str] = ()) -> bytes:
        data = encode_meta_context_request(export, list(queries))
        return self._send_option(NBD_OPT_LIST_META_CONTEXT, data, export)

    def opt_set_meta_context(self, export: str, queries: Sequence[str]) -> bytes:
        data = encode_meta_context_request(export, list(queries))
        return self._send_option(NBD_OPT_SET_META_CONTEXT, data, export)

    def opt_export_name(self, export: str) -> bytes:
        """NBD_OPT_EXPORT_NAME: the server answers with the export or closes the connection."""
        data = self._option_bytes(NBD_OPT_EXPORT_NAME, encode_string(export))
        self._pending = _Pending(NBD_OPT_EXPORT_NAME, export)
        self._set_state(ClientState.EXPORT_NAME_REPLY)
        return data

    def opt_raw(self, option: int, data: bytes = b"") -> bytes:
        """Any option, for tests and experiments; the reply ends in OptionAck or OptionError."""
        return self._send_option(option, data)

    def go(
        self,
        export: str,
        *,
        structured: bool = True,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        info_requests: Sequence[int] = DEFAULT_INFO_REQUESTS,
    ) -> bytes:
        """Start the whole negotiation for ``export`` (see the module docstring); returns the first bytes."""
        if self._state is not ClientState.OPTIONS:
            raise StateError(f"go() in state {self._state.value}")
        self._plan = _GoPlan(export, structured, tuple(meta_contexts), tuple(info_requests))
        try:
            if not self.fixed_newstyle:
                return self.opt_export_name(export)
            if structured and not self.structured:
                return self.opt_structured_reply()
            return self._plan_after_structured()
        except BaseException:
            self._plan = None
            raise

    @property
    def fixed_newstyle(self) -> bool:
        return bool(self.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE)

    # -- public API: transmission ------------------------------------------------------------------

    def request_bytes(self, type: int, flags: int, offset: int, length: int, cookie: int) -> bytes:
        """The header of one request (a WRITE's payload is written after it by the shell).

        ``ValueError`` for a request the negotiation does not allow (flags not advertised, block status
        without a metadata context, offset or length not aligned to the minimum block size, longer than
        the maximum block size, ...); ``StateError`` outside transmission, after NBD_CMD_DISC, or for a
        cookie already in flight.
        """
        if self._replies is None or self._state is not ClientState.TRANSMISSION:
            raise StateError(f"request in state {self._state.value}")
        return self._replies.request_bytes(type, flags, offset, length, cookie)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet completely answered."""
        return 0 if self._replies is None else len(self._replies.in_flight)

    # -- state machine -----------------------------------------------------------------------------

    def _set_state(self, new: ClientState) -> None:
        assert new in _TRANSITIONS[self._state], f"{self._state} -> {new}"
        self._log.debug("state %s -> %s", self._state.value, new.value)
        self._state = new

    def _on_fail(self) -> None:
        if self._state is not ClientState.ERROR:
            self._set_state(ClientState.ERROR)

    def _check_receive(self) -> None:
        if self._state is ClientState.TLS_HANDSHAKE:
            raise StateError("receive_data() during the TLS handshake: those bytes belong to TLS")

    def _check_next(self) -> None:
        if self._state is ClientState.TLS_HANDSHAKE:
            raise StateError("next_event() during the TLS handshake: call tls_started() first")

    def _on_eof(self) -> ClientEvent:
        state = self._state
        if state is ClientState.OPTION_REPLY and self._pending and self._pending.option == NBD_OPT_ABORT:
            pass  # the spec lets a server close instead of acknowledging NBD_OPT_ABORT
        elif state is ClientState.EXPORT_NAME_REPLY:
            return self._fail("the server closed the connection: export refused")
        elif state in (ClientState.OPTION_REPLY, ClientState.GREETING):
            return self._fail(f"the server closed the connection in state {state.value}")
        elif self.in_flight:
            return self._fail(f"the server closed the connection with {self.in_flight} requests in flight")
        if self._state is not ClientState.CLOSED:
            self._set_state(ClientState.CLOSED)
        return ConnectionClosed()

    def _parse(self) -> bool:
        state = self._state
        if state is ClientState.TRANSMISSION:
            return self._parse_reply()
        if state is ClientState.OPTION_REPLY:
            return self._parse_option_reply()
        if state is ClientState.GREETING:
            return self._parse_greeting()
        if state is ClientState.EXPORT_NAME_REPLY:
            return self._parse_export_name_reply()
        if self._buffer:
            self._fail(f"unexpected data from the server in state {state.value}")
            return True
        return False

    def _parse_reply(self) -> bool:
        assert self._replies is not None
        try:
            event = self._replies.parse(self._buffer)
        except WireError as err:
            self._fail(str(err))
            return True
        if event is None:
            return False
        self._emit(event)
        if isinstance(event, ReplyData | OffsetDataChunk):
            self._expect_payload(event.payload_length)
        return True

    # -- handshake ---------------------------------------------------------------------------------

    def _parse_greeting(self) -> bool:
        if len(self._buffer) < GREETING.size:
            return False
        magic, second, flags = GREETING.unpack(self._buffer.take(GREETING.size))
        if magic != NBDMAGIC:
            self._fail(f"bad greeting magic {magic:#x}")
            return True
        if second != IHAVEOPT:
            why = "an oldstyle server" if second == CLISERV_MAGIC else f"bad magic {second:#x}"
            self._fail(f"not a newstyle NBD server: {why}")
            return True
        self.handshake_flags = flags
        client_flags = 0
        if flags & NBD_FLAG_FIXED_NEWSTYLE:
            client_flags |= NBD_FLAG_C_FIXED_NEWSTYLE
        if flags & NBD_FLAG_NO_ZEROES:
            client_flags |= NBD_FLAG_C_NO_ZEROES
        self.client_flags = client_flags
        self._emit(SendData(CLIENT_FLAGS.pack(client_flags)))
        self._emit(Greeting(flags, self.fixed_newstyle, bool(client_flags & NBD_FLAG_C_NO_ZEROES)))
        self._set_state(ClientState.OPTIONS)
        return True

    def _option_bytes(self, option: int, data: bytes) -> bytes:
        if self._state is not ClientState.OPTIONS:
            raise StateError(f"{opt_name(option)} in state {self._state.value}")
        if option != NBD_OPT_EXPORT_NAME and not self.fixed_newstyle:
            raise StateError(f"{opt_name(option)}: the server does not speak fixed newstyle")
        return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data

    def _send_option(self, option: int, data: bytes = b"", export: str = "") -> bytes:
        raw = self._option_bytes(option, data)
        self._pending = _Pending(option, export)
        self._set_state(ClientState.OPTION_REPLY)
        return raw

    def _parse_option_reply(self) -> bool:
        buffer = self._buffer
        pending = self._pending
        assert pending is not None
        if len(buffer) < OPTION_REPLY_HEADER.size:
            return False
        magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(buffer.peek(OPTION_REPLY_HEADER.size))
        if magic != NBD_REP_MAGIC:
            self._fail(f"bad option reply magic {magic:#x}")
            return True
        if option != pending.option:
            self._fail(f"reply to {opt_name(option)} while {opt_name(pending.option)} is pending")
            return True
        if length > MAX_OPTION_REPLY:
            self._fail(f"{rep_name(reply_type)} reply with {length} bytes of data")
            return True
        if len(buffer) < OPTION_REPLY_HEADER.size + length:
            return False
        buffer.skip(OPTION_REPLY_HEADER.size)
        data = buffer.take(length)
        self._log.debug("reply %s to %s, %d bytes", rep_name(reply_type), opt_name(option), length)
        try:
            self._option_reply(pending, reply_type, data)
        except WireError as err:
            self._fail(f"malformed {rep_name(reply_type)} reply to {opt_name(option)}: {err}")
        return True

    def _option_reply(self, pending: _Pending, reply_type: int, data: bytes) -> None:
        option = pending.option
        if reply_type & NBD_REP_FLAG_ERROR:
            self._option_failed(OptionError(option, reply_type, decode_message(data)))
        elif reply_type == NBD_REP_ACK:
            if data:
                raise WireError("NBD_REP_ACK with data")
            self._option_done(pending)
        elif reply_type == NBD_REP_SERVER and option == NBD_OPT_LIST:
            pending.exports.append(ExportEntry(*decode_rep_server(data)))
        elif reply_type == NBD_REP_INFO and option in (NBD_OPT_INFO, NBD_OPT_GO):
            self._info_reply(pending, data)
        elif reply_type == NBD_REP_META_CONTEXT and option in (
            NBD_OPT_LIST_META_CONTEXT,
            NBD_OPT_SET_META_CONTEXT,
        ):
            context_id, name = decode_rep_meta_context(data)
            pending.contexts[name] = context_id
        else:
            raise WireError("unexpected reply type")

    def _info_reply(self, pending: _Pending, data: bytes) -> None:
        if len(data) < 2:
            raise WireError("NBD_REP_INFO without a type")
        (info_type,) = U16.unpack(data[:2])
        if info_type == NBD_INFO_EXPORT:
            if len(data) != INFO_EXPORT.size:
                raise WireError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            _, size, flags = INFO_EXPORT.unpack(data)
            pending.size_flags = (size, flags)
        elif info_type == NBD_INFO_BLOCK_SIZE:
            if len(data) != INFO_BLOCK_SIZE.size:
                raise WireError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
            pending.block_sizes = (minimum, preferred, maximum)
        elif info_type == NBD_INFO_NAME:
            pending.canonical_name = decode_string(data[2:])
        elif info_type == NBD_INFO_DESCRIPTION:
            pending.description = decode_message(data[2:])
        # The spec: ignore information types we do not know.

    def _option_failed(self, error: OptionError) -> None:
        option = error.option
        if option == NBD_OPT_SET_META_CONTEXT:  # the selection is replaced even when the option fails
            self.meta_contexts = {}
            self._meta_export = None
        self._pending = None
        self._set_state(ClientState.OPTIONS)
        if self._plan is None:
            self._emit(error)
        elif option == NBD_OPT_STRUCTURED_REPLY:
            self._plan_send(self._plan_after_structured())
        elif option == NBD_OPT_SET_META_CONTEXT:
            self._plan_send(self._plan_go())
        elif option == NBD_OPT_GO and error.reply_type == NBD_REP_ERR_UNSUP:
            self._plan_send(self.opt_export_name(self._plan.export))
        else:
            self._plan = None
            self._emit(error)

    def _option_done(self, pending: _Pending) -> None:
        option = pending.option
        self._pending = None
        if option == NBD_OPT_GO:
            self._info_done(pending)  # -> TRANSMISSION
            return
        if option == NBD_OPT_STARTTLS:
            if self._buffer:
                self._fail("the server sent data after acknowledging NBD_OPT_STARTTLS")
                return
            self.structured = False
            self.meta_contexts = {}
            self._meta_export = None
            self._set_state(ClientState.TLS_HANDSHAKE)
            self._emit(StartTLS())
            return
        if option == NBD_OPT_ABORT:
            self._set_state(ClientState.CLOSED)
            self._emit(Disconnect("NBD_OPT_ABORT"))
            return
        self._set_state(ClientState.OPTIONS)
        if option == NBD_OPT_STRUCTURED_REPLY:
            self.structured = True
            if self._plan is not None:
                self._plan_send(self._plan_after_structured())
            else:
                self._emit(OptionAck(option))
        elif option == NBD_OPT_SET_META_CONTEXT:
            self.meta_contexts = dict(pending.contexts)
            self._meta_export = pending.export
            if self._plan is not None:
                self._plan_send(self._plan_go())
            else:
                self._emit(MetaContexts(option, dict(pending.contexts)))
        elif option == NBD_OPT_LIST_META_CONTEXT:
            self._emit(MetaContexts(option, dict(pending.contexts)))
        elif option == NBD_OPT_LIST:
            self._emit(ExportList(tuple(pending.exports)))
        elif option == NBD_OPT_INFO:
            self._info_done(pending)
        else:
            self._emit(OptionAck(option))

    def _info_done(self, pending: _Pending) -> None:
        if pending.size_flags is None:
            self._fail(f"{opt_name(pending.option)} acknowledged without NBD_INFO_EXPORT")
            return
        details = (
            pending.export,
            *pending.size_flags,
            *pending.block_sizes,
            pending.canonical_name,
            pending.description,
        )
        if pending.option == NBD_OPT_INFO:
            self._emit(ExportInfoReply(*details))
            return
        self._enter_transmission(ExportReady(*details, self.structured, self._contexts_for(pending.export)))

    def _parse_export_name_reply(self) -> bool:
        need = EXPORT_NAME_REPLY.size + (
            0 if self.client_flags & NBD_FLAG_C_NO_ZEROES else EXPORT_NAME_PADDING
        )
        if len(self._buffer) < need:
            return False
        size, flags = EXPORT_NAME_REPLY.unpack(self._buffer.take(need)[: EXPORT_NAME_REPLY.size])
        pending = self._pending
        assert pending is not None
        self._pending = None
        ready = ExportReady(
            name=pending.export,
            size=size,
            transmission_flags=flags,
            structured_replies=self.structured,
            meta_contexts=self._contexts_for(pending.export),
        )
        self._enter_transmission(ready)
        return True

    def _contexts_for(self, export: str) -> dict[str, int]:
        return dict(self.meta_contexts) if self._meta_export == export and self.structured else {}

    def _enter_transmission(self, ready: ExportReady) -> None:
        self._plan = None
        self.export = ready
        self._replies = ReplyParser(ready)
        self._set_state(ClientState.TRANSMISSION)
        self._emit(ready)

    # -- the go() plan -----------------------------------------------------------------------------

    def _plan_send(self, data: bytes) -> None:
        self._emit(SendData(data))

    def _plan_after_structured(self) -> bytes:
        plan = self._plan
        assert plan is not None
        if self.structured and plan.meta_contexts:
            return self.opt_set_meta_context(plan.export, plan.meta_contexts)
        return self._plan_go()

    def _plan_go(self) -> bytes:
        plan = self._plan
        assert plan is not None
        return self.opt_go(plan.export, plan.info_requests)
