"""Transmission replies of the server: :class:`ReplyBuilder` and the sparse-read helper :func:`split_read`.

Every builder returns the message as a ``list[bytes | memoryview]`` for ``writelines()``: headers are
small ``bytes``, data goes in as the caller's memoryview and is never copied, holes are views of one
shared zero buffer.  A builder belongs to one connection and knows what was negotiated, so it refuses
(:class:`~cowbackup.nbd.errors.StateError`) the replies the spec forbids there:

* no structured chunk unless NBD_OPT_STRUCTURED_REPLY was negotiated;
* once it was, no simple reply to NBD_CMD_READ (not even an error) and no simple reply with data;
* NBD_CMD_BLOCK_STATUS succeeds only with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per selected context.

Arguments that contradict the request (data outside it, the wrong command) raise ``ValueError``.

A sparse read, as the shell answers it::

    segments = split_read(req.offset, req.length, extents)     # from block status: (length, is_zero)
    parts = [(seg, None if seg.zero else read(seg)) for seg in segments]
    transport.writelines(replies.read_segments(req, parts))

      request   |<--------------------------- req.length --------------------------->|
      segments  |== data ==|............ zero ............|========= data ==========|
      chunks     OFFSET_DATA         OFFSET_HOLE              OFFSET_DATA + DONE
      (DF, or simple replies: one data run, the hole sent as zero bytes)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cowbackup.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_READ,
    NBD_ERRORS,
    NBD_MAX_STRING_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    cmd_name,
)
from cowbackup.nbd.errors import StateError
from cowbackup.nbd.events import Request
from cowbackup.nbd.wire import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS,
    ERROR,
    ERROR_OFFSET,
    OFFSET_HOLE,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    structured_header_with_offset,
)

__all__ = ["Buffer", "FileSegment", "ReadData", "ReadSegment", "ReplyBuilder", "split_read"]

#: What data may be passed as (never copied).
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class FileSegment:
    """Reply data still in a file: ``length`` bytes at ``offset`` of descriptor ``fd``.

    A shell that can (a plain socket) sends it with ``sendfile`` -- from the page cache to the socket
    with no copy through our memory.  Builders accept it wherever they accept data.
    """

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


#: Data of a read reply: bytes in memory, or a range of a file.
ReadData = Buffer | FileSegment


def _piece(data: ReadData) -> bytes | memoryview | FileSegment:
    return data if isinstance(data, FileSegment) else memoryview(data)


#: One reply message, ready for ``writelines()``.
Message = list[bytes | memoryview | FileSegment]

_ZEROES = bytes(1 << 20)
_U32_MAX = 0xFFFFFFFF


def _zero_views(n: int) -> list[bytes | memoryview]:
    view = memoryview(_ZEROES)
    return [view[: min(n - done, len(_ZEROES))] for done in range(0, n, len(_ZEROES))]


def _message_bytes(message: str) -> bytes:
    """``message`` as a valid NBD string: UTF-8, no NUL, cut to 4096 bytes on a character boundary."""
    raw = message.replace("\0", " ").encode()[:NBD_MAX_STRING_SIZE]
    return raw.decode(errors="ignore").encode()


@dataclass(frozen=True, slots=True)
class ReadSegment:
    """A run of a read: ``length`` bytes at ``offset``, known to read as zeroes when ``zero``."""

    offset: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


def split_read(
    offset: int, length: int, extents: Iterable[tuple[int, bool]], *, min_hole: int = 0
) -> list[ReadSegment]:
    """Cut the read ``[offset, offset + length)`` into data and zero segments.

    ``extents`` are consecutive ``(length, is_zero)`` runs starting at ``offset`` (as block status
    reports them).  Runs are clipped to the read; neighbours of the same kind merge; zero runs shorter
    than ``min_hole`` count as data (one chunk is cheaper than three); whatever the extents leave
    uncovered is data.  ``ValueError`` for an extent of length <= 0::

        extents   |== data ==|... zero ...|== data ==|..zero..|...
        read          |<--------------------------------->|
        segments      |data=|... zero ...|== data ==|zero|
    """
    segments: list[ReadSegment] = []
    pos, end = offset, offset + length

    def add(seg_len: int, zero: bool) -> None:
        if segments and segments[-1].zero == zero:
            last = segments.pop()
            segments.append(ReadSegment(last.offset, last.length + seg_len, zero))
        else:
            segments.append(ReadSegment(pos, seg_len, zero))

    for ext_len, zero in extents:
        if ext_len <= 0:
            raise ValueError(f"extent length {ext_len} must be positive")
        if pos >= end:
            break
        seg_len = min(ext_len, end - pos)
        add(seg_len, zero and seg_len >= min_hole)
        pos += seg_len
    if pos < end:
        add(end - pos, False)
    return segments


class ReplyBuilder:
    """Reply messages for one connection's transmission phase (see the module docstring).

    ``structured``: NBD_OPT_STRUCTURED_REPLY was negotiated.  ``meta_contexts``: id -> name of the
    selected metadata contexts.  ``min_block_size``: the advertised minimum (extent lengths are clamped
    to a multiple of it).
    """

    def __init__(
        self, *, structured: bool, meta_contexts: Mapping[int, str], min_block_size: int = 1
    ) -> None:
        self.structured = structured
        self.meta_contexts = dict(meta_contexts)
        self._max_extent = _U32_MAX - (_U32_MAX % min_block_size) if min_block_size > 1 else _U32_MAX

    # -- any request -------------------------------------------------------------------------------

    def ok(self, req: Request) -> Message:
        """Success without data, for every command but NBD_CMD_READ and NBD_CMD_BLOCK_STATUS."""
        if req.type == NBD_CMD_READ:
            raise StateError("NBD_CMD_READ is answered with read() or read_segments()")
        if req.type == NBD_CMD_BLOCK_STATUS:
            raise StateError("NBD_CMD_BLOCK_STATUS is answered with block_status()")
        return [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie)]

    def error(self, req: Request, error: int, message: str = "") -> Message:
        """The request failed with NBD error value ``error``: a final ERROR chunk, or a simple reply."""
        self._check_error(error)
        if self.structured:
            return self.error_chunk(req, error, message, done=True)
        return [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, req.cookie)]

    # -- structured chunks -------------------------------------------------------------------------

    def done(self, req: Request) -> Message:
        """NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: ends a structured reply."""
        return [self._chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, b"")]

    def error_chunk(
        self, req: Request, error: int, message: str = "", *, offset: int | None = None, done: bool = False
    ) -> Message:
        """NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET when ``offset`` is given."""
        self._check_error(error)
        text = _message_bytes(message)
        payload = ERROR.pack(error, len(text)) + text
        reply_type = NBD_REPLY_TYPE_ERROR
        if offset is not None:
            self._check_range(req, offset, 1 if req.length else 0)
            payload += ERROR_OFFSET.pack(offset)
            reply_type = NBD_REPLY_TYPE_ERROR_OFFSET
        return [self._chunk(req, NBD_REPLY_FLAG_DONE if done else 0, reply_type, payload)]

    def offset_data(self, req: Request, offset: int, data: ReadData, *, done: bool = False) -> Message:
        """NBD_REPLY_TYPE_OFFSET_DATA: ``data`` (at least one byte) read at ``offset``; not copied."""
        self._require_structured()
        self._check_read(req, offset, len(data))
        if not data or len(data) > _U32_MAX - 8:
            raise ValueError(f"OFFSET_DATA chunk of {len(data)} bytes")
        flags = NBD_REPLY_FLAG_DONE if done else 0
        header = structured_header_with_offset(
            flags, NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len(data), offset
        )
        return [header, _piece(data)]

    def offset_hole(self, req: Request, offset: int, length: int, *, done: bool = False) -> Message:
        """NBD_REPLY_TYPE_OFFSET_HOLE: ``length`` (nonzero) bytes at ``offset`` read as zeroes."""
        self._require_structured()
        self._check_read(req, offset, length)
        if not 0 < length <= _U32_MAX:
            raise ValueError(f"OFFSET_HOLE of {length} bytes")
        flags = NBD_REPLY_FLAG_DONE if done else 0
        return [self._chunk(req, flags, NBD_REPLY_TYPE_OFFSET_HOLE, OFFSET_HOLE.pack(offset, length))]

    # -- whole replies -----------------------------------------------------------------------------

    def read(self, req: Request, data: Buffer) -> Message:
        """A complete successful NBD_CMD_READ reply carrying all ``req.length`` bytes of ``data``."""
        if len(data) != req.length:
            raise ValueError(f"{len(data)} bytes of data for a read of {req.length}")
        if not req.length:
            return self.read_segments(req, [])
        if req.type != NBD_CMD_READ:
            raise ValueError(f"read reply to {cmd_name(req.type)}")
        # What read_segments() makes of one data segment, without its checks: this is every small read.
        if not self.structured:
            return [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie), _piece(data)]
        header = structured_header_with_offset(
            NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + req.length, req.offset
        )
        return [header, _piece(data)]

    def read_segments(self, req: Request, parts: Sequence[tuple[ReadSegment, ReadData | None]]) -> Message:
        """A complete successful NBD_CMD_READ reply from consecutive segments covering the request.

        Data segments carry their bytes; zero segments carry ``None`` (or bytes, which are then sent).
        Structured: one chunk per segment, DONE on the last - or, with NBD_CMD_FLAG_DF, one OFFSET_DATA
        chunk with the zeroes written out.  Simple: the header and all the bytes.
        """
        if req.type != NBD_CMD_READ:
            raise ValueError(f"read reply to {cmd_name(req.type)}")
        pieces: Message = []
        pos = req.offset
        for seg, data in parts:
            if seg.offset != pos or seg.length <= 0:
                raise ValueError(f"segment {seg} does not continue the read at {pos}")
            if data is None and not seg.zero:
                raise ValueError(f"data segment {seg} without data")
            if data is not None and len(data) != seg.length:
                raise ValueError(f"segment {seg} with {len(data)} bytes of data")
            pos = seg.end
        if pos != req.offset + req.length:
            raise ValueError(f"segments end at {pos}, the read at {req.offset + req.length}")

        def raw(seg: ReadSegment, data: ReadData | None) -> Message:
            return list(_zero_views(seg.length)) if data is None else [_piece(data)]

        if not self.structured:
            pieces.append(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie))
            for seg, data in parts:
                pieces += raw(seg, data)
            return pieces
        if not parts:
            return self.done(req)
        if req.df:
            pieces.append(
                structured_header_with_offset(
                    NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + req.length, req.offset
                )
            )
            for seg, data in parts:
                pieces += raw(seg, data)
            return pieces
        for i, (seg, data) in enumerate(parts):
            last = i == len(parts) - 1
            if data is None:
                pieces += self.offset_hole(req, seg.offset, seg.length, done=last)
            else:
                pieces += self.offset_data(req, seg.offset, data, done=last)
        return pieces

    def block_status(self, req: Request, extents: Mapping[int, Sequence[tuple[int, int]]]) -> Message:
        """A complete successful NBD_CMD_BLOCK_STATUS reply: one chunk per selected context, DONE last.

        ``extents`` maps every selected context id to consecutive ``(length, status flags)`` extents
        starting at ``req.offset``.  The builder applies the spec's limits: with NBD_CMD_FLAG_REQ_ONE
        one extent no longer than the request; otherwise extents after the one that reaches the end of
        the request are dropped; a length that does not fit 32 bits is cut (and ends the list).
        """
        self._require_structured()
        if req.type != NBD_CMD_BLOCK_STATUS:
            raise ValueError(f"block status reply to {cmd_name(req.type)}")
        if set(extents) != set(self.meta_contexts):
            raise ValueError(f"extents for contexts {sorted(extents)}, selected {sorted(self.meta_contexts)}")
        pieces: Message = []
        for i, (context_id, runs) in enumerate(extents.items()):
            descriptors = self._descriptors(req, runs)
            payload = BLOCK_STATUS.pack(context_id) + b"".join(
                BLOCK_DESCRIPTOR.pack(length, flags) for length, flags in descriptors
            )
            flags = NBD_REPLY_FLAG_DONE if i == len(extents) - 1 else 0
            pieces.append(self._chunk(req, flags, NBD_REPLY_TYPE_BLOCK_STATUS, payload))
        return pieces

    # -- helpers -----------------------------------------------------------------------------------

    def _descriptors(self, req: Request, runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        if not runs:
            raise ValueError("block status needs at least one extent")
        out: list[tuple[int, int]] = []
        total = 0
        for length, flags in runs:
            if length <= 0 or not 0 <= flags <= _U32_MAX:
                raise ValueError(f"invalid extent ({length}, {flags:#x})")
            if req.req_one:
                out.append((min(length, req.length or length, self._max_extent), flags))
                break
            cut = min(length, self._max_extent)
            out.append((cut, flags))
            total += cut
            if total >= req.length or cut < length:
                break
        return out

    def _chunk(self, req: Request, flags: int, reply_type: int, payload: bytes) -> bytes:
        self._require_structured()
        header = STRUCTURED_REPLY.pack(
            NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, req.cookie, len(payload)
        )
        return header + payload

    def _require_structured(self) -> None:
        if not self.structured:
            raise StateError("structured replies were not negotiated")

    @staticmethod
    def _check_error(error: int) -> None:
        if error not in NBD_ERRORS:
            raise ValueError(f"{error} is not an NBD error value (see errno_to_nbd)")

    @staticmethod
    def _check_read(req: Request, offset: int, length: int) -> None:
        if req.type != NBD_CMD_READ:
            raise ValueError(f"read chunk in a reply to {cmd_name(req.type)}")
        ReplyBuilder._check_range(req, offset, length)

    @staticmethod
    def _check_range(req: Request, offset: int, length: int) -> None:
        if offset < req.offset or offset + length > req.offset + req.length:
            raise ValueError(f"[{offset}, +{length}) lies outside the request [{req.offset}, +{req.length})")
