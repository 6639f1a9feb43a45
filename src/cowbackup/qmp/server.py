"""The QMP server: asyncio shells around :mod:`cowbackup.qmp.protocol`, one session per connection.

::

    QMPServer            listeners (unix sockets), the sessions, the shutdown request (``quit``)
     +-- QMPSession      one monitor connection:
           reader task   bytes -> QMPStreamParser -> requests, dispatched one at a time, in order
           writer task   one queue of encoded replies and events -> socket, so they leave in order

A session is in capability-negotiation mode until ``qmp_capabilities`` succeeds; only then does it see
events (QEMU sends none before). Commands from all sessions run on the one event loop; a session
waits for its command's reply before reading its next request, as QEMU's monitor does.

A client that disconnects, stalls or sends garbage affects only its own session: parse errors are
answered and the session goes on; a disconnect ends the session, while a command it started keeps
running to completion (QEMU does not cancel commands either) and its reply is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

import cowbackup
from cowbackup.daemon import Daemon
from cowbackup.jobs.events import Event
from cowbackup.qmp.commands import COMMANDS, QMPContext, QMPError, load_all, to_qmp_error
from cowbackup.qmp.protocol import (
    ErrorReply,
    Message,
    ParseError,
    QMPStreamParser,
    Request,
    check_request,
    encode,
    error_reply,
    return_reply,
)

__all__ = ["QEMU_VERSION", "QMPServer", "QMPSession", "version_info"]

log = logging.getLogger(__name__)

# The QEMU release whose QMP behaviour we reproduce (greeting and query-version).
QEMU_VERSION = (7, 2, 0)
_READ_SIZE = 64 * 1024


def version_info() -> dict[str, Any]:
    """``VersionInfo`` as in the greeting and ``query-version``."""
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"cowbackup {cowbackup.__version__}",
    }


class QMPSession:
    """One monitor connection. Created and run by :class:`QMPServer`.

    Attributes a command may use: ``negotiated``, ``oob_enabled`` (set by ``qmp_capabilities``), and
    :meth:`after_reply` to run something once the current reply has been queued (``quit``).
    All state is owned by the event loop.
    """

    _next_id = 0

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        QMPSession._next_id += 1
        self.log = logging.getLogger(f"{__name__}.session{QMPSession._next_id}")
        self.server = server
        self.negotiated = False
        self.oob_enabled = False
        self._reader = reader
        self._writer = writer
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._after_reply: list[Callable[[], None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._ctx = QMPContext(server.daemon, self, server)

    # ------------------------------------------------------------------ called by commands

    def negotiate(self, oob: bool) -> None:
        """End capability negotiation: from now on, run every command and receive events."""
        self.negotiated = True
        self.oob_enabled = oob
        self._unsubscribe = self.server.daemon.jobs.events.subscribe(self._on_event)

    def after_reply(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` right after the reply to the current command is queued."""
        self._after_reply.append(callback)

    # ------------------------------------------------------------------ output

    def _send(self, message: dict[str, Any]) -> None:
        self.log.debug("<- %s", message)
        self._out.put_nowait(encode(message))

    def _on_event(self, event: Event) -> None:
        # Runs inside the emitter's call (EventBus contract): only queue.
        now = time.time()
        seconds = int(now)
        self._send(
            {
                "event": event.name,
                "data": event.data,
                "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
            }
        )

    async def _write_loop(self) -> None:
        while (data := await self._out.get()) is not None:
            self._writer.write(data)
            await self._writer.drain()

    # ------------------------------------------------------------------ input

    async def run(self) -> None:
        """Greet, then serve requests until the client leaves or the server closes."""
        writer_task = asyncio.create_task(self._write_loop(), name="qmp-writer")
        try:
            self._send({"QMP": {"version": version_info(), "capabilities": ["oob"]}})
            parser = QMPStreamParser()
            while data := await self._reader.read(_READ_SIZE):
                for item in parser.feed(data):
                    await self._handle(item)
                if writer_task.done():
                    break  # the client stopped reading and the connection broke
        except (ConnectionError, OSError) as err:
            self.log.debug("connection lost: %s", err)
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._out.put_nowait(None)
            with contextlib.suppress(ConnectionError, OSError):
                await writer_task
            if not writer_task.done():
                writer_task.cancel()
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def _handle(self, item: Message | ParseError) -> None:
        if isinstance(item, ParseError):
            self._send(error_reply(item.desc))
            return
        self.log.debug("-> %s", item.value)
        request = check_request(item.value, oob_enabled=self.oob_enabled)
        if isinstance(request, ErrorReply):
            self._send(error_reply(request.desc, rid=request.id, has_id=request.has_id))
            return
        reply = await self._dispatch(request)
        self._send(reply)
        callbacks, self._after_reply = self._after_reply, []
        for callback in callbacks:
            callback()

    async def _dispatch(self, request: Request) -> dict[str, Any]:
        rid, has_id = request.id, request.has_id
        spec = COMMANDS.get(request.execute)
        try:
            if spec is None:
                raise QMPError(f"The command {request.execute} has not been found", "CommandNotFound")
            if request.oob and not spec.allow_oob:
                raise QMPError(f"The command {request.execute} does not support OOB")
            if not self.negotiated and not spec.allow_before_caps:
                raise QMPError("", "CommandNotFound")  # the message is replaced below
            ret = await spec.handler(self._ctx, dict(request.arguments))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # every failure becomes an error reply
            qerr = to_qmp_error(err)
            if qerr is None:
                self.log.exception("command %s failed", request.execute)
                qerr = QMPError(str(err) or type(err).__name__)
            if not self.negotiated and qerr.error_class == "CommandNotFound":
                # monitor_qmp_dispatch(): "Provide a more useful error message".
                qerr = QMPError(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
            return error_reply(qerr.desc, qerr.error_class, rid, has_id)
        return return_reply({} if ret is None else ret, rid, has_id)

    def close(self) -> None:
        """End the session as if the client had hung up; what is queued is still sent."""
        self._reader.feed_eof()


class QMPServer:
    """Serves QMP for one :class:`Daemon` on any number of listening sockets.

    Usage::

        server = QMPServer(daemon, on_quit=stop_event.set)  # on_quit: optional
        await server.listen_unix("/run/qmp.sock")      # or await server.listen_socket(sock)
        await server.wait_shutdown()                   # until a client sends "quit"
        await server.close()
    """

    def __init__(self, daemon: Daemon, *, on_quit: Callable[[], None] | None = None) -> None:
        load_all()
        self._on_quit = on_quit
        self.daemon = daemon
        self.sessions: set[QMPSession] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutdown = asyncio.Event()
        self._paths: list[str] = []

    async def listen_unix(self, path: str) -> None:
        """Listen on a new unix socket at ``path`` (mode 0600; an existing socket file is replaced)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode (minus umask): no window in
            # which another user could connect.
            os.fchmod(sock.fileno(), 0o600)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run, as QEMU does
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._paths.append(path)
        await self.listen_socket(sock)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Accept connections on an already listening stream socket (e.g. passed by a supervisor)."""
        server = await asyncio.start_unix_server(self._accept, sock=sock)
        self._servers.append(server)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QMPSession(self, reader, writer)
        self.sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)

    # ------------------------------------------------------------------ shutdown

    def request_shutdown(self) -> None:
        """Ask the daemon's owner to shut down (``quit``): call ``on_quit``; :meth:`wait_shutdown` returns."""
        if self._shutdown.is_set():
            return
        self._shutdown.set()
        if self._on_quit is not None:
            self._on_quit()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    async def close(self) -> None:
        """Stop listening, end every session, remove the socket files. Safe to call twice."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for session in list(self.sessions):
            session.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for server in servers:
            await server.wait_closed()
        paths, self._paths = self._paths, []
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
