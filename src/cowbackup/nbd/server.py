"""The server side of NBD, sans-I/O (h11 style): :class:`ServerProtocol`.

The core takes bytes in (``receive_data()``), gives events out (``next_event()``) and does no I/O.  It
answers the whole option haggling itself - the replies come out as :class:`~cowbackup.nbd.events.SendData`
events the shell writes - so the shell only acts on :class:`~cowbackup.nbd.events.StartTLS`,
:class:`~cowbackup.nbd.events.ExportSelected`, :class:`~cowbackup.nbd.events.Request`,
:class:`~cowbackup.nbd.events.Disconnect`, :class:`~cowbackup.nbd.events.ConnectionClosed` and
:class:`~cowbackup.nbd.errors.ProtocolError`.  Replies to requests come from :attr:`ServerProtocol.replies`
(:class:`~cowbackup.nbd.replies.ReplyBuilder`).  Payloads bypass the parser: see :mod:`cowbackup.nbd._core`.

States (``ServerState``; anything not in the table is a ProtocolError that ends the connection)::

    initial_bytes() -> greeting: NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES

    CLIENT_FLAGS --client flags--> OPTIONS
    OPTIONS --NBD_OPT_LIST/INFO/STRUCTURED_REPLY/*_META_CONTEXT/unknown--> OPTIONS   (reply as SendData)
    OPTIONS --NBD_OPT_STARTTLS, ACK--> TLS_HANDSHAKE --tls_started()--> OPTIONS    (negotiation reset)
    OPTIONS --NBD_OPT_GO ACK / NBD_OPT_EXPORT_NAME--> TRANSMISSION                  (ExportSelected)
    OPTIONS --NBD_OPT_ABORT--> CLOSED                                                (Disconnect)
    TRANSMISSION --request--> TRANSMISSION                    (Request; a WRITE payload must be consumed)
    TRANSMISSION --NBD_CMD_DISC--> CLOSED                                            (Disconnect)
    any --EOF between messages--> CLOSED (ConnectionClosed);  any --violation--> ERROR (ProtocolError)

TLS policy (``tls``): ``"off"`` answers NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY (NOTLS mode);
``"on"`` offers it (SELECTIVETLS with no TLS-only export); ``"required"`` answers every option but
STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and ends the connection on
NBD_OPT_EXPORT_NAME (FORCEDTLS).

A shell, in outline::

    transport.write(proto.initial_bytes())
    loop: event = proto.next_event()
        NeedData          proto.receive_data(await reader.read(...))          (b"" at EOF)
        SendData          transport.write(event.data)
        StartTLS          upgrade the socket, then proto.tls_started()
        ExportSelected    attach the export; replies come from proto.replies
        Request           error set: write(proto.replies.error(event, event.error, event.error_message))
                          else: take the payload (see Request), run it, write the reply from proto.replies
        Disconnect        finish the requests in flight, then close
        ConnectionClosed, ProtocolError: close

Requests the core fails itself (``Request.error`` set, the connection goes on; unaligned requests are
accepted; TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS may be up to 4 GiB - 1 long)::

    unknown command; a flag unknown or not valid for the command; NBD_CMD_FLAG_DF
    without structured replies; NBD_CMD_FLAG_FAST_ZERO, FLUSH, TRIM, WRITE_ZEROES not advertised  NBD_EINVAL
    WRITE, TRIM, WRITE_ZEROES on a read-only export                                              NBD_EPERM
    beyond the end of the export: WRITE, WRITE_ZEROES                                            NBD_ENOSPC
                                  READ, TRIM, CACHE, BLOCK_STATUS                                NBD_EINVAL
    READ or WRITE longer than the advertised maximum block size                                  NBD_EINVAL
    BLOCK_STATUS without a selected metadata context                                             NBD_EINVAL

Limits: option data longer than 64 KiB is dropped unread and answered with NBD_REP_ERR_TOO_BIG; data
longer than the hard limit (``discard_limit``, 64 MiB by default) ends the connection, as does a WRITE
payload beyond it.  A write larger than ``max_payload`` (32 MiB) but under the hard limit is read and
dropped by the core and fails with NBD_EINVAL.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cowbackup.nbd import _options
from cowbackup.nbd._core import ProtocolCore
from cowbackup.nbd._options import Negotiation
from cowbackup.nbd.constants import (
    CLIENT_FLAG_NAMES,
    COMMAND_FLAGS_ALLOWED,
    COMMAND_NEEDS_FLAG,
    IHAVEOPT,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_STARTTLS,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG,
    NBD_REQUEST_MAGIC,
    NBDMAGIC,
    cmd_name,
    flag_names,
    opt_name,
)
from cowbackup.nbd.errors import StateError
from cowbackup.nbd.events import (
    ConnectionClosed,
    Disconnect,
    ExportSelected,
    Request,
    SendData,
    ServerEvent,
    StartTLS,
)
from cowbackup.nbd.exports import DEFAULT_MAX_PAYLOAD, ExportInfo
from cowbackup.nbd.replies import ReplyBuilder
from cowbackup.nbd.wire import CLIENT_FLAGS, GREETING, OPTION_HEADER, REQUEST, option_reply

__all__ = [
    "OPTION_DATA_MAX",
    "FastRequest",
    "Negotiation",
    "ServerProtocol",
    "ServerState",
    "TLSMode",
    "Transmission",
]

log = logging.getLogger(__name__)

TLSMode = Literal["off", "on", "required"]

#: Longest option data the server parses; longer data is dropped and answered NBD_REP_ERR_TOO_BIG.
OPTION_DATA_MAX = 64 * 1024
#: Default hard limit: option data or a write payload longer than this ends the connection.
DEFAULT_DISCARD_LIMIT = 64 * 1024 * 1024

_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

_WRITES = frozenset({NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES})


class ServerState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


_TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    ServerState.CLIENT_FLAGS: frozenset({ServerState.OPTIONS, ServerState.CLOSED, ServerState.ERROR}),
    ServerState.OPTIONS: frozenset(
        {ServerState.TLS_HANDSHAKE, ServerState.TRANSMISSION, ServerState.CLOSED, ServerState.ERROR}
    ),
    ServerState.TLS_HANDSHAKE: frozenset({ServerState.OPTIONS, ServerState.ERROR}),
    ServerState.TRANSMISSION: frozenset({ServerState.CLOSED, ServerState.ERROR}),
    ServerState.CLOSED: frozenset({ServerState.ERROR}),
    ServerState.ERROR: frozenset(),
}


@dataclass
class Transmission:
    """What the transmission phase works with; fixed when the export is selected.

    ``fast_commands`` is :meth:`ServerProtocol.parse_fast`'s table: for every command that
    :meth:`ServerProtocol._check_request` accepts on this connection whatever its range, the flags it
    may carry and the longest length it may have.
    """

    info: ExportInfo
    flags: int
    structured: bool
    meta_contexts: dict[int, str]
    max_io: int  # longest READ/WRITE accepted
    replies: ReplyBuilder
    fast_commands: dict[int, tuple[int, int]] = field(default_factory=dict)


#: One request :meth:`ServerProtocol.parse_fast` accepted: cookie, command, flags, offset, length, and
#: where its payload starts in the buffer (just after its header).
FastRequest = tuple[int, int, int, int, int, int]

_U32_MAX = 0xFFFFFFFF


class ServerProtocol(ProtocolCore[ServerEvent]):
    """One NBD server connection, sans-I/O (see the module docstring).

    ``lookup(name)`` returns the export called ``name`` (``""`` is the default export) or None;
    ``list_exports()`` the exports NBD_OPT_LIST shows.  Both are read, never changed.
    """

    def __init__(
        self,
        *,
        lookup: Callable[[str], ExportInfo | None],
        list_exports: Callable[[], Sequence[ExportInfo]],
        tls: TLSMode = "off",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        discard_limit: int = DEFAULT_DISCARD_LIMIT,
        logger: logging.Logger | None = None,
    ) -> None:
        if tls not in ("off", "on", "required"):
            raise ValueError(f"tls must be 'off', 'on' or 'required', not {tls!r}")
        super().__init__(logger or log)
        self.lookup = lookup
        self.list_exports = list_exports
        self.tls: TLSMode = tls
        self.max_payload = max_payload
        self.discard_limit = max(discard_limit, max_payload)
        self._state = ServerState.CLIENT_FLAGS
        self.client_flags = 0
        self.tls_active = False
        self.negotiation = Negotiation()
        self._tx: Transmission | None = None

    # -- public API --------------------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self._state

    def initial_bytes(self) -> bytes:
        """The greeting the server sends first: NBDMAGIC, IHAVEOPT and the handshake flags."""
        return GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    def tls_started(self) -> None:
        """The shell finished the TLS handshake: option haggling goes on, now over TLS."""
        if self._state is not ServerState.TLS_HANDSHAKE:
            raise StateError(f"tls_started() in state {self._state.value}")
        self.tls_active = True
        self._set_state(ServerState.OPTIONS)

    @property
    def replies(self) -> ReplyBuilder:
        """The reply builder of the transmission phase (``StateError`` before it)."""
        if self._tx is None:
            raise StateError("no export selected yet")
        return self._tx.replies

    @property
    def transmission(self) -> Transmission | None:
        return self._tx

    @property
    def fixed_newstyle(self) -> bool:
        return bool(self.client_flags & NBD_FLAG_C_FIXED_NEWSTYLE)

    @property
    def no_zeroes(self) -> bool:
        return bool(self.client_flags & NBD_FLAG_C_NO_ZEROES)

    # -- state machine -----------------------------------------------------------------------------

    def _set_state(self, new: ServerState) -> None:
        assert new in _TRANSITIONS[self._state], f"{self._state} -> {new}"
        self._log.debug("state %s -> %s", self._state.value, new.value)
        self._state = new

    def _on_fail(self) -> None:
        if self._state is not ServerState.ERROR:
            self._set_state(ServerState.ERROR)

    def _check_receive(self) -> None:
        if self._state is ServerState.TLS_HANDSHAKE:
            raise StateError("receive_data() during the TLS handshake: those bytes belong to TLS")

    def _check_next(self) -> None:
        if self._state is ServerState.TLS_HANDSHAKE:
            raise StateError("next_event() during the TLS handshake: call tls_started() first")

    def _on_eof(self) -> ServerEvent:
        if self._state is not ServerState.CLOSED:
            self._set_state(ServerState.CLOSED)
        return ConnectionClosed()

    def _parse(self) -> bool:
        state = self._state
        if state is ServerState.TRANSMISSION:
            return self._parse_request()
        if state is ServerState.OPTIONS:
            return self._parse_option()
        if state is ServerState.CLIENT_FLAGS:
            return self._parse_client_flags()
        if state is ServerState.CLOSED and self._buffer:
            self._fail("data after the client disconnected")
            return True
        return False

    def _send(self, data: bytes) -> None:
        self._emit(SendData(data))

    # -- handshake ---------------------------------------------------------------------------------

    def _parse_client_flags(self) -> bool:
        if len(self._buffer) < CLIENT_FLAGS.size:
            return False
        (flags,) = CLIENT_FLAGS.unpack(self._buffer.take(CLIENT_FLAGS.size))
        if flags & ~_KNOWN_CLIENT_FLAGS:
            self._fail(f"unknown client flags {flags:#x}")
            return True
        self.client_flags = flags
        self._log.debug("client flags %s", flag_names(flags, CLIENT_FLAG_NAMES))
        self._set_state(ServerState.OPTIONS)
        return True

    def _parse_option(self) -> bool:
        buffer = self._buffer
        if len(buffer) < OPTION_HEADER.size:
            return False
        magic, option, length = OPTION_HEADER.unpack(buffer.peek(OPTION_HEADER.size))
        if magic != IHAVEOPT:
            self._fail(f"bad option magic {magic:#x}")
            return True
        if option != NBD_OPT_EXPORT_NAME and not self.fixed_newstyle:
            self._fail(f"{opt_name(option)} from a client without fixed newstyle")
            return True
        if option == NBD_OPT_EXPORT_NAME and length > NBD_MAX_STRING_SIZE:
            self._fail(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
            return True
        if length > OPTION_DATA_MAX:
            if length > self.discard_limit:
                self._fail(f"{opt_name(option)} with {length} bytes of data")
                return True
            buffer.skip(OPTION_HEADER.size)
            self._start_discard(length)
            tls_missing = self.tls == "required" and not self.tls_active
            error = NBD_REP_ERR_TLS_REQD if tls_missing else NBD_REP_ERR_TOO_BIG
            self._send(option_reply(option, error, f"{length} bytes of option data is too much".encode()))
            return True
        if len(buffer) < OPTION_HEADER.size + length:
            return False
        buffer.skip(OPTION_HEADER.size)
        self._handle_option(option, buffer.take(length))
        return True

    def _handle_option(self, option: int, data: bytes) -> None:
        self._log.debug("option %s, %d bytes", opt_name(option), len(data))
        if self.tls == "required" and not self.tls_active and option not in (NBD_OPT_STARTTLS, NBD_OPT_ABORT):
            if option == NBD_OPT_EXPORT_NAME:
                self._fail("NBD_OPT_EXPORT_NAME before TLS, which is required")
            else:
                self._send(option_reply(option, NBD_REP_ERR_TLS_REQD, b"TLS is required"))
            return
        outcome = _options.handle(self, option, data)
        if outcome.reply:
            self._send(outcome.reply)
        if outcome.error is not None:
            self._fail(outcome.error)
        elif outcome.abort:
            self._emit(Disconnect("NBD_OPT_ABORT"))
            self._set_state(ServerState.CLOSED)
        elif outcome.starttls:
            if self._buffer:
                self._fail("client sent data before the NBD_OPT_STARTTLS reply")
                return
            self.negotiation = Negotiation()
            self._emit(StartTLS())
            self._set_state(ServerState.TLS_HANDSHAKE)
        elif outcome.export is not None:
            self._enter_transmission(outcome.export, option, outcome.block_size_agreed)

    def _enter_transmission(self, info: ExportInfo, option: int, block_size_agreed: bool) -> None:
        neg = self.negotiation
        contexts = dict(neg.meta_contexts) if neg.meta_export == info.name else {}
        flags = info.transmission_flags(structured_replies=neg.structured)
        replies = ReplyBuilder(
            structured=neg.structured, meta_contexts=contexts, min_block_size=info.min_block_size
        )
        self._tx = Transmission(
            info=info,
            flags=flags,
            structured=neg.structured,
            meta_contexts=contexts,
            max_io=self.max_io(info),
            replies=replies,
        )
        self._tx.fast_commands = self._fast_commands(self._tx)
        self._emit(
            ExportSelected(
                info=info,
                option=option,
                transmission_flags=flags,
                structured_replies=neg.structured,
                meta_contexts=tuple(contexts.items()),
                block_size_agreed=block_size_agreed,
            )
        )
        self._set_state(ServerState.TRANSMISSION)

    def max_io(self, info: ExportInfo) -> int:
        """The longest READ/WRITE this connection accepts for ``info`` (advertised as maximum block size)."""
        limit = min(info.max_block_size, self.max_payload)
        return limit - limit % info.min_block_size

    # -- transmission ------------------------------------------------------------------------------

    def _parse_request(self) -> bool:
        if len(self._buffer) < REQUEST.size:
            return False
        magic, flags, cmd, cookie, offset, length = self._buffer.unpack(REQUEST)
        if magic != NBD_REQUEST_MAGIC:
            why = " (extended headers were not negotiated)" if magic == NBD_EXTENDED_REQUEST_MAGIC else ""
            self._fail(f"bad request magic {magic:#x}{why}")
            return True
        if cmd == NBD_CMD_DISC:
            self._emit(Disconnect("NBD_CMD_DISC"))
            self._set_state(ServerState.CLOSED)
            return True
        error, message = self._check_request(cmd, flags, offset, length)
        payload = length if cmd == NBD_CMD_WRITE else 0
        if payload and error:
            if payload > self.discard_limit:
                self._fail(f"NBD_CMD_WRITE with a {payload}-byte payload")
                return True
            self._start_discard(payload)
            payload = 0
        self._emit(Request(cookie, cmd, flags, offset, length, payload, error, message))
        self._expect_payload(payload)
        return True

    def _check_request(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(NBD error, message) for a request the core can already tell is invalid, else (0, "")."""
        tx = self._tx
        assert tx is not None
        allowed = self._allowed_flags(tx, cmd)
        if allowed is None:
            return NBD_EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return NBD_EINVAL, f"flags {flags & ~allowed:#x} are not valid for {cmd_name(cmd)}"
        error, message = self._command_error(tx, cmd)
        if error:
            return error, message
        size = tx.info.size
        if cmd != NBD_CMD_FLUSH and (offset > size or length > size - offset):
            error = NBD_ENOSPC if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
            return error, f"[{offset}, +{length}) lies beyond the end of the export ({size} bytes)"
        if cmd in (NBD_CMD_READ, NBD_CMD_WRITE) and length > tx.max_io:
            return NBD_EINVAL, f"length {length} exceeds the maximum of {tx.max_io}"
        if cmd == NBD_CMD_BLOCK_STATUS and not tx.meta_contexts:
            return NBD_EINVAL, "no metadata context was negotiated"
        return 0, ""

    @staticmethod
    def _allowed_flags(tx: Transmission, cmd: int) -> int | None:
        """The flags ``cmd`` may carry on this connection; None for an unknown command."""
        allowed = COMMAND_FLAGS_ALLOWED.get(cmd)
        if allowed is None:
            return None
        if not tx.structured:
            allowed &= ~NBD_CMD_FLAG_DF
        if not tx.flags & NBD_FLAG_SEND_FAST_ZERO:
            allowed &= ~NBD_CMD_FLAG_FAST_ZERO
        return allowed

    @staticmethod
    def _command_error(tx: Transmission, cmd: int) -> tuple[int, str]:
        """(NBD error, message) if the export refuses ``cmd`` whatever its range, else (0, "")."""
        # Read-only before "not advertised": a read-only export advertises no TRIM or WRITE_ZEROES, yet
        # the spec asks for NBD_EPERM on a write, trim or write zeroes there, as for a WRITE.
        if cmd in _WRITES and tx.info.read_only:
            return NBD_EPERM, "the export is read-only"
        needed = COMMAND_NEEDS_FLAG.get(cmd, 0)
        if needed and not tx.flags & needed:
            return NBD_EINVAL, f"{cmd_name(cmd)} is not supported by this export"
        return 0, ""

    @classmethod
    def _fast_commands(cls, tx: Transmission) -> dict[int, tuple[int, int]]:
        """The table of :meth:`parse_fast`: command -> (flags allowed, longest length), for every
        command :meth:`_check_request` accepts here when the flags are allowed, the range lies in the
        export and the length is at most the longest.  (Its one other case, a FLUSH whose offset and
        length lie beyond the end, which it accepts, is left to the careful path.)"""
        table: dict[int, tuple[int, int]] = {}
        for cmd in COMMAND_FLAGS_ALLOWED:
            allowed = cls._allowed_flags(tx, cmd)
            if cmd == NBD_CMD_DISC or allowed is None or cls._command_error(tx, cmd)[0]:
                continue
            if cmd == NBD_CMD_BLOCK_STATUS and not tx.meta_contexts:
                continue
            table[cmd] = (allowed, tx.max_io if cmd in (NBD_CMD_READ, NBD_CMD_WRITE) else _U32_MAX)
        return table

    # -- transmission fast path --------------------------------------------------------------------

    def parse_fast(self, buf: memoryview, end: int) -> tuple[list[FastRequest], int, int]:
        """Parse the usual requests at the start of ``buf[:end]`` in one go, bypassing the event queue.

        The transmission phase's fast path: a shell that received ``end`` bytes at a request boundary
        calls this first.  It returns ``(requests, pos, wanted)``: the requests of ``buf[:pos]``, each
        valid (as :meth:`_check_request` has it) and complete (a WRITE with all its payload, which is
        ``buf[start : start + length]``); then, for what is left at ``pos``, ``wanted`` is the length of
        the next request when it is incomplete but usual so far (a header cut short: 28; a valid WRITE
        whose payload is cut short: header and payload), or 0 when it is anything else.  The core
        keeps no state of its own for these requests and none of their bytes::

            buf   |req|req|WRITE + payload|req|WRITE + part of its pay|
                  |<------------- requests ------------>|<- wanted ->|
                                                        pos

        What is left -- all of ``buf[:end]`` when the core is not idle in transmission (bytes or
        events pending, a payload owed, an error, EOF) or when debug logging is on (the careful path
        logs every message) -- the shell must either keep and pass again, with more bytes after it, in
        a later call, or pass to :meth:`receive_data`, after which the careful path (``next_event()``)
        handles it and everything after it: bad magic, unknown commands and flags, ranges beyond the
        end, oversized requests, NBD_CMD_DISC all go there, with their usual errors.  While the core
        holds anything, this returns ``([], 0, 0)``.
        """
        tx = self._tx
        if (
            self._state is not ServerState.TRANSMISSION
            or self._payload
            or self._discard
            or self._events
            or self._buffer.size
            or self._eof
            or tx is None
            or self._log.isEnabledFor(logging.DEBUG)
        ):
            return [], 0, 0
        table = tx.fast_commands
        size = tx.info.size
        unpack = REQUEST.unpack_from
        header = REQUEST.size
        requests: list[FastRequest] = []
        pos = 0
        while end - pos >= header:
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            usual = table.get(cmd)
            if (
                magic != NBD_REQUEST_MAGIC
                or usual is None
                or flags & ~usual[0]
                or length > usual[1]
                or offset + length > size
            ):
                return requests, pos, 0
            start = pos + header
            if cmd == NBD_CMD_WRITE:
                if start + length > end:
                    return requests, pos, header + length
                requests.append((cookie, cmd, flags, offset, length, start))
                pos = start + length
            else:
                requests.append((cookie, cmd, flags, offset, length, start))
                pos = start
        return requests, pos, header if pos < end else 0
