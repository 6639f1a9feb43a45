"""One NBD client connection: the asyncio shell around :class:`~cowbackup.nbd.client.ClientProtocol`.

::

    connect(address) -> socket -> [NBD_OPT_STARTTLS -> TLS handshake] -> go(export) -> ExportReady
        -> transmission: callers send requests (at most ``max_in_flight`` at once, each split at the
           server's maximum block size); one reader task parses the replies and routes them by cookie
           to the waiting callers; READ data is copied from the socket into the caller's buffer
        -> close(): wait for the requests in flight, send NBD_CMD_DISC, close the socket
        -> EOF, socket error or protocol error: every request in flight fails with ConnectionLost,
           and so does every later one

This module holds the connection object - its state, what the export allows, the request path and
closing.  Connecting and the handshake are in :mod:`cowbackup.nbd._client_connect`; the requests in flight
and the reader's loop that routes replies to them (``route_replies()``) in
:mod:`cowbackup.nbd._client_inflight`.

Replies are routed through ``_pending`` (cookie -> :class:`~cowbackup.nbd._client_inflight.Pending`), a
dict of futures (STYLE #15)::

    caller:  slot -> send lock -> request_bytes + register + write -> drain -> await future
    reader:  next_event() -> chunk for cookie C -> _pending[C] (data into its buffer, error, extents)
                                                -> last chunk: pop C, release the slot, resolve the future
    broken:  pop everything, fail every future -> callers wake with ConnectionLost

Errors, by what the caller can do next (the root is :class:`~cowbackup.nbd.errors.NBDError`)::

    NBDError
     +-- ConnectError       connecting or negotiating failed; nothing stays open.  Fix the address,
     |                      the export name or the TLS setup and connect again.
     +-- ConnectionLost     (an OSError, EIO) the connection broke: this request and every later one
     |                      fail.  Connect again.
     +-- RequestError       (an OSError, errno from the server's NBD error) the server failed this one
     |                      request, with its message; the connection goes on.
     +-- StateError         a request after close(): a bug in the caller.

A request the negotiation does not allow (unaligned to the minimum block size, an unadvertised flag)
fails with ``OSError(EINVAL)`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

from cowbackup.nbd._client_connect import ConnectError, close_socket, negotiate
from cowbackup.nbd._client_inflight import Extents, Pending, SlotGuard, route_replies
from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.constants import (
    BASE_ALLOCATION,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    cmd_name,
)
from cowbackup.nbd.errors import NBDError, StateError
from cowbackup.nbd.events import ExportReady
from cowbackup.nbd.uri import NBDAddress

__all__ = ["ClientRunstate", "ConnectError", "ConnectionLost", "Extents", "NBDClient"]

log = logging.getLogger(__name__)

#: Requests of one connection in flight at once (QEMU's NBD client allows 16 too).
MAX_IN_FLIGHT = 16
#: Longest READ or WRITE sent, whatever the server allows (QEMU's NBD_MAX_BUFFER_SIZE).
MAX_REQUEST = 32 * 1024 * 1024
#: Longest TRIM, fast WRITE_ZEROES or BLOCK_STATUS range sent (QEMU uses INT_MAX, aligned down).
MAX_EFFECT = 1 << 31
#: Default deadline of connect + handshake, in seconds.
DEFAULT_CONNECT_TIMEOUT = 30.0


class ConnectionLost(NBDError, ConnectionError):
    """The connection to ``address`` broke (``reason``); every request in flight and after fails.

    An ``OSError`` with errno EIO, as QEMU's NBD client reports a lost server.
    """

    def __init__(self, address: str, reason: str) -> None:
        ConnectionError.__init__(self, errno.EIO, f"NBD connection to '{address}' lost: {reason}")
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)


class ClientRunstate(enum.Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    #: the connection broke; requests fail with ConnectionLost until close()
    LOST = "lost"
    CLOSING = "closing"
    CLOSED = "closed"


class NBDClient:
    """A connected NBD client for one export.  Create it with :meth:`connect`; end it with :meth:`close`.

    All fields are touched only from the event loop.  ``_pending`` and the slots are owned by the request
    path and the reader task together (see the module docstring); ``_send_lock`` keeps each request's
    header and payload together on the wire and lets only one payload at a time wait in the transport.
    """

    def __init__(
        self,
        address: NBDAddress,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proto: ClientProtocol,
        *,
        max_in_flight: int,
        logger: logging.Logger,
    ) -> None:
        self.address = address
        #: The address as an NBD URI, for messages and ``describe()``.
        self.name = address.to_uri()
        self._reader = reader
        self._writer = writer
        self._proto = proto
        self._log = logger
        self._state = ClientRunstate.CONNECTING
        self._pending: dict[int, Pending] = {}
        self._cookies = itertools.count(1)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._send_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = asyncio.Event()
        self._lost_reason = ""
        self._reader_task: asyncio.Task[None] | None = None
        self._export: ExportReady | None = None
        self._alloc_id: int | None = None

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(
        cls,
        address: NBDAddress,
        *,
        tls_hostname: str | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        extra_contexts: tuple[str, ...] = (),
    ) -> NBDClient:
        """Connect to ``address``, negotiate its export (structured replies, ``base:allocation`` and any
        ``extra_contexts``, read with :meth:`context_status`).

        TLS is used when ``address.tls`` is set or ``address.tls_certificates`` names a credentials
        directory (laid out as :mod:`cowbackup.nbd.tls` describes).  Unless ``address.tls_verify_peer`` is
        off, the server's certificate is checked against the CA, and its name against ``tls_hostname``
        or, for TCP, the host (as QEMU does).
        Raises :class:`ConnectError` (unreachable, export unknown, TLS required or refused, handshake
        failure, ``connect_timeout`` seconds passed); nothing stays open then.
        """
        conn = await negotiate(
            address,
            tls_hostname=tls_hostname,
            connect_timeout=connect_timeout,
            parent_log=log,
            meta_contexts=(BASE_ALLOCATION, *extra_contexts),
        )
        try:
            client = cls(
                address, conn.reader, conn.writer, conn.proto, max_in_flight=max_in_flight, logger=conn.log
            )
        except BaseException:  # e.g. a bad max_in_flight: the socket must not stay open either
            await close_socket(conn.writer)
            raise
        client._start(conn.export)
        return client

    def _start(self, export: ExportReady) -> None:
        self._export = export
        self._alloc_id = export.meta_contexts.get(BASE_ALLOCATION)
        self._state = ClientRunstate.RUNNING
        self._reader_task = asyncio.create_task(self._read_replies(), name=f"nbd-client {self.name}")
        ready = self.export
        self._log.info(
            "connected to %s: %d bytes, flags %#x, block sizes %d/%d/%d, base:allocation %s",
            self.name,
            ready.size,
            ready.transmission_flags,
            ready.min_block_size,
            ready.preferred_block_size,
            ready.max_block_size,
            "yes" if self._alloc_id is not None else "no",
        )

    # ------------------------------------------------------------------ what the export allows

    @property
    def state(self) -> ClientRunstate:
        return self._state

    @property
    def export(self) -> ExportReady:
        """What the handshake told about the export."""
        if self._export is None:
            raise StateError("the handshake is not finished")
        return self._export

    @property
    def size(self) -> int:
        return self.export.size

    def _has(self, flag: int) -> bool:
        return bool(self.export.transmission_flags & flag)

    @property
    def read_only(self) -> bool:
        return self._has(NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._has(NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._has(NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._has(NBD_FLAG_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._has(NBD_FLAG_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._has(NBD_FLAG_SEND_FAST_ZERO)

    @property
    def can_block_status(self) -> bool:
        """The server selected the ``base:allocation`` metadata context."""
        return self._alloc_id is not None

    @property
    def min_block_size(self) -> int:
        return max(self.export.min_block_size, 1)

    @property
    def max_request(self) -> int:
        """Longest READ or WRITE sent: the server's maximum block size, at most :data:`MAX_REQUEST`."""
        return _align_down(min(self.export.max_block_size, MAX_REQUEST), self.min_block_size)

    @property
    def max_effect(self) -> int:
        """Longest TRIM, fast WRITE_ZEROES or BLOCK_STATUS range sent."""
        return _align_down(MAX_EFFECT, self.min_block_size)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    # ------------------------------------------------------------------ requests

    async def read(self, offset: int, buf: bytearray | memoryview) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``.

        Longer requests are split at :attr:`max_request` and sent together.  ``offset`` and the length
        must be multiples of :attr:`min_block_size`.  Raises ``OSError``: the server's error
        (:class:`~cowbackup.nbd.errors.RequestError`), :class:`ConnectionLost`, or EINVAL.
        """
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise ValueError("read() needs a writable buffer")
        step = self.max_request
        await self._all(
            [
                self._request(NBD_CMD_READ, 0, offset + pos, len(piece), buf=piece)
                for pos in range(0, len(view), step)
                for piece in (view[pos : pos + step],)
            ]
        )

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (split at :attr:`max_request`); ``fua`` needs :attr:`can_fua`."""
        view = memoryview(data).cast("B")
        step = self.max_request
        flags = NBD_CMD_FLAG_FUA if fua else 0
        await self._all(
            [
                self._request(NBD_CMD_WRITE, flags, offset + pos, len(piece), payload=piece)
                for pos in range(0, len(view), step)
                for piece in (view[pos : pos + step],)
            ]
        )

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, no_hole: bool = False, fast: bool = False
    ) -> None:
        """NBD_CMD_WRITE_ZEROES (needs :attr:`can_zero`).

        ``no_hole``: the server must allocate (NBD_CMD_FLAG_NO_HOLE); ``fast``: fail with ENOTSUP unless
        zeroing is faster than writing (NBD_CMD_FLAG_FAST_ZERO, needs :attr:`can_fast_zero`).
        """
        flags = (NBD_CMD_FLAG_FUA if fua else 0) | (NBD_CMD_FLAG_NO_HOLE if no_hole else 0)
        # The maximum block size does not bound a fast zero (spec, "Block size constraints").
        step = self.max_effect if fast else self.max_request
        if fast:
            flags |= NBD_CMD_FLAG_FAST_ZERO
        await self._all(
            [
                self._request(NBD_CMD_WRITE_ZEROES, flags, offset + pos, min(step, length - pos))
                for pos in range(0, length, step)
            ]
        )

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """NBD_CMD_TRIM (needs :attr:`can_trim`)."""
        step = self.max_effect
        flags = NBD_CMD_FLAG_FUA if fua else 0
        await self._all(
            [
                self._request(NBD_CMD_TRIM, flags, offset + pos, min(step, length - pos))
                for pos in range(0, length, step)
            ]
        )

    async def flush(self) -> None:
        """NBD_CMD_FLUSH (needs :attr:`can_flush`)."""
        await self._request(NBD_CMD_FLUSH, 0, 0, 0)

    async def block_status(self, offset: int, length: int) -> Extents:
        """The ``base:allocation`` extents from ``offset`` (needs :attr:`can_block_status`).

        One NBD_CMD_BLOCK_STATUS for at most :attr:`max_effect` bytes; the answer may cover less than
        asked (never nothing) and its last extent may reach further.
        """
        if self._alloc_id is None:
            raise OSError(errno.ENOTSUP, f"{self.name}: the server has no base:allocation context")
        return await self._request(
            NBD_CMD_BLOCK_STATUS, 0, offset, min(length, self.max_effect), context_id=self._alloc_id
        )

    async def context_status(self, context: str, offset: int, length: int) -> Extents:
        """The extents of metadata context ``context`` from ``offset`` (one of those :meth:`connect` was
        asked to negotiate, e.g. ``qemu:dirty-bitmap:NAME``; flag 1 means dirty there).  ENOTSUP if the
        server did not select it.  Same shape as :meth:`block_status`."""
        context_id = self.export.meta_contexts.get(context)
        if context_id is None:
            raise OSError(errno.ENOTSUP, f"{self.name}: the server has no {context} context")
        return await self._request(
            NBD_CMD_BLOCK_STATUS, 0, offset, min(length, self.max_effect), context_id=context_id
        )

    @staticmethod
    async def _all(coros: list[Coroutine[Any, Any, Extents]]) -> None:
        """Run the requests of one call together; wait for all; raise the first error.

        Waiting for all (rather than returning at the first error) keeps the caller's buffer untouched
        once we return, and no error goes unretrieved.
        """
        if len(coros) == 1:
            await coros[0]
            return
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _request(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        *,
        buf: memoryview | None = None,
        payload: memoryview | None = None,
        context_id: int | None = None,
    ) -> Extents:
        """Send one request and wait for its reply (see the module docstring for the routing)."""
        self._check_running()
        async with self._slots_held() as release, self._send_lock:
            self._check_running()
            cookie = next(self._cookies)
            try:
                header = self._proto.request_bytes(cmd, flags, offset, length, cookie)
            except ValueError as err:
                raise OSError(errno.EINVAL, f"{self.name}: {cmd_name(cmd)} refused: {err}") from err
            pending = Pending(cmd, offset, length, buf, context_id)
            self._pending[cookie] = pending
            self._idle.clear()
            release.disarm()  # the reader (or the failure path) releases the slot from now on
            self._writer.write(header)
            if payload is not None:
                self._writer.write(payload)
            try:
                await self._writer.drain()
            except asyncio.CancelledError:
                pending.buf = None
                raise
            except Exception as err:  # any failure to send breaks the connection
                self._connection_lost(f"sending failed: {err or type(err).__name__}")
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.buf = None  # the reply still comes; its data is dropped, never written to buf
            raise

    def _slots_held(self) -> SlotGuard:
        return SlotGuard(self._slots)

    def _check_running(self) -> None:
        if self._state is ClientRunstate.RUNNING:
            return
        if self._state is ClientRunstate.LOST:
            raise ConnectionLost(self.name, self._lost_reason)
        raise StateError(f"NBD client for '{self.name}' is {self._state.value}")

    # ------------------------------------------------------------------ replies

    async def _read_replies(self) -> None:
        """The reader task: parse replies and route them until the connection ends."""
        reason = "the reader stopped"
        try:
            reason = await route_replies(self._proto, self._reader, self._pending, self._complete)
        except asyncio.CancelledError:
            reason = "the connection was closed"
            raise
        except (OSError, EOFError) as err:
            reason = f"receiving failed: {err or type(err).__name__}"
        except Exception as err:
            self._log.exception("reply routing failed")
            reason = f"internal error: {type(err).__name__}: {err}"
        finally:
            self._connection_lost(reason)

    def _complete(self, cookie: int) -> None:
        pending = self._pending.pop(cookie)
        self._slots.release()
        if not self._pending:
            self._idle.set()
        if pending.future.done():  # the caller was cancelled
            return
        if pending.error is not None:
            self._log.debug(
                "%s at %d+%d failed: %s",
                cmd_name(pending.type),
                pending.offset,
                pending.length,
                pending.error,
            )
            pending.future.set_exception(pending.error)
        else:
            pending.future.set_result(pending.extents)

    def _connection_lost(self, reason: str) -> None:
        """Fail every request in flight; later requests fail at once.  Safe to call more than once."""
        if self._state is ClientRunstate.RUNNING:
            self._state = ClientRunstate.LOST
            self._lost_reason = reason
            self._log.warning("connection to %s lost: %s", self.name, reason)
        elif not self._lost_reason:
            self._lost_reason = reason
        failed = list(self._pending.values())
        self._pending.clear()
        for pending in failed:
            self._slots.release()
            if not pending.future.done():
                pending.future.set_exception(ConnectionLost(self.name, self._lost_reason))
        self._idle.set()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()  # nothing is left to route replies to
        if not self._writer.is_closing():
            self._writer.close()

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Wait for the requests in flight, send NBD_CMD_DISC and close the socket.

        New requests are refused from the call on.  Safe to call twice and after the connection broke.
        """
        if self._state is ClientRunstate.CLOSED:
            return
        if self._state is ClientRunstate.CLOSING:
            await self._closed.wait()
            return
        running = self._state is ClientRunstate.RUNNING
        self._state = ClientRunstate.CLOSING
        try:
            if running:
                await self._idle.wait()
                if not self._lost_reason:
                    await self._disconnect()
        finally:
            await self._shutdown()
            self._state = ClientRunstate.CLOSED
            self._closed.set()

    async def _disconnect(self) -> None:
        """Send NBD_CMD_DISC (best effort: the server may be gone already)."""
        with contextlib.suppress(NBDError, OSError, ValueError):
            async with self._send_lock:
                self._writer.write(self._proto.request_bytes(NBD_CMD_DISC, 0, 0, 0, next(self._cookies)))
                await self._writer.drain()

    async def _shutdown(self) -> None:
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await close_socket(self._writer, graceful=True)


def _align_down(n: int, align: int) -> int:
    return max(n - n % align, align)
