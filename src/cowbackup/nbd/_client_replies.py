"""The client's transmission phase: request headers out, replies in (spec: "Transmission").

:class:`ReplyParser` tracks every request in flight by cookie, so it knows that a simple reply to a
successful NBD_CMD_READ is followed by *length* bytes of data, and it checks every structured chunk
against its request::

    cookie -> InFlight(type, flags, offset, length, content ranges seen, contexts seen, errored)

    simple reply            READ ok: ReplyData (payload follows)      else: SimpleReply
    OFFSET_DATA / _HOLE     READ only, inside the request, no overlap, one chunk with DF
    BLOCK_STATUS            BLOCK_STATUS only, a selected context, once per context, REQ_ONE -> 1 extent
    ERROR / ERROR_OFFSET    error nonzero, message fits, offset inside the request
    DONE without error      READ: the chunks cover the request; BLOCK_STATUS: every context answered

Anything else - unknown cookie or magic, a chunk type the request cannot have, inconsistent lengths - is
a protocol violation: :meth:`ReplyParser.parse` raises :class:`~cowbackup.nbd.wire.WireError` and the
client core turns it into a :class:`~cowbackup.nbd.errors.ProtocolError`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from cowbackup.nbd._core import ByteQueue
from cowbackup.nbd.constants import (
    COMMAND_FLAGS_ALLOWED,
    COMMAND_NEEDS_FLAG,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FUA,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_FLAG_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    cmd_name,
    reply_type_name,
)
from cowbackup.nbd.errors import StateError
from cowbackup.nbd.events import (
    BlockStatusChunk,
    ClientEvent,
    ErrorChunk,
    ExportReady,
    NoneChunk,
    OffsetDataChunk,
    OffsetHoleChunk,
    ReplyData,
    SimpleReply,
    StructuredChunk,
)
from cowbackup.nbd.wire import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS,
    ERROR,
    ERROR_OFFSET,
    MAGIC,
    OFFSET_DATA,
    OFFSET_HOLE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    WireError,
    decode_message,
)

__all__ = ["MAX_CHUNK_PAYLOAD", "InFlight", "ReplyParser"]

#: Longest chunk payload parsed through the buffer (block status, errors); OFFSET_DATA bypasses it.
MAX_CHUNK_PAYLOAD = 16 * 1024 * 1024


#: Requests whose offset and length must honour the minimum block size ("Block size constraints").
_RANGED = frozenset(
    {NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_CACHE, NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS}
)
#: Requests whose length must not exceed the maximum block size (WRITE_ZEROES only without FAST_ZERO).
_LIMITED = frozenset({NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE, NBD_CMD_WRITE_ZEROES})


@dataclass
class InFlight:
    """A request sent and not completely answered."""

    type: int
    flags: int
    offset: int
    length: int
    #: content chunks of a READ so far, as sorted (start, end) ranges, and the bytes they cover
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    #: context ids a BLOCK_STATUS reply has answered
    contexts: set[int] = field(default_factory=set)
    errored: bool = False


class ReplyParser:
    """Request headers and reply parsing for one connection's transmission phase."""

    def __init__(self, ready: ExportReady) -> None:
        self.structured = ready.structured_replies
        self.transmission_flags = ready.transmission_flags
        self.context_ids = frozenset(ready.meta_contexts.values())
        self.min_block_size = max(ready.min_block_size, 1)
        self.max_block_size = ready.max_block_size
        self.in_flight: dict[int, InFlight] = {}
        self.disconnected = False

    # -- requests ----------------------------------------------------------------------------------

    def request_bytes(self, type: int, flags: int, offset: int, length: int, cookie: int) -> bytes:
        if self.disconnected:
            raise StateError("request after NBD_CMD_DISC")
        if not (0 <= cookie < 1 << 64 and 0 <= offset < 1 << 64 and 0 <= length < 1 << 32):
            raise ValueError(f"cookie, offset or length out of range: {cookie}, {offset}, {length}")
        allowed = COMMAND_FLAGS_ALLOWED.get(type)
        if allowed is None:
            raise ValueError(f"unknown command {type}")
        tflags = self.transmission_flags
        if not tflags & NBD_FLAG_SEND_FUA:
            allowed &= ~NBD_CMD_FLAG_FUA
        if not tflags & NBD_FLAG_SEND_DF:
            allowed &= ~NBD_CMD_FLAG_DF
        if not tflags & NBD_FLAG_SEND_FAST_ZERO:
            allowed &= ~NBD_CMD_FLAG_FAST_ZERO
        if flags & ~allowed:
            raise ValueError(f"flags {flags & ~allowed:#x} not allowed for {cmd_name(type)} on this export")
        needed = COMMAND_NEEDS_FLAG.get(type, 0)
        if needed and not tflags & needed:
            raise ValueError(f"{cmd_name(type)} is not supported by this export")
        if type == NBD_CMD_BLOCK_STATUS and not self.context_ids:
            raise ValueError("NBD_CMD_BLOCK_STATUS without a selected metadata context")
        if type in _RANGED and (offset % self.min_block_size or length % self.min_block_size):
            raise ValueError(f"[{offset}, +{length}) is not aligned to {self.min_block_size} bytes")
        if type in _LIMITED and length > self.max_block_size and not flags & NBD_CMD_FLAG_FAST_ZERO:
            raise ValueError(f"length {length} exceeds the maximum block size {self.max_block_size}")
        if cookie in self.in_flight:
            raise StateError(f"cookie {cookie:#x} is already in flight")
        if type == NBD_CMD_DISC:
            self.disconnected = True
            return REQUEST.pack(NBD_REQUEST_MAGIC, flags, type, cookie, 0, 0)
        if type == NBD_CMD_FLUSH:
            offset = length = 0
        self.in_flight[cookie] = InFlight(type, flags, offset, length)
        return REQUEST.pack(NBD_REQUEST_MAGIC, flags, type, cookie, offset, length)

    # -- replies -----------------------------------------------------------------------------------

    def parse(self, buffer: ByteQueue) -> ClientEvent | None:
        """The next reply event, or None if more bytes are needed; WireError for a violation."""
        if len(buffer) < MAGIC.size:
            return None
        (magic,) = MAGIC.unpack(buffer.peek(MAGIC.size))
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            return self._simple(buffer)
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            return self._chunk(buffer)
        raise WireError(f"bad reply magic {magic:#x}")

    def _request(self, cookie: int) -> InFlight:
        req = self.in_flight.get(cookie)
        if req is None:
            raise WireError(f"reply for unknown cookie {cookie:#x}")
        return req

    def _simple(self, buffer: ByteQueue) -> ClientEvent | None:
        if len(buffer) < SIMPLE_REPLY.size:
            return None
        _, error, cookie = SIMPLE_REPLY.unpack(buffer.take(SIMPLE_REPLY.size))
        req = self._request(cookie)
        if self.structured and req.type == NBD_CMD_READ:
            raise WireError("simple reply to NBD_CMD_READ although structured replies were negotiated")
        if req.type == NBD_CMD_BLOCK_STATUS and not error:
            raise WireError("successful simple reply to NBD_CMD_BLOCK_STATUS")
        del self.in_flight[cookie]
        if req.type == NBD_CMD_READ and not error and req.length:
            return ReplyData(cookie, req.offset, req.length)
        return SimpleReply(cookie, error)

    def _chunk(self, buffer: ByteQueue) -> ClientEvent | None:
        if len(buffer) < STRUCTURED_REPLY.size:
            return None
        _, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(buffer.peek(STRUCTURED_REPLY.size))
        if not self.structured:
            raise WireError("structured reply chunk although structured replies were not negotiated")
        req = self._request(cookie)
        what = f"{reply_type_name(rtype)} chunk for {cmd_name(req.type)}"
        event: StructuredChunk
        if rtype == NBD_REPLY_TYPE_OFFSET_DATA:
            if length < OFFSET_DATA.size + 1:
                raise WireError(f"{what} with length {length}")
            if len(buffer) < STRUCTURED_REPLY.size + OFFSET_DATA.size:
                return None
            buffer.skip(STRUCTURED_REPLY.size)
            (offset,) = OFFSET_DATA.unpack(buffer.take(OFFSET_DATA.size))
            self._content(req, what, offset, length - OFFSET_DATA.size)
            event = OffsetDataChunk(cookie, flags, rtype, offset, length - OFFSET_DATA.size)
            return self._finish(cookie, req, event)
        if length > MAX_CHUNK_PAYLOAD:
            raise WireError(f"{what} with {length} bytes of payload")
        if len(buffer) < STRUCTURED_REPLY.size + length:
            return None
        buffer.skip(STRUCTURED_REPLY.size)
        payload = buffer.take(length)
        if rtype == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise WireError(f"{what} with length {length} and flags {flags:#x}")
            event = NoneChunk(cookie, flags, rtype)
        elif rtype == NBD_REPLY_TYPE_OFFSET_HOLE:
            if length != OFFSET_HOLE.size:
                raise WireError(f"{what} with length {length}")
            offset, hole = OFFSET_HOLE.unpack(payload)
            if not hole:
                raise WireError(f"{what} of 0 bytes")
            self._content(req, what, offset, hole)
            event = OffsetHoleChunk(cookie, flags, rtype, offset, hole)
        elif rtype == NBD_REPLY_TYPE_BLOCK_STATUS:
            event = self._block_status(req, what, cookie, flags, rtype, payload)
        elif rtype & NBD_REPLY_TYPE_FLAG_ERROR:
            event = self._error(req, what, cookie, flags, rtype, payload)
        else:
            raise WireError(f"unexpected {what}")
        return self._finish(cookie, req, event)

    def _content(self, req: InFlight, what: str, offset: int, length: int) -> None:
        if req.type != NBD_CMD_READ:
            raise WireError(f"unexpected {what}")
        if offset < req.offset or offset + length > req.offset + req.length:
            raise WireError(f"{what} [{offset}, +{length}) outside the request [{req.offset}, +{req.length})")
        if req.flags & NBD_CMD_FLAG_DF and req.ranges:
            raise WireError(f"second {what} although NBD_CMD_FLAG_DF was set")
        end = offset + length
        i = bisect.bisect(req.ranges, (offset, end))
        if (i and req.ranges[i - 1][1] > offset) or (i < len(req.ranges) and req.ranges[i][0] < end):
            raise WireError(f"{what} [{offset}, +{length}) overlaps an earlier chunk")
        req.ranges.insert(i, (offset, end))
        req.covered += length

    def _block_status(
        self, req: InFlight, what: str, cookie: int, flags: int, rtype: int, payload: bytes
    ) -> BlockStatusChunk:
        size = len(payload) - BLOCK_STATUS.size
        if req.type != NBD_CMD_BLOCK_STATUS or size <= 0 or size % BLOCK_DESCRIPTOR.size:
            raise WireError(f"unexpected {what} with length {len(payload)}")
        (context_id,) = BLOCK_STATUS.unpack_from(payload)
        if context_id not in self.context_ids or context_id in req.contexts:
            raise WireError(f"{what} for context {context_id}, unknown or already answered")
        req.contexts.add(context_id)
        extents = tuple(BLOCK_DESCRIPTOR.iter_unpack(payload[BLOCK_STATUS.size :]))
        if any(length == 0 for length, _ in extents):
            raise WireError(f"{what} with an empty extent")
        if req.flags & NBD_CMD_FLAG_REQ_ONE and (len(extents) != 1 or extents[0][0] > max(req.length, 1)):
            raise WireError(f"{what} breaks NBD_CMD_FLAG_REQ_ONE: {extents[:2]}")
        return BlockStatusChunk(cookie, flags, rtype, context_id, extents)

    def _error(
        self, req: InFlight, what: str, cookie: int, flags: int, rtype: int, payload: bytes
    ) -> ErrorChunk:
        if len(payload) < ERROR.size:
            raise WireError(f"{what} with length {len(payload)}")
        error, msg_len = ERROR.unpack_from(payload)
        tail = ERROR_OFFSET.size if rtype == NBD_REPLY_TYPE_ERROR_OFFSET else 0
        if not error or msg_len > len(payload) - ERROR.size - tail:
            raise WireError(f"{what} with error {error} and a {msg_len}-byte message in {len(payload)} bytes")
        message = decode_message(payload[ERROR.size : ERROR.size + msg_len])
        offset = None
        if tail:
            (offset,) = ERROR_OFFSET.unpack_from(payload, ERROR.size + msg_len)
            if not req.offset <= offset < req.offset + max(req.length, 1):
                raise WireError(f"{what} at offset {offset} outside the request")
        req.errored = True
        return ErrorChunk(cookie, flags, rtype, error, message, offset)

    def _finish(self, cookie: int, req: InFlight, event: StructuredChunk) -> StructuredChunk:
        if not event.done:
            return event
        del self.in_flight[cookie]
        if req.errored:
            return event
        if req.type == NBD_CMD_READ and req.covered != req.length:
            raise WireError(f"read reply ends after {req.covered} of {req.length} bytes")
        if req.type == NBD_CMD_BLOCK_STATUS and req.contexts != self.context_ids:
            raise WireError(f"block status reply ends with contexts {sorted(req.contexts)} unanswered")
        return event
