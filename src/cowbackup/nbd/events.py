"""Events the sans-I/O NBD cores return from ``next_event()``.

Every event is a frozen dataclass, except :class:`Request`, a ``NamedTuple`` (one is made for every
request a server receives, and a tuple costs a fraction of a frozen dataclass's ``__init__``), and the two
error events, which are exception instances (:class:`~cowbackup.nbd.errors.ProtocolError`,
:class:`~cowbackup.nbd.errors.OptionError`) so a shell can raise them as they are.

Shared by both sides: :class:`NeedData`, :class:`SendData`, :class:`StartTLS`, :class:`Disconnect`,
:class:`ConnectionClosed`.  Server side: :class:`ExportSelected`, :class:`Request`.  Client side:
:class:`Greeting`, :class:`OptionAck`, :class:`ExportList`, :class:`MetaContexts`,
:class:`ExportInfoReply`, :class:`ExportReady` and the transmission replies :class:`SimpleReply`,
:class:`ReplyData` and the :class:`StructuredChunk` family.

Events that announce a *payload* have a ``payload_length``: that many bytes follow on the wire and the
shell must account for them (``take_buffered()`` / ``payload_consumed()``) before ``next_event()``
returns anything else; see :mod:`cowbackup.nbd._core`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from cowbackup.nbd.constants import (
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_WRITE,
    NBD_REPLY_FLAG_DONE,
    cmd_name,
    error_name,
    nbd_to_errno,
)
from cowbackup.nbd.errors import OptionError, ProtocolError, RequestError
from cowbackup.nbd.exports import ExportInfo

__all__ = [
    "NEED_DATA",
    "BlockStatusChunk",
    "ClientEvent",
    "ConnectionClosed",
    "Disconnect",
    "ErrorChunk",
    "ExportEntry",
    "ExportInfoReply",
    "ExportList",
    "ExportReady",
    "ExportSelected",
    "Greeting",
    "MetaContexts",
    "NeedData",
    "NoneChunk",
    "OffsetDataChunk",
    "OffsetHoleChunk",
    "OptionAck",
    "ReplyData",
    "Request",
    "SendData",
    "ServerEvent",
    "SimpleReply",
    "StartTLS",
    "StructuredChunk",
]

# -- both sides ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedData:
    """No complete message is buffered: read more from the peer and call ``receive_data()``."""


#: The one NeedData instance the cores return.
NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class SendData:
    """Bytes the core wants written to the peer, now and in order with other writes."""

    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"SendData({len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged (the ACK went out in the SendData before this event).

    The shell runs the TLS handshake on the socket, then calls ``tls_started()``; from then on every
    byte is read and written through TLS.  All earlier negotiation state is forgotten, as the spec asks.
    """


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A soft disconnect: NBD_CMD_DISC, or an acknowledged NBD_OPT_ABORT.  Close after in-flight work.

    ``reason`` says which, for logs.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection between two messages (EOF with nothing pending)."""


# -- server side -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """The handshake is over (NBD_OPT_GO acknowledged or NBD_OPT_EXPORT_NAME answered): transmission begins.

    ``transmission_flags`` are the flags the client was sent; ``meta_contexts`` the (id, name) pairs the
    last NBD_OPT_SET_META_CONTEXT selected for this export (empty if none); ``block_size_agreed`` is true
    when the client asked for NBD_INFO_BLOCK_SIZE with NBD_OPT_GO and so promised to honour it.
    """

    info: ExportInfo
    option: int
    transmission_flags: int
    structured_replies: bool
    meta_contexts: tuple[tuple[int, str], ...] = ()
    block_size_agreed: bool = False


class Request(NamedTuple):
    """One transmission request (anything but NBD_CMD_DISC, which is a :class:`Disconnect`).

    ``error`` is nonzero (an ``NBD_E*`` value) when the core already knows the request must fail
    (unknown command or flags, out of range, read-only export, oversized, no metadata context...): the
    shell only sends the error reply (``ReplyBuilder.error(request, request.error,
    request.error_message)``) and the connection goes on.  A failed NBD_CMD_WRITE's payload is discarded
    by the core, so ``payload_length`` is then 0.

    ``payload_length`` is the number of payload bytes that follow the header (the data of a valid
    NBD_CMD_WRITE).  The shell must account for them before the next ``next_event()``::

        view = proto.take_buffered(request.payload_length)       # bytes the core already holds
        buf[: len(view)] = view
        ... read request.payload_length - len(view) bytes from the socket into buf[len(view):] ...
        proto.payload_consumed(request.payload_length - len(view))
    """

    cookie: int
    type: int
    flags: int
    offset: int
    length: int
    payload_length: int = 0
    error: int = 0
    error_message: str = ""

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_NO_HOLE)

    @property
    def df(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_DF)

    @property
    def req_one(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_REQ_ONE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FAST_ZERO)

    @property
    def is_write(self) -> bool:
        return self.type == NBD_CMD_WRITE

    def __str__(self) -> str:
        text = f"{cmd_name(self.type)} cookie={self.cookie:#x} offset={self.offset} length={self.length}"
        if self.flags:
            text += f" flags={self.flags:#x}"
        if self.error:
            text += f" -> {error_name(self.error)} ({self.error_message})"
        return text


#: Everything ServerProtocol.next_event() returns besides NeedData.
ServerEvent = SendData | StartTLS | ExportSelected | Request | Disconnect | ConnectionClosed | ProtocolError

# -- client side: handshake ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's greeting was read and our client flags were queued (in a SendData before this event).

    Options may be sent now.  ``fixed_newstyle`` false means only NBD_OPT_EXPORT_NAME is possible.
    """

    handshake_flags: int
    fixed_newstyle: bool
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class OptionAck:
    """An option that carries no information was acknowledged (NBD_OPT_STRUCTURED_REPLY)."""

    option: int


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One NBD_REP_SERVER entry of NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportList:
    """The reply to NBD_OPT_LIST."""

    exports: tuple[ExportEntry, ...]


@dataclass(frozen=True, slots=True)
class MetaContexts:
    """The reply to NBD_OPT_SET_META_CONTEXT (name -> context id) or _LIST_META_CONTEXT (ids are 0)."""

    option: int
    contexts: dict[str, int]


@dataclass(frozen=True, slots=True)
class ExportInfoReply:
    """What NBD_OPT_INFO (or NBD_OPT_GO, see :class:`ExportReady`) told about an export.

    Block sizes are the spec's defaults (1, 4096, 0xffffffff) when the server sent no NBD_INFO_BLOCK_SIZE.
    """

    name: str
    size: int
    transmission_flags: int
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = 0xFFFFFFFF
    canonical_name: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ExportReady(ExportInfoReply):
    """The handshake is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME): transmission begins.

    ``structured_replies`` and ``meta_contexts`` (name -> id) are what was negotiated and still holds.
    """

    structured_replies: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)


# -- client side: transmission replies -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply that completes request ``cookie`` (without data: see :class:`ReplyData`)."""

    cookie: int
    error: int

    @property
    def done(self) -> bool:
        return True

    def exception(self) -> RequestError | None:
        """The error as a RequestError, or None on success."""
        return RequestError(self.error) if self.error else None


@dataclass(frozen=True, slots=True)
class ReplyData:
    """A successful simple reply to NBD_CMD_READ: ``length`` bytes of data for ``offset`` follow.

    The request completes once the payload is consumed (``payload_length`` bytes, same contract as
    :class:`Request`).
    """

    cookie: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        return self.length

    @property
    def done(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class StructuredChunk:
    """One structured reply chunk of request ``cookie``; ``done`` marks the last chunk of the reply."""

    cookie: int
    flags: int
    type: int

    @property
    def done(self) -> bool:
        return bool(self.flags & NBD_REPLY_FLAG_DONE)


@dataclass(frozen=True, slots=True)
class NoneChunk(StructuredChunk):
    """NBD_REPLY_TYPE_NONE: the reply is complete (successful unless an error chunk came before)."""


@dataclass(frozen=True, slots=True)
class OffsetDataChunk(StructuredChunk):
    """NBD_REPLY_TYPE_OFFSET_DATA: ``length`` bytes of data for ``offset`` follow as a payload."""

    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        return self.length


@dataclass(frozen=True, slots=True)
class OffsetHoleChunk(StructuredChunk):
    """NBD_REPLY_TYPE_OFFSET_HOLE: ``length`` bytes at ``offset`` read as zeroes."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusChunk(StructuredChunk):
    """NBD_REPLY_TYPE_BLOCK_STATUS for ``context_id``: consecutive (length, status flags) extents."""

    context_id: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ErrorChunk(StructuredChunk):
    """An error chunk (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, or an unknown type with bit 15 set).

    ``offset`` is set for NBD_REPLY_TYPE_ERROR_OFFSET.  The reply has failed; more chunks may follow.
    """

    error: int = 0
    message: str = ""
    offset: int | None = None

    @property
    def errno(self) -> int:
        return nbd_to_errno(self.error)

    def exception(self) -> RequestError:
        return RequestError(self.error, self.message)


#: Everything ClientProtocol.next_event() returns besides NeedData.
ClientEvent = (
    SendData
    | StartTLS
    | Disconnect
    | ConnectionClosed
    | ProtocolError
    | OptionError
    | Greeting
    | OptionAck
    | ExportList
    | MetaContexts
    | ExportInfoReply
    | ExportReady
    | SimpleReply
    | ReplyData
    | StructuredChunk
)
