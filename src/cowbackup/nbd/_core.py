"""What the server and client cores share: the receive buffer, the event queue and the payload contract.

Receive buffer
--------------
``receive_data()`` keeps the bytes as the immutable chunks they arrived in (a ``bytes`` argument is kept
as is, anything else is copied once, because the caller may reuse its buffer).  Headers and option data
are parsed from there; nothing is ever compacted or shifted.

Payload bypass (STYLE #12)
--------------------------
Bulk data (an NBD_CMD_WRITE payload on the server, READ data on the client) never goes through the
parser.  The core announces it with an event whose ``payload_length`` is N and then *refuses*
``next_event()`` (:class:`~cowbackup.nbd.errors.StateError`) until the shell has accounted for all N bytes,
in stream order, with two calls::

      wire:   ... | header | <------------- N payload bytes -------------> | next header ...
                           |<- already in the core ->|<- still in socket ->|
                              take_buffered(N)          shell reads these itself,
                              -> memoryview             then payload_consumed(k)

* ``take_buffered(n)`` returns (and consumes) up to ``n`` payload bytes the core already holds, as a
  read-only memoryview - zero-copy when they arrived in one chunk.  It is empty when the core holds none.
* ``payload_consumed(k)`` says the shell read ``k`` payload bytes straight from the socket into its own
  buffer.  It is refused while the core still holds payload bytes (those come first in the stream), and
  for more bytes than are owed - so the stream cannot get out of step.

A shell may also keep feeding payload bytes through ``receive_data()`` and drain them with
``take_buffered()``; the accounting is the same.  Bytes the core must skip (the payload of a write it
already failed, oversized option data) are dropped as they arrive, never buffered.

Errors from the peer are returned, never raised: ``next_event()`` returns a
:class:`~cowbackup.nbd.errors.ProtocolError` and keeps returning it; later data is ignored.
"""

from __future__ import annotations

import abc
import logging
import struct
from collections import deque
from typing import Any, Generic, TypeVar

from cowbackup.nbd.errors import ProtocolError, StateError
from cowbackup.nbd.events import NEED_DATA, NeedData, SendData

__all__ = ["ByteQueue", "ProtocolCore"]

EventT = TypeVar("EventT")


class ByteQueue:
    """A FIFO of received bytes, stored as the chunks they arrived in."""

    __slots__ = ("_chunks", "_head", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already consumed
        self.size = 0  # bytes held (read only: what len() gives, without a call)

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        chunk = data if type(data) is bytes else bytes(data)
        if chunk:
            self._chunks.append(chunk)
            self.size += len(chunk)

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes (``n <= len(self)``), left in the queue."""
        if n <= 0:
            return b""
        first = self._chunks[0]
        if len(first) - self._head >= n:
            return first[self._head : self._head + n]
        parts = []
        head = self._head
        for chunk in self._chunks:
            piece = chunk[head : head + n]
            parts.append(piece)
            n -= len(piece)
            head = 0
            if not n:
                break
        return b"".join(parts)

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Remove the first ``layout.size`` bytes (``<= len(self)``) and unpack them."""
        n = layout.size
        first = self._chunks[0]
        head = self._head
        if len(first) - head < n:
            return layout.unpack(self.take(n))
        values = layout.unpack_from(first, head)
        self.size -= n
        if len(first) - head == n:
            self._chunks.popleft()
            self._head = 0
        else:
            self._head = head + n
        return values

    def take(self, n: int) -> bytes:
        """Remove and return the first ``n`` bytes (``n <= len(self)``)."""
        data = self.peek(n)
        self.skip(n)
        return data

    def take_view(self, n: int) -> memoryview:
        """Remove and return up to ``n`` bytes as a memoryview; zero-copy when they lie in one chunk."""
        n = min(n, self.size)
        if n <= 0:
            return memoryview(b"")
        first = self._chunks[0]
        if len(first) - self._head >= n:
            view = memoryview(first)[self._head : self._head + n]
            self.skip(n)
            return view
        return memoryview(self.take(n))

    def skip(self, n: int) -> int:
        """Drop up to ``n`` bytes; return how many were dropped."""
        n = min(n, self.size)
        left = n
        while left:
            avail = len(self._chunks[0]) - self._head
            if avail > left:
                self._head += left
                break
            self._chunks.popleft()
            self._head = 0
            left -= avail
        self.size -= n
        return n


class ProtocolCore(abc.ABC, Generic[EventT]):
    """Buffering, event queue, payload contract and sticky errors for a sans-I/O NBD core.

    Subclasses implement ``_parse()`` (parse at most one message from ``self._buffer``, queue its events
    with ``_emit()``, return False when more bytes are needed) and ``_on_eof()`` (the event to return when
    the peer closed the connection and nothing is pending).
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._buffer = ByteQueue()
        self._eof = False
        self._events: deque[EventT | ProtocolError] = deque()
        self._final: EventT | ProtocolError | None = None  # returned forever once set
        self._payload = 0  # payload bytes the shell still owes (bypass contract)
        self._discard = 0  # bytes the core drops as they arrive; while > 0 the buffer is empty

    # -- public API --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF.  ``StateError`` after EOF."""
        if self._eof:
            raise StateError("receive_data() after EOF")
        self._check_receive()
        if not data:
            self._eof = True
            return
        if self._final is not None:
            return  # the connection is over; nothing more is parsed
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            if dropped == len(data):
                return
            data = memoryview(data)[dropped:]
        self._buffer.append(data)

    def next_event(self) -> EventT | ProtocolError | NeedData:
        """The next event, or :data:`~cowbackup.nbd.events.NEED_DATA` when more bytes are needed.

        ``StateError`` while payload bytes are owed (see the module docstring).
        """
        if self._payload:
            if not (self._eof and not self._buffer):
                raise StateError(
                    f"{self._payload} payload bytes not accounted for: call take_buffered() and "
                    "payload_consumed() before next_event()"
                )
            self._payload = 0
            self._fail("connection closed in the middle of a payload")
        while True:
            if self._events:
                event = self._events.popleft()
                self._trace(event)
                return event
            if self._final is not None:
                return self._final
            self._check_next()
            if self._discard:
                if self._eof:
                    self._fail("connection closed in the middle of a message")
                    continue
                return NEED_DATA
            if self._buffer and self._parse():
                continue
            if not self._eof:
                return NEED_DATA
            if self._buffer:
                self._fail("connection closed in the middle of a message")
            else:
                self._final = self._on_eof()

    @property
    def payload_pending(self) -> int:
        """Payload bytes the shell still has to account for."""
        return self._payload

    @property
    def discard_pending(self) -> int:
        """Bytes the core still drops as they arrive (e.g. the rest of a failed write's payload)."""
        return self._discard

    def take_buffered(self, n: int) -> memoryview:
        """Consume up to ``n`` of the owed payload bytes the core already holds (maybe none).

        The view stays valid after later calls.  ``StateError`` if no payload is owed.
        """
        if not self._payload:
            raise StateError("take_buffered() with no payload pending")
        if n < 0:
            raise ValueError(f"negative length {n}")
        view = self._buffer.take_view(min(n, self._payload))
        self._payload -= len(view)
        return view

    def payload_consumed(self, n: int) -> None:
        """Account for ``n`` payload bytes the shell read from the socket itself.

        ``StateError`` if the core still holds payload bytes (take them first) or ``n`` exceeds what is owed.
        """
        if n < 0 or n > self._payload:
            raise StateError(f"payload_consumed({n}) but {self._payload} payload bytes are owed")
        if n and self._buffer:
            raise StateError(
                f"payload_consumed({n}) while the core still holds {len(self._buffer)} bytes: "
                "call take_buffered() first"
            )
        self._payload -= n

    # -- for subclasses ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _parse(self) -> bool:
        """Parse one message from the buffer into events; False if more bytes are needed.

        Only called with bytes in the buffer: no message is empty.
        """

    @abc.abstractmethod
    def _on_eof(self) -> EventT | ProtocolError:
        """The event for end-of-file in the current state."""

    def _check_receive(self) -> None:
        """Raise StateError if bytes may not be received now (e.g. during a TLS handshake)."""

    def _check_next(self) -> None:
        """Raise StateError if, all queued events delivered, parsing may not go on (TLS handshake)."""

    def _emit(self, event: EventT | ProtocolError) -> None:
        self._events.append(event)

    def _fail(self, message: str) -> ProtocolError:
        """End the connection with a ProtocolError (returned after the events queued before it)."""
        error = ProtocolError(message)
        self._final = error
        self._discard = 0
        self._on_fail()
        return error

    def _on_fail(self) -> None:
        """Hook: move the subclass's state machine to its error state."""

    def _expect_payload(self, n: int) -> None:
        self._payload = n

    def _start_discard(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream, buffered or not yet received."""
        self._discard = n - self._buffer.skip(n)

    def _trace(self, event: object) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            if isinstance(event, SendData):
                self._log.debug("send %d bytes", len(event.data))
            else:
                self._log.debug("event %r", event)
