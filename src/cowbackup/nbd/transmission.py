"""The transmission phase of a server connection, as an asyncio buffered protocol.

Once the handshake is over the connection swaps its stream protocol for a :class:`Transmission`: the
socket is read straight into our buffers and each request starts in the callback that received it,
eagerly (:func:`~cowbackup.eager.start_eager`), so a request the page cache can answer is read, served and
replied to in one turn of the event loop::

    recv_into(receive buffer) -> core.parse_fast -> usual READ/WRITE -> node.read/write
                                 |              |                   -> the replies, in one writev
                                 |              \\-> other usual requests -> start_eager(serve)
                              -> the first unusual one and the rest -> core.receive_data -> Request
                                   -> start_eager(serve);  WRITE -> recv_into(payload buffer) -> ...

The fast path (:meth:`Transmission.buffer_updated`, ``docs/design.md`` "The connection's fast path")
takes the usual requests of a receive -- valid, complete -- with one call into the core; a WRITE's
payload is then a view of the receive buffer, which is not reused while a write still using it waits.
Everything else goes through the core's events (the careful path) with the errors it always gave.
There, a WRITE payload is received straight into its own buffer (STYLE #12); only bytes that arrived
together with headers pass through the core.  Those buffers are reused (a fresh 256 KiB ``bytearray``
costs a memset and page faults), and after a large payload the next read is kept short: the header of
the next large write and a little of its payload, rather than most of that payload read into the
receive buffer and then copied twice.  At most ``max_in_flight`` requests run at once: at the limit the
transport stops reading and the requests already received wait in the core.  A request's slot is freed
once its reply is handed to the socket, so a client that does not read its replies stops being read.

Flow control and end of connection events are passed on to the stream protocol that ran the handshake,
so the connection's ``StreamWriter`` (``drain()``, ``wait_closed()``) keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from cowbackup.block.buffers import BufferCache
from cowbackup.block.node import NO_FLAGS, RequestFlags
from cowbackup.eager import carry_on, start_eager
from cowbackup.nbd.constants import (
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EIO,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from cowbackup.nbd.errors import ProtocolError
from cowbackup.nbd.events import ConnectionClosed, Disconnect, NeedData, Request
from cowbackup.nbd.handlers import SPARSE_READ_MIN, RequestHandler
from cowbackup.nbd.replies import Message
from cowbackup.nbd.server import FastRequest, ServerProtocol
from cowbackup.nbd.wire import CHUNK_WITH_OFFSET, REQUEST, SIMPLE_REPLY

#: Size of the buffer requests are received into (payloads that do not fit go to their own buffer).
RECEIVE_SIZE = 256 * 1024
#: After a large payload received into its own buffer, the next read takes at most this much: a header
#: and a short payload fit, and of a long payload little is copied.  (Small payloads split by a read
#: are common when many small writes are in flight: those keep full reads, one syscall for many.)
SHORT_RECEIVE = 8 * 1024
#: A payload at least this long shortens the read after it.
LARGE_PAYLOAD = 64 * 1024
#: Bytes of freed payload buffers a connection keeps for reuse (16 writes of 256 KiB in flight fit).
PAYLOAD_CACHE = 4 * 1024 * 1024
#: A request cut short by the end of a receive is kept in the receive buffer, to be parsed again with
#: the bytes that complete it, when it is at most this long (header and payload); a longer WRITE goes
#: the careful way, its payload received straight into its own buffer.
CARRY_MAX = LARGE_PAYLOAD
#: The fast path sends the replies it has gathered once they hold this many bytes of read data, and
#: leaves the rest of a receive to the careful path (which holds a request slot per waiting reply) if
#: the client does not take them.
BATCH_BYTES = 256 * 1024

_FUA = RequestFlags.FUA
_simple_reply = SIMPLE_REPLY.pack
_SIMPLE_SIZE = SIMPLE_REPLY.size
_read_chunk = CHUNK_WITH_OFFSET.pack
_READ_CHUNK_SIZE = CHUNK_WITH_OFFSET.size


class ReplyOutput(Protocol):
    """Where replies go: a :class:`~cowbackup.nbd.vector_writer.VectorWriter` on a plain socket, the
    stream's transport (:class:`~cowbackup.nbd.connection.StreamOutput`) under TLS."""

    def send(self, message: Message) -> None:
        """Queue a whole reply (never interleaved with another)."""

    def send_buffers(self, pieces: list[bytes | memoryview], nbytes: int) -> None:
        """Queue whole replies made only of ``bytes`` and byte-format memoryviews, ``nbytes`` in all."""

    def hold(self, held: bool) -> None:
        """While held, replies may wait to leave together when let go."""

    def congested(self) -> bool:
        """Enough is queued that the sender should :meth:`drain`."""

    async def drain(self) -> None:
        """Wait until the queue is below its high-water mark."""


class _ReceiveBuffer:
    """A buffer requests are received into, and how many requests still running use a view of it.

    A WRITE served by the fast path gets its payload as a view of this buffer.  While a write that had
    to wait still uses one (``users``), the connection receives into another buffer; this one is used
    again only once they have all returned.  A write cancelled or failed unexpectedly never gives its
    use back (a pool thread may still be reading from the view): the buffer is then left to the
    garbage collector.
    """

    __slots__ = ("users", "view")

    def __init__(self) -> None:
        self.view = memoryview(bytearray(RECEIVE_SIZE))
        self.users = 0


class Transmission(asyncio.BufferedProtocol):
    """Receives and starts the requests of one connection (event-loop thread only).

    ``tasks`` are the requests that had to wait (those served at once never become tasks);
    ``in_flight`` counts every request started and not yet replied to; ``done`` resolves when no more
    requests will be taken (client gone, NBD_CMD_DISC, protocol error, :meth:`stop`).
    """

    def __init__(
        self,
        proto: ServerProtocol,
        handler: RequestHandler,
        output: ReplyOutput,
        *,
        stream_protocol: asyncio.BaseProtocol,
        max_in_flight: int,
        log: logging.Logger,
    ) -> None:
        self._proto = proto
        self._handler = handler
        self._out = output
        self._stream_protocol = stream_protocol
        self._max_in_flight = max_in_flight
        self._log = log
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._rbuf = _ReceiveBuffer()
        self._spare: _ReceiveBuffer | None = None  # a receive buffer nothing uses any more
        self._carry = 0  # bytes at the start of _rbuf: an incomplete request, parsed with the next bytes
        self._receive_size = RECEIVE_SIZE
        self._payload_buffers = BufferCache(PAYLOAD_CACHE)
        # The WRITE whose payload is being received into its own buffer, and how much of it is in.
        self._payload_req: Request | None = None
        self._payload_buf = memoryview(b"")
        self._payload_have = 0
        # An error reply held back until the core has dropped the failed write's payload.
        self._held_error: Message | None = None
        # A request received while ``max_in_flight`` others ran: it starts when one of them ends.
        self._blocked: tuple[Request, memoryview | None, bool] | None = None
        self._reading = True
        self._pumping = False
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.done: asyncio.Future[None] = self._loop.create_future()

    # ------------------------------------------------------------------ start and stop

    def start(self, transport: asyncio.Transport, leftover: bytes, eof: bool) -> None:
        """Take over ``transport`` from the stream; ``leftover`` is what the stream had read ahead."""
        self._transport = transport
        transport.set_protocol(self)
        if leftover:
            self._receive(leftover)
        if eof:
            self.eof_received()
        elif not transport.is_reading() and not self.done.done():
            transport.resume_reading()  # the stream may have paused it (its buffer was full)
        self._pump()

    def stop(self) -> None:
        """Take no more requests (those in flight go on); resolves :attr:`done`."""
        if self._reading and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
        self._reading = False
        if not self.done.done():
            self.done.set_result(None)

    # ------------------------------------------------------------------ asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_req is not None:
            return self._payload_buf[self._payload_have :]
        return self._rbuf.view[self._carry : self._receive_size]

    def buffer_updated(self, nbytes: int) -> None:
        """Serve the requests in ``_rbuf.view[:_carry + nbytes]`` (a carried incomplete request, then
        the bytes just received) -- unless a WRITE's payload is being received into its own buffer.

        The usual requests go the fast way: parsed by the core in one call
        (:meth:`~cowbackup.nbd.server.ServerProtocol.parse_fast`), run at once on the node, their
        replies sent together (:meth:`_serve_fast`).  From the first request that is not usual -- or
        that cannot start now -- on, the bytes go to the core and the careful path (:meth:`_pump`)::

            view  |req|req|req|odd...........|            |req|req|WRITE + half its pay|
                  |-- fast --|-> receive_data, _pump      |-- fast --|-> carried to the next receive
        """
        if self.done.done():
            return
        if self._payload_req is not None:
            self._payload_received(nbytes)
            return
        end = self._carry + nbytes
        self._carry = 0
        self._receive_size = RECEIVE_SIZE
        rbuf = self._rbuf
        view = rbuf.view
        requests, pos, wanted = self._proto.parse_fast(view, end)
        if requests and self._blocked is None:
            started = self._serve_fast(requests, view, rbuf)
            if started < len(requests):
                pos, wanted = requests[started][5] - REQUEST.size, 0
        elif requests:  # cannot happen: reading stops while a request is blocked
            pos, wanted = 0, 0
        if pos < end:
            if 0 < wanted <= CARRY_MAX:
                self._carry = end - pos
            else:
                self._receive(view[pos:end])
                self._pump()
        if rbuf.users:  # a write that waits still reads its payload from this buffer
            spare, self._spare = self._spare, None
            self._rbuf = spare if spare is not None else _ReceiveBuffer()
            if self._carry:
                self._rbuf.view[: self._carry] = view[pos:end]
        elif self._carry and pos:
            view[: self._carry] = view[pos:end]

    def _payload_received(self, nbytes: int) -> None:
        """``nbytes`` more of the payload of the WRITE received into its own buffer."""
        self._payload_have += nbytes
        self._proto.payload_consumed(nbytes)
        if self._payload_have < len(self._payload_buf):
            return
        req, payload = self._payload_req, self._payload_buf
        assert req is not None
        self._payload_req, self._payload_buf = None, memoryview(b"")
        if len(payload) >= LARGE_PAYLOAD:
            self._receive_size = SHORT_RECEIVE
        self._start(req, payload, True)
        self._pump()

    def eof_received(self) -> bool:
        if self._carry and not self.done.done():
            # The start of a request: the careful path tells what it makes of it (a request cut off).
            carried, self._carry = self._rbuf.view[: self._carry], 0
            self._receive(carried)
            self._pump()
        if not self.done.done():
            # A write cut off in its payload is never applied (the core reports the truncation), and
            # an error reply held back for the rest of a payload has nobody left to wait for.
            self._payload_req, self._payload_buf, self._held_error = None, memoryview(b""), None
            self._receive(b"")
            self._pump()
        # Keep a plain socket open for the replies still in flight (a half-closed client may read them).
        return self._transport is not None and self._transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop()
        self._stream_protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream_protocol.pause_writing()

    def resume_writing(self) -> None:
        self._stream_protocol.resume_writing()

    # ------------------------------------------------------------------ the fast path

    def _serve_fast(self, requests: list[FastRequest], view: memoryview, rbuf: _ReceiveBuffer) -> int:
        """Run ``requests`` (from :meth:`ServerProtocol.parse_fast`) and send their replies together.

        Returns how many were started: all of them unless the request slots or the client's reading of
        replies ran out.  Reads and writes are run here, straight on the node (those that wait go on
        in a task); other commands through the handler.
        """
        out = self._out
        if out.congested():
            return 0
        handler = self._handler
        node = handler.node()  # one step of the loop: the graph does not change in between
        structured = handler.replies.structured
        pieces: list[bytes | memoryview] = []
        batched = 0  # bytes in pieces
        started = 0
        for cookie, cmd, flags, offset, length, start in requests:
            if self.in_flight >= self._max_in_flight:
                break
            if batched > BATCH_BYTES:
                out.send_buffers(pieces, batched)
                pieces, batched = [], 0
                if out.congested():
                    break
            started += 1
            data: bytearray | None = None
            coro: Coroutine[Any, Any, None]
            if cmd == NBD_CMD_WRITE:
                coro = node.write(
                    offset, view[start : start + length], _FUA if flags & NBD_CMD_FLAG_FUA else NO_FLAGS
                )
            elif (
                cmd == NBD_CMD_READ
                and length
                and (length < SPARSE_READ_MIN or not structured or flags & NBD_CMD_FLAG_DF)
            ):
                data = bytearray(length)
                coro = node.read(offset, data)
            else:
                self._start(Request(cookie, cmd, flags, offset, length), None, False)
                continue
            try:
                waiting_on = coro.send(None)
            except StopIteration:
                if data is None:
                    pieces.append(_simple_reply(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
                    batched += _SIMPLE_SIZE
                elif structured:
                    pieces.append(
                        _read_chunk(
                            NBD_STRUCTURED_REPLY_MAGIC,
                            NBD_REPLY_FLAG_DONE,
                            NBD_REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + length,
                            offset,
                        )
                    )
                    pieces.append(memoryview(data))
                    batched += _READ_CHUNK_SIZE + length
                else:
                    pieces.append(_simple_reply(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
                    pieces.append(memoryview(data))
                    batched += _SIMPLE_SIZE + length
                continue
            except OSError as err:
                out.send(handler.error_reply(Request(cookie, cmd, flags, offset, length), err))
                continue
            except Exception:
                req = Request(cookie, cmd, flags, offset, length)
                self._log.exception("request %s failed unexpectedly", req)
                out.send(handler.replies.error(req, NBD_EIO))
                continue
            # It has to wait: a task carries it on, in a request slot.
            self.in_flight += 1
            if data is None:
                rbuf.users += 1
            req = Request(cookie, cmd, flags, offset, length, length if data is None else 0)
            task = self._loop.create_task(
                self._finish(coro, waiting_on, req, data, rbuf if data is None else None)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if pieces:
            out.send_buffers(pieces, batched)
        return started

    async def _finish(
        self,
        coro: Coroutine[Any, Any, None],
        waiting_on: Any,
        req: Request,
        data: bytearray | None,
        rbuf: _ReceiveBuffer | None,
    ) -> None:
        """Carry on a request of the fast path that had to wait, then reply (``rbuf``: the receive
        buffer its payload is a view of)."""
        replies = self._handler.replies
        try:
            try:
                await carry_on(coro, waiting_on)
            except OSError as err:
                reply = self._handler.error_reply(req, err)
            except Exception:
                self._log.exception("request %s failed unexpectedly", req)
                reply = replies.error(req, NBD_EIO)
                rbuf = None  # a pool thread may still be reading from it: never used again
            else:
                reply = replies.ok(req) if data is None else replies.read(req, data)
            if rbuf is not None:
                rbuf.users -= 1
                if not rbuf.users and rbuf is not self._rbuf:
                    self._spare = rbuf
            await self._send(reply)
        finally:
            self._release()

    # ------------------------------------------------------------------ the careful path

    def _receive(self, data: bytes | memoryview) -> None:
        self._receive_size = RECEIVE_SIZE
        self._proto.receive_data(data)
        if self._held_error is not None and not self._proto.discard_pending:
            reply, self._held_error = self._held_error, None
            self._out.send(reply)

    def _pump(self) -> None:
        """Start the requests the core has parsed, up to the in-flight limit."""
        if self._pumping:
            return  # a request finishing inside the loop below: the loop goes on by itself
        self._pumping = True
        self._out.hold(True)  # replies of requests received together leave in one write
        try:
            self._pump_events()
        finally:
            self._out.hold(False)
            self._pumping = False

    def _pump_events(self) -> None:
        while (
            not self.done.done()
            and self._payload_req is None
            and self._held_error is None
            and self._blocked is None
        ):
            event = self._proto.next_event()
            if isinstance(event, NeedData):
                return
            if isinstance(event, Request):
                self._take(event)
            elif isinstance(event, Disconnect | ConnectionClosed):
                self.stop()
            elif isinstance(event, ProtocolError):
                self._log.info("protocol error: %s", event)
                self.stop()
            else:
                raise AssertionError(f"unexpected event in transmission: {event!r}")

    def _take(self, req: Request) -> None:
        if req.error:
            reply = self._proto.replies.error(req, req.error, req.error_message)
            # Reply only once the failed write's payload is off the wire: a client still sending it
            # (libnbd) takes an earlier reply for an unknown cookie and hangs up.
            if self._proto.discard_pending:
                self._held_error = reply
            else:
                self._out.send(reply)
            return
        if not req.payload_length:
            self._start(req, None, False)
            return
        view = self._proto.take_buffered(req.payload_length)
        if len(view) == req.payload_length:
            self._start(req, view, False)
            return
        buf = self._payload_buffers.take(req.payload_length)
        buf[: len(view)] = view
        self._payload_req, self._payload_buf, self._payload_have = req, buf, len(view)

    def _start(self, req: Request, payload: memoryview | None, reusable: bool) -> None:
        """Serve ``req``; ``reusable``: ``payload`` came from our buffer cache and goes back to it."""
        if self.in_flight >= self._max_in_flight:
            # Parsed (with its payload) but not started: reading stops until a slot is free.
            self._blocked = (req, payload, reusable)
            self._pause_reading()
            return
        self.in_flight += 1
        task = start_eager(self._serve(req, payload, reusable))
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, req: Request, payload: memoryview | None, reusable: bool) -> None:
        try:
            try:
                reply = await self._handler.handle(req, payload)
            except Exception:
                self._log.exception("request %s failed unexpectedly", req)
                reply = self._handler.replies.error(req, NBD_EIO)
            else:
                # Only now is nothing using the payload.  A request cancelled or failed unexpectedly
                # skips this: a pool thread may still be writing from its buffer, which must not be
                # refilled under it.
                if reusable and payload is not None:
                    self._payload_buffers.give(payload)
            await self._send(reply)
        finally:
            self._release()

    async def _send(self, reply: Message) -> None:
        """Send ``reply``, then wait while the client does not read its replies (flow control)."""
        self._out.send(reply)
        if self._out.congested():
            with contextlib.suppress(ConnectionError, OSError):
                await self._out.drain()

    def _release(self) -> None:
        self.in_flight -= 1
        if self.done.done() or self.in_flight >= self._max_in_flight:
            return
        if self._blocked is not None:
            blocked, self._blocked = self._blocked, None
            self._start(*blocked)
        if not self._reading and self._transport is not None and not self._transport.is_closing():
            self._reading = True
            self._transport.resume_reading()
        self._pump()

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()
            self._reading = False
