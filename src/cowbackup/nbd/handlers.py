"""Carrying out NBD requests on a block node: the glue between the protocol core and the block layer.

Each handler takes a parsed :class:`~cowbackup.nbd.events.Request` and returns the reply as a list of
buffers for ``writelines`` (built by the connection's :class:`~cowbackup.nbd.replies.ReplyBuilder`).
Errors from the block layer become NBD error replies with the errno mapped as the spec asks; the
connection goes on.

Reads are sparse when structured replies were agreed and the client did not set NBD_CMD_FLAG_DF: zero
extents (by block status) go out as NBD_REPLY_TYPE_OFFSET_HOLE and are never read.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

from cowbackup.block.copy_range import host_file
from cowbackup.block.node import NO_FLAGS, BlockNode, RequestFlags, Status
from cowbackup.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    errno_to_nbd,
)
from cowbackup.nbd.events import Request
from cowbackup.nbd.replies import FileSegment, Message, ReadData, ReadSegment, ReplyBuilder, split_read

log = logging.getLogger(__name__)

_FUA = RequestFlags.FUA


#: A metadata context's block status: (node, offset, length, only the first extent) -> [(length, flags)].
ContextStatus = Callable[[BlockNode, int, int, bool], Awaitable[list[tuple[int, int]]]]

#: At most this many extents per BLOCK_STATUS context reply (a badly fragmented disk must not make us
#: build a giant reply; the client asks again from where the reply ended).
MAX_EXTENTS = 64 * 1024
#: Holes shorter than this are sent as data: one chunk is cheaper than three.
MIN_HOLE = 4096
#: Reads at least this long are sent with sendfile when the shell allows it and the data is in a file.
SENDFILE_MIN = 64 * 1024
#: Reads shorter than this are sent as plain data without asking for block status: a hole reply saves
#: nothing worth a block-status query at this size.
SPARSE_READ_MIN = 64 * 1024

#: Block status -> base:allocation flags (a table: IntFlag arithmetic builds a member per operation).
_NBD_STATE = {
    Status(v): (0 if Status(v) & Status.DATA else NBD_STATE_HOLE)
    | (NBD_STATE_ZERO if Status(v) & Status.ZERO else 0)
    for v in range(8)
}
#: Block status values whose range reads as zeros.
_READS_ZERO = frozenset(flags for flags in _NBD_STATE if flags & Status.ZERO)


async def base_allocation(node: BlockNode, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """``base:allocation``: NBD_STATE_HOLE where nothing is stored, NBD_STATE_ZERO where reads give zeros
    -- in the whole backing chain, as QEMU reports it (a range an overlay leaves to its backing file is
    that file's data, not a hole)."""
    runs: list[tuple[int, int]] = []
    end = offset + length
    while offset < end and len(runs) < MAX_EXTENTS:
        ext = await node.status_above(offset, end - offset)
        flags = _NBD_STATE[ext.flags]
        if runs and runs[-1][1] == flags:
            runs[-1] = (runs[-1][0] + ext.length, flags)
        else:
            if one and runs:
                break
            runs.append((ext.length, flags))
        offset = ext.end
    return runs


class RequestHandler:
    """Runs requests of one connection against the export's node (resolved through its edge each time)."""

    def __init__(
        self,
        node: Callable[[], BlockNode],
        replies: ReplyBuilder,
        contexts: dict[int, ContextStatus],
        *,
        sendfile: bool = False,
    ) -> None:
        #: The export's node, resolved through its edge (call it for every request, or every batch of
        #: requests received together: the graph does not change in between).
        self.node = node
        self.replies = replies
        self.contexts = contexts
        #: The shell can send :class:`FileSegment` data (a plain socket): large reads of a file-backed
        #: export then leave the data in the page cache and let the kernel copy it to the socket.
        self.sendfile = sendfile

    async def handle(self, req: Request, payload: memoryview | None) -> Message:
        """The reply to ``req`` (``payload``: the data of a WRITE)."""
        # One coroutine for the whole request, the common cases first: this runs for every request.
        try:
            node = self.node()
            kind = req.type
            if kind == NBD_CMD_WRITE:
                data = b"" if payload is None else payload  # a zero-length write has no payload
                await node.write(req.offset, data, _FUA if req.flags & NBD_CMD_FLAG_FUA else NO_FLAGS)
            elif kind == NBD_CMD_READ:
                return await self._read(node, req)
            elif kind == NBD_CMD_WRITE_ZEROES:
                flags = NO_FLAGS if req.no_hole else RequestFlags.MAY_UNMAP
                if req.fua:
                    flags |= RequestFlags.FUA
                if req.fast_zero:
                    flags |= RequestFlags.NO_FALLBACK
                await node.write_zeroes(req.offset, req.length, flags)
            elif kind == NBD_CMD_TRIM:
                await node.discard(req.offset, req.length)
                if req.fua:
                    await node.flush()
            elif kind == NBD_CMD_FLUSH:
                await node.flush()
            elif kind == NBD_CMD_BLOCK_STATUS:
                return await self._block_status(node, req)
            elif kind == NBD_CMD_CACHE:
                pass  # advisory; nothing of ours benefits from prefetching
            else:  # the core only passes known commands
                raise OSError(errno.EINVAL, f"unsupported command {kind}")
            return self.replies.ok(req)
        except OSError as err:
            return self.error_reply(req, err)

    def error_reply(self, req: Request, err: OSError) -> Message:
        """The reply to ``req`` that failed with ``err`` (errno mapped as the spec asks)."""
        code = err.errno or errno.EIO
        log.debug("%s failed: %s", req, err)
        return self.replies.error(req, errno_to_nbd(code), err.strerror or str(err))

    async def _read(self, node: BlockNode, req: Request) -> Message:
        if req.length == 0:
            return self.replies.read(req, b"")
        if not self.replies.structured or req.df or req.length < SPARSE_READ_MIN:
            buf = bytearray(req.length)
            await node.read(req.offset, buf)
            return self.replies.read(req, buf)
        extents: list[tuple[int, bool]] = []
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            ext = await node.block_status(pos, end - pos)
            extents.append((ext.length, ext.flags in _READS_ZERO))
            pos = ext.end
        segments = split_read(req.offset, req.length, extents, min_hole=MIN_HOLE)
        host = host_file(node) if self.sendfile and req.length >= SENDFILE_MIN else None
        parts: list[tuple[ReadSegment, ReadData | None]] = []
        for seg in segments:
            if seg.zero:
                parts.append((seg, None))
            elif host is not None:
                parts.append((seg, FileSegment(host[0], host[1] + seg.offset, seg.length)))
            else:
                buf = bytearray(seg.length)
                await node.read(seg.offset, buf)
                parts.append((seg, memoryview(buf)))
        return self.replies.read_segments(req, parts)

    async def _block_status(self, node: BlockNode, req: Request) -> Message:
        extents: dict[int, list[tuple[int, int]]] = {}
        for context_id, status in self.contexts.items():
            extents[context_id] = await status(node, req.offset, req.length, req.req_one)
        return self.replies.block_status(req, extents)
