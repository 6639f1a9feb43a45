"""Zero-copy reply writing on a plain socket: ``writev`` from the reply's own buffers.

asyncio's transport (Python 3.11) joins a ``writelines`` into one new buffer and copies whatever the
socket does not take at once into its own buffer -- two copies of every byte of every read reply.  A
:class:`VectorWriter` keeps the unsent pieces as they are (views of the read buffers) and sends them with
``writev`` when the socket is writable again::

    send([header, data])  ->  writev now  ->  all sent: done
                                         \\-> rest queued as views -> loop.add_writer -> writev ... -> empty

It takes over writing on the socket from the transport; the transport keeps reading and closing it.  The
writer uses its own duplicate of the socket's descriptor (asyncio refuses to watch a descriptor a
transport owns) and closes it in :meth:`abort`.  Only for plain sockets: a TLS connection writes through
its transport.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque

#: ``writev`` takes at most this many pieces (IOV_MAX on Linux).
IOV_MAX = 1024
#: ``drain()`` waits while more than this is queued (asyncio transports default to the same).
HIGH_WATER = 64 * 1024


class VectorWriter:
    """Writes messages (lists of buffers) to a non-blocking socket descriptor, in order.

    ``_queue`` holds the pieces not yet sent; ``_queued`` their total size.  Event-loop thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = os.dup(fd)
        self._closed = False
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        self.error: OSError | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def send(self, message: list[bytes | memoryview]) -> None:
        """Send ``message`` after everything queued; never blocks, never copies the data."""
        if self.error is not None:
            return
        if not self._queue:
            sent = self._writev(message)
            if sent is None:
                return
            message = _skip(message, sent)
        for piece in message:
            view = memoryview(piece).cast("B")
            if len(view):
                self._queue.append(view)
                self._queued += len(view)
        if self._queue and not self._writing:
            self._writing = True
            self._drained.clear()
            self._loop.add_writer(self._fd, self._on_writable)

    def _writev(self, pieces: list[bytes | memoryview] | list[memoryview]) -> int | None:
        """Bytes sent (0 if the socket is full), or None after a fatal error (recorded in ``error``)."""
        try:
            return os.writev(self._fd, pieces[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as err:
            self._fail(err)
            return None

    def _on_writable(self) -> None:
        while self._queue:
            pieces = [self._queue[i] for i in range(min(len(self._queue), IOV_MAX))]
            sent = self._writev(pieces)
            if sent is None:
                return
            if not sent:
                return  # still full; wait for the next writable event
            self._queued -= sent
            while sent:
                head = self._queue[0]
                if sent >= len(head):
                    sent -= len(head)
                    self._queue.popleft()
                else:
                    self._queue[0] = head[sent:]
                    sent = 0
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._drained.set()

    def _fail(self, err: OSError) -> None:
        self.error = err
        self._queue.clear()
        self._queued = 0
        self._stop_writing()

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued (flow control), or until all is sent."""
        if self._queued > HIGH_WATER:
            await self._drained.wait()

    async def flush(self) -> None:
        """Wait until everything queued is sent (or the connection failed)."""
        await self._drained.wait()

    def abort(self) -> None:
        """Drop what is queued and close the duplicate descriptor (the connection is being torn down)."""
        self._fail(OSError(errno.ECONNABORTED, "connection aborted"))
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _skip(message: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """``message`` without its first ``n`` bytes."""
    out: list[bytes | memoryview] = []
    for piece in message:
        size = len(piece)
        if n >= size:
            n -= size
            continue
        out.append(memoryview(piece)[n:] if n else piece)
        n = 0
    return out
