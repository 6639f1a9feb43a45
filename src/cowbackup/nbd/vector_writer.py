"""Zero-copy reply writing on a plain socket: ``writev`` from the reply's own buffers.

asyncio's transport (Python 3.11) joins a ``writelines`` into one new buffer and copies whatever the
socket does not take at once into its own buffer -- two copies of every byte of every read reply.  A
:class:`VectorWriter` keeps the unsent pieces as they are (views of the read buffers) and sends them with
``writev`` when the socket is writable again::

    send([header, data])  ->  writev now  ->  all sent: done
                                         \\-> rest queued as views -> loop.add_writer -> writev ... -> empty

Data still in a file (:class:`~cowbackup.nbd.replies.FileSegment`) goes out with ``sendfile``.

It takes over writing on the socket from the transport; the transport keeps reading and closing it.  The
writer uses its own duplicate of the socket's descriptor (asyncio refuses to watch a descriptor a
transport owns) and closes it in :meth:`abort`.  Only for plain sockets: a TLS connection writes through
its transport.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections import deque

from cowbackup.nbd.replies import FileSegment, Message

#: A piece of a reply as queued: ``bytes`` as they came, anything else as a byte-format memoryview.
Buffer = bytes | memoryview

#: ``writev`` takes at most this many pieces (IOV_MAX on Linux).
IOV_MAX = 1024
#: ``drain()`` waits while more than this is queued (asyncio transports default to the same).
HIGH_WATER = 64 * 1024
#: While held (the replies of requests received together, sent in one go when let go), a sender is
#: congested only past this: sixteen 4 KiB read replies are just over HIGH_WATER, and the last one
#: would otherwise become a task waiting for a drain that the release of the hold does at once anyway.
#: Still a bound: a client sending many read requests at once gets no more than this queued before
#: its requests wait.
HELD_HIGH_WATER = 1024 * 1024


class VectorWriter:
    """Writes messages (lists of buffers and file ranges) to a non-blocking socket, in order.

    ``_queue`` holds what is not sent yet: views of buffers, and :class:`FileSegment`\\ s sent with
    ``sendfile`` (page cache to socket, no copy through our memory).  ``_queued`` is its total size.
    Event-loop thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = os.dup(fd)
        self._closed = False
        self._queue: deque[Buffer | FileSegment] = deque()
        self._queued = 0
        self._segments = 0  # FileSegments in the queue: while none, the whole queue is one writev
        self._writing = False
        self._scheduled = False
        self._held = False
        # Waiters of drain()/flush(), woken when the queue empties; made only when someone waits.
        self._drained: asyncio.Event | None = None
        self.error: OSError | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def send(self, message: Message) -> None:
        """Send ``message`` after everything queued; never blocks, never copies the data.

        A reply that finds the queue idle is written at once (latency); one that comes while another is
        pending waits for the end of this turn of the event loop, so replies completing together leave
        in one ``writev`` (throughput).
        """
        if self.error is not None:
            return
        queue = self._queue
        idle = not queue and not self._writing and not self._scheduled
        for piece in message:
            if type(piece) is bytes:
                item: Buffer | FileSegment = piece
            elif isinstance(piece, FileSegment):
                item = piece
                self._segments += 1
            else:
                item = memoryview(piece).cast("B")  # len() must count bytes
            if len(item):
                queue.append(item)
                self._queued += len(item)
            elif isinstance(item, FileSegment):
                self._segments -= 1
        if not queue:
            return
        if self._drained is not None:
            self._drained.clear()
        if self._held or self._writing or self._scheduled:
            return  # goes out with what is pending
        if idle:
            self._send_now()
        else:
            self._scheduled = True
            self._loop.call_soon(self._send_now)

    def send_buffers(self, pieces: list[bytes | memoryview], nbytes: int) -> None:
        """:meth:`send` for whole replies made only of ``bytes`` and byte-format memoryviews, ``nbytes``
        in all (the transmission fast path's batch): when nothing is pending they go straight to
        ``writev``, and only what the socket does not take is queued."""
        if self._queue or self._writing or self._scheduled or self._held or self.error is not None:
            self.send(pieces)  # type: ignore[arg-type]
            return
        if len(pieces) > IOV_MAX:
            self.send(pieces)  # type: ignore[arg-type]
            return
        try:
            sent = os.writev(self._fd, pieces)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._fail(err)
            return
        if sent == nbytes:
            return
        self._queue.extend(pieces)
        self._queued = nbytes
        self._consume(sent)
        if self._drained is not None:
            self._drained.clear()
        self._writing = True
        self._loop.add_writer(self._fd, self._flush)

    def hold(self, held: bool) -> None:
        """While held, :meth:`send` only queues; letting go sends the batch, in one ``writev`` if it fits.

        The connection holds while it starts the requests received together, so their replies leave
        together.
        """
        self._held = held
        if not held and self._queue and not self._writing and not self._scheduled and self.error is None:
            self._send_now()

    def _send_now(self) -> None:
        self._scheduled = False
        if self.error is not None or self._writing:
            return
        self._flush()
        if self._queue and self.error is None:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        """Send from the head of the queue until it is empty or the socket is full."""
        queue = self._queue
        while queue:
            try:
                if not self._segments and len(queue) <= IOV_MAX:
                    sent = os.writev(self._fd, queue)  # type: ignore[arg-type]
                    if sent == self._queued:  # the usual case: everything went
                        queue.clear()
                        self._queued = 0
                        break
                elif isinstance(head := queue[0], FileSegment):
                    sent = os.sendfile(self._fd, head.fd, head.offset, head.length)
                    if sent == 0:
                        raise OSError(errno.EIO, "sendfile: the file ended before the reply")
                else:
                    views = list(itertools.islice(queue, IOV_MAX))
                    cut = next((i for i, v in enumerate(views) if isinstance(v, FileSegment)), len(views))
                    sent = os.writev(self._fd, views[:cut])  # type: ignore[arg-type]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._fail(err)
                return
            self._consume(sent)
        self._stop_writing()

    def _consume(self, sent: int) -> None:
        self._queued -= sent
        queue = self._queue
        while sent:
            head = queue[0]
            if sent >= len(head):
                sent -= len(head)
                queue.popleft()
                if isinstance(head, FileSegment):
                    self._segments -= 1
            elif isinstance(head, FileSegment):
                queue[0] = FileSegment(head.fd, head.offset + sent, head.length - sent)
                sent = 0
            else:
                queue[0] = memoryview(head)[sent:]
                sent = 0

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._drained is not None:
            self._drained.set()

    def _fail(self, err: OSError) -> None:
        self.error = err
        self._queue.clear()
        self._queued = 0
        self._segments = 0
        self._stop_writing()

    def congested(self) -> bool:
        """More than HIGH_WATER bytes are queued (HELD_HIGH_WATER while held): the sender should
        :meth:`drain`."""
        return self._queued > (HELD_HIGH_WATER if self._held else HIGH_WATER)

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued (flow control), or until all is sent."""
        if self._queued > HIGH_WATER:
            await self._wait_drained()

    async def flush(self) -> None:
        """Wait until everything queued is sent (or the connection failed)."""
        if self._queue:
            await self._wait_drained()

    async def _wait_drained(self) -> None:
        if self._drained is None:
            self._drained = asyncio.Event()
        if self._queue:
            self._drained.clear()
        await self._drained.wait()

    def abort(self) -> None:
        """Drop what is queued and close the duplicate descriptor (the connection is being torn down)."""
        self._fail(OSError(errno.ECONNABORTED, "connection aborted"))
        if not self._closed:
            self._closed = True
            os.close(self._fd)
