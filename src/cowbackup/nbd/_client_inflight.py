"""The requests in flight on an :class:`~cowbackup.nbd.client_conn.NBDClient`, and routing replies to them.

A request holds one of the connection's in-flight slots (:class:`SlotGuard`) from before it is sent
until its reply is complete, and is registered by cookie as a :class:`Pending`.  The reader task runs
:func:`route_replies`: it takes the core's events and applies each chunk to the request of its cookie
(READ data straight into the caller's buffer, errors, ``base:allocation`` extents); when a reply is
done it hands the cookie back to the client, which resolves the caller's future.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cowbackup.nbd._client_connect import READ_SIZE
from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.errors import ProtocolError, RequestError
from cowbackup.nbd.events import (
    BlockStatusChunk,
    ConnectionClosed,
    ErrorChunk,
    NeedData,
    NoneChunk,
    OffsetDataChunk,
    OffsetHoleChunk,
    ReplyData,
    SimpleReply,
)

#: Block status extents as the server sends them: (length, NBD_STATE_* flags), consecutive.
Extents = tuple[tuple[int, int], ...]

_ZEROS = bytes(1024 * 1024)


class Pending:
    """A request in flight: where its data goes, what its reply said so far, who waits for it.

    ``buf`` is the caller's buffer for a READ (None for other requests, and once the caller gave up:
    the data is then read and dropped).  Owned by the reader task once registered.
    """

    __slots__ = ("buf", "context_id", "error", "extents", "future", "length", "offset", "type")

    def __init__(
        self, type: int, offset: int, length: int, buf: memoryview | None, context_id: int | None = None
    ) -> None:
        self.type = type
        #: For BLOCK_STATUS: the metadata context whose extents the caller wants (others are dropped).
        self.context_id = context_id
        self.offset = offset
        self.length = length
        self.buf = buf
        self.error: OSError | None = None
        self.extents: Extents = ()
        self.future: asyncio.Future[Extents] = asyncio.get_running_loop().create_future()

    def view(self, offset: int, length: int) -> memoryview | None:
        """The part of the caller's buffer for ``[offset, offset+length)`` (inside the request)."""
        if self.buf is None:
            return None
        start = offset - self.offset
        return self.buf[start : start + length]


class SlotGuard:
    """Holds one in-flight slot; releases it on exit unless :meth:`disarm` handed it to the reader."""

    __slots__ = ("_armed", "_slots")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._armed = False

    async def __aenter__(self) -> SlotGuard:
        await self._slots.acquire()
        self._armed = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._armed:
            self._slots.release()

    def disarm(self) -> None:
        self._armed = False


async def route_replies(
    proto: ClientProtocol,
    reader: asyncio.StreamReader,
    in_flight: dict[int, Pending],
    complete: Callable[[int], None],
) -> str:
    """Route replies until the connection ends; return why it ended.

    ``in_flight`` is the client's cookie -> request table (a BLOCK_STATUS request keeps the extents of
    the context it asked for and drops the others); ``complete(cookie)`` is
    called once the last chunk of a reply was applied.  Socket errors and EOF in the middle of READ
    data propagate.
    """
    eof = False
    while True:
        event = proto.next_event()
        if isinstance(event, NeedData):
            data = await reader.read(READ_SIZE)
            eof = not data
            proto.receive_data(data)
            continue
        if isinstance(event, ReplyData | OffsetDataChunk):
            await _payload(proto, reader, in_flight[event.cookie], event.offset, event.length)
        elif isinstance(event, OffsetHoleChunk):
            dest = in_flight[event.cookie].view(event.offset, event.length)
            if dest is not None:
                _zero_fill(dest)
        elif isinstance(event, BlockStatusChunk):
            pending = in_flight[event.cookie]
            if event.context_id == pending.context_id:
                pending.extents = event.extents
        elif isinstance(event, ErrorChunk):
            pending = in_flight[event.cookie]
            if pending.error is None:
                pending.error = event.exception()
        elif isinstance(event, SimpleReply):
            if event.error:
                in_flight[event.cookie].error = RequestError(event.error)
        elif isinstance(event, NoneChunk):
            pass
        elif isinstance(event, ConnectionClosed):
            return "the server closed the connection"
        elif isinstance(event, ProtocolError):
            # At EOF the core says what was cut short ("... with 3 requests in flight").
            return str(event) if eof else f"NBD protocol error: {event}"
        else:
            return f"unexpected {type(event).__name__} from the protocol core"
        if event.done:
            complete(event.cookie)


async def _payload(
    proto: ClientProtocol, reader: asyncio.StreamReader, pending: Pending, offset: int, length: int
) -> None:
    """Move ``length`` payload bytes for ``offset`` into the caller's buffer (or drop them)."""
    dest = pending.view(offset, length)
    view = proto.take_buffered(length)
    have = len(view)
    if dest is not None:
        dest[:have] = view
    pos = have
    while pos < length:
        chunk = await reader.read(min(length - pos, READ_SIZE))
        if not chunk:
            raise EOFError(f"connection closed with {length - pos} bytes of read data missing")
        if pending.buf is not None and dest is not None:  # the caller may give up meanwhile
            dest[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    proto.payload_consumed(length - have)


def _zero_fill(view: memoryview) -> None:
    for pos in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos : pos + n] = _ZEROS[:n]
