"""One NBD client connection: the asyncio shell around :class:`~cowbackup.nbd.server.ServerProtocol`.

::

    accept -> greeting -> option haggling (answered by the core; STARTTLS upgrades the stream)
           -> ExportSelected -> transmission: read requests in order, run up to MAX_IN_FLIGHT at once,
              write each reply as soon as it is ready (out of order, matched by cookie)
           -> NBD_CMD_DISC / EOF / protocol error / server shutdown: finish what is in flight, close

The handshake has a deadline (QEMU's 10 s); a client that stalls in it is dropped.  A client that goes
away mid-payload or mid-request hurts nobody else: its requests in flight still complete on the node (a
write that reached the node is never half-applied by us), their replies are dropped.  Each reply is
written with one ``writelines`` call, so replies never interleave on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from cowbackup.block.node import Root
from cowbackup.nbd.errors import ProtocolError
from cowbackup.nbd.events import (
    ConnectionClosed,
    Disconnect,
    ExportSelected,
    NeedData,
    SendData,
    StartTLS,
)
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.handlers import ContextStatus, RequestHandler
from cowbackup.nbd.replies import FileSegment, Message
from cowbackup.nbd.server import ServerProtocol, TLSMode
from cowbackup.nbd.transmission import Transmission
from cowbackup.nbd.vector_writer import VectorWriter

log = logging.getLogger(__name__)

#: Requests of one connection served at once (QEMU's NBD server allows 16).
MAX_IN_FLIGHT = 16
#: How much to read from the socket at a time during the handshake.
READ_SIZE = 64 * 1024
#: Once the connection ends (client gone, NBD_CMD_DISC, server shutdown), how long the replies to the
#: requests still in flight may take to reach a client that does not read them; then it is cut off, so
#: such a client holds neither a shutdown nor its connection slot forever.
FINISH_GRACE = 2.0
#: Send buffer of a Unix-socket connection.  The default (about 208 KiB) holds less than one 256 KiB
#: read reply, so every large reply waited for the client to drain the socket and the two sides took
#: turns instead of overlapping: nbdcopy read 1.6x faster with this.  The kernel caps it at
#: net.core.wmem_max.  TCP is left alone: setting a size there turns the kernel's autotuning off.
UNIX_SEND_BUFFER = 1024 * 1024


class ServedExport(Protocol):
    """What a connection uses of the export it serves: a :class:`~cowbackup.nbd.listener.Export`."""

    @property
    def name(self) -> str: ...
    @property
    def root(self) -> Root: ...
    @property
    def connections(self) -> set[ServerConnection]:
        """The export's connections: a connection adds itself when it starts serving the export and
        removes itself when it ends."""

    def context_status(self, name: str) -> ContextStatus: ...


class ConnectionHost(Protocol):
    """What a connection uses of the server that accepted it: a :class:`~cowbackup.nbd.listener.NBDServer`.

    The listener imports this module and passes itself in; this module never imports the listener.
    """

    @property
    def exports(self) -> Mapping[str, ServedExport]: ...
    @property
    def tls_mode(self) -> TLSMode: ...
    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    @property
    def handshake_timeout(self) -> float: ...
    def lookup_info(self, name: str) -> ExportInfo | None: ...
    def list_infos(self) -> Sequence[ExportInfo]: ...


class ServerConnection:
    """Serves one client.  Created by :class:`~cowbackup.nbd.listener.NBDServer` for each accepted socket.

    ``_requests`` runs the transmission phase (and knows the requests in flight) once the handshake is
    over.  Touched only from the event loop.
    """

    def __init__(
        self, server: ConnectionHost, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        # The socket's descriptor for writev, while it is plain (TLS goes through the transport).
        sock = writer.get_extra_info("socket")
        self._fd: int | None = sock.fileno() if sock is not None else None
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        self._vector: VectorWriter | None = None
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.log = log.getChild(peer.replace(".", "_"))
        self.export: ServedExport | None = None
        self.proto = ServerProtocol(
            lookup=server.lookup_info,
            list_exports=server.list_infos,
            tls=server.tls_mode,
            logger=self.log,
        )
        self._requests: Transmission | None = None
        self._closing = False
        self._finishing = False
        self._tls_failed = False

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        """Serve the client until it leaves or the server shuts down; never raises."""
        try:
            selected = await asyncio.wait_for(self._handshake(), self.server.handshake_timeout)
            if selected is not None:
                await self._transmission(selected)
        except TimeoutError:
            self.log.info("handshake not finished within %g s, dropping", self.server.handshake_timeout)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
            self.log.info("connection lost: %s", err)
        except asyncio.CancelledError:
            pass  # server shutdown: fall through to finish in-flight requests
        finally:
            self._finishing = True
            await self._finish()

    def stop(self) -> bool:
        """Server shutdown: take no more requests.  True if the task running :meth:`run` is to be
        cancelled (it may be waiting for the client); False once it is finishing, which it must be left
        to do (a cancel would drop the replies in flight and leave the socket open; it is bounded by
        FINISH_GRACE anyway).  The flag also ends transmission should the cancel be lost (3.11's
        ``wait_for`` drops a cancel that comes as the handshake completes)."""
        self._closing = True
        if self._requests is not None:
            self._requests.stop()
        return not self._finishing

    async def _finish(self) -> None:
        tasks = self._requests.tasks if self._requests is not None else set()
        if self._requests is not None:
            self._requests.stop()
        if tasks:
            _, stuck = await asyncio.wait(list(tasks), timeout=FINISH_GRACE)
            if stuck:
                self.log.info("client does not read its replies, dropping it")
                if self._vector is not None:
                    self._vector.abort()
                self.writer.transport.abort()  # wakes the drains; the requests themselves still finish
                await asyncio.wait(stuck)
        if self.export is not None:
            self.export.connections.discard(self)
        self._closing = True
        if self._vector is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._vector.flush(), FINISH_GRACE)
            self._vector.abort()  # stops watching the socket before the transport closes it
        try:
            await asyncio.wait_for(self.writer.drain(), FINISH_GRACE)
        except (OSError, RuntimeError, TimeoutError):
            self.writer.transport.abort()
        self.writer.close()
        if self._tls_failed:
            return  # the socket went to the TLS layer, so the stream's close waiter never fires
        try:
            await asyncio.wait_for(self.writer.wait_closed(), FINISH_GRACE)
        except TimeoutError:  # close() waits for the last bytes to go out: a client not reading
            self.writer.transport.abort()
        except (OSError, asyncio.CancelledError):
            pass

    async def _fill(self) -> None:
        """Read more bytes from the client into the core (``b""`` at EOF)."""
        self.proto.receive_data(await self.reader.read(READ_SIZE))

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> ExportSelected | None:
        self.writer.write(self.proto.initial_bytes())
        while True:
            event = self.proto.next_event()
            if isinstance(event, NeedData):
                await self._fill()
            elif isinstance(event, SendData):
                self.writer.write(event.data)
                # Flow control: a client that sends options without reading the replies stops being
                # read from, instead of piling up replies in memory until the handshake times out.
                await self.writer.drain()
            elif isinstance(event, StartTLS):
                await self.writer.drain()
                assert self.server.ssl_context is not None
                self._fd = None
                try:
                    await self.writer.start_tls(self.server.ssl_context)
                except BaseException:  # failed, or the handshake timeout cancelled it
                    self._tls_failed = True
                    raise
                self.proto.tls_started()
                self.log.debug("TLS established")
            elif isinstance(event, ExportSelected):
                await self.writer.drain()
                return event
            elif isinstance(event, Disconnect | ConnectionClosed):
                return None
            elif isinstance(event, ProtocolError):
                self.log.info("protocol error in handshake: %s", event)
                return None
            else:
                raise AssertionError(f"unexpected event in handshake: {event!r}")

    # ------------------------------------------------------------------ transmission

    async def _transmission(self, selected: ExportSelected) -> None:
        export = self.server.exports.get(selected.info.name)
        if export is None or self._closing:  # removed between lookup and now, or the server is stopping
            return
        self.export = export
        export.connections.add(self)
        contexts = {cid: export.context_status(name) for cid, name in selected.meta_contexts}
        self.log.info("serving export '%s'", export.name)
        if self._fd is not None:
            await self._flush_transport()  # the handshake's last bytes go first
            self._vector = VectorWriter(asyncio.get_running_loop(), self._fd)
        handler = RequestHandler(
            lambda: export.root.node, self.proto.replies, contexts, sendfile=self._vector is not None
        )
        # A stream's transport reads as well as writes (typeshed types it as the write half only).
        transport = cast(asyncio.Transport, self.writer.transport)
        self._requests = Transmission(
            self.proto,
            handler,
            self._vector if self._vector is not None else StreamOutput(self.writer),
            stream_protocol=transport.get_protocol(),
            max_in_flight=MAX_IN_FLIGHT,
            log=self.log,
        )
        # What the stream read ahead of the handshake's end belongs to the first requests.  asyncio has
        # no public call that takes it without waiting, hence the private buffer.
        ahead: bytearray = getattr(self.reader, "_buffer", bytearray())
        leftover = bytes(ahead)
        ahead.clear()
        self._requests.start(transport, leftover, eof=bool(getattr(self.reader, "_eof", False)))
        await self._requests.done

    async def _flush_transport(self) -> None:
        """Wait until the transport has sent everything written to it (``drain()`` alone only waits
        while it holds more than its high-water mark): the VectorWriter writes to the socket directly,
        so handshake replies left in the transport's buffer would go out after transmission replies."""
        transport = self.writer.transport
        if not transport.get_write_buffer_size():
            return
        transport.set_write_buffer_limits(high=0)  # paused until the buffer is empty
        try:
            await self.writer.drain()
        finally:
            transport.set_write_buffer_limits()

    @property
    def queued_bytes(self) -> int:
        """Bytes of replies written but not yet taken by the socket."""
        if self._vector is not None:
            return self._vector.queued
        return self.writer.transport.get_write_buffer_size()


class StreamOutput:
    """Replies through the stream's transport, where no :class:`VectorWriter` can be used (TLS)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def send(self, message: Message) -> None:
        if not self._writer.is_closing():
            # Without a VectorWriter the handler never produces file segments.
            assert not any(isinstance(p, FileSegment) for p in message)
            self._writer.writelines(message)  # type: ignore[arg-type]

    def send_buffers(self, pieces: list[bytes | memoryview], nbytes: int) -> None:
        self.send(pieces)  # type: ignore[arg-type]

    def hold(self, held: bool) -> None:
        """The transport batches by itself."""

    def congested(self) -> bool:
        # What makes the stream's drain() wait: the transport holds more than its high-water mark.
        transport = self._writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        await self._writer.drain()
