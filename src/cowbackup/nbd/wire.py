"""The NBD wire layouts: one :class:`struct.Struct` per message layout, and the codecs of option data.

Everything is big-endian (network byte order).  Section names refer to the spec,
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md .

The decoders raise :class:`WireError` on malformed input; the protocol cores turn it into an option
error reply (server) or a :class:`~cowbackup.nbd.errors.ProtocolError` (client).  It never escapes them.
"""

from __future__ import annotations

import struct

from cowbackup.nbd.constants import NBD_MAX_STRING_SIZE, NBD_REP_MAGIC, NBD_STRUCTURED_REPLY_MAGIC

# -- handshake ("Newstyle negotiation", "Fixed newstyle negotiation") -----------------------------------

#: S: NBDMAGIC (64), IHAVEOPT (64), handshake flags (16)
GREETING = struct.Struct(">QQH")
#: C: client flags (32)
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT (64), option (32), length of option data (32); then the data
OPTION_HEADER = struct.Struct(">QII")
#: S: NBD_REP_MAGIC (64), option (32), reply type (32), length of reply data (32); then the data
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: S: reply to NBD_OPT_EXPORT_NAME: export size (64), transmission flags (16); then 124 zero bytes
#: unless NBD_FLAG_C_NO_ZEROES was negotiated ("Newstyle negotiation")
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124

# -- option data and option reply data ("Option types", "Option reply types") ---------------------------

#: a 32-bit length prefix of a string (names, queries) and the metadata context ID of NBD_REP_META_CONTEXT
U32 = struct.Struct(">I")
#: a 16-bit count or type: number of information requests, one information request, the info type prefix
U16 = struct.Struct(">H")
#: NBD_REP_INFO / NBD_INFO_EXPORT: info type (16), export size (64), transmission flags (16)
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: info type (16), minimum (32), preferred (32), maximum (32) block size
INFO_BLOCK_SIZE = struct.Struct(">HIII")

# -- transmission ("Request message", "Simple reply message", "Structured reply chunk message") ---------

#: C: NBD_REQUEST_MAGIC (32), command flags (16), type (16), cookie (64), offset (64), length (32);
#: then *length* bytes of data for NBD_CMD_WRITE
REQUEST = struct.Struct(">IHHQQI")
#: C: NBD_EXTENDED_REQUEST_MAGIC (32), flags (16), type (16), cookie (64), offset (64), length (64)
#: (extended headers; we do not negotiate them, the layout is here for completeness)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
#: S: NBD_SIMPLE_REPLY_MAGIC (32), error (32), cookie (64); then *length* bytes for a successful READ
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: NBD_STRUCTURED_REPLY_MAGIC (32), flags (16), type (16), cookie (64), length of payload (32)
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: S: NBD_EXTENDED_REPLY_MAGIC (32), flags (16), type (16), cookie (64), offset (64), payload length (64)
EXTENDED_REPLY = struct.Struct(">IHHQQQ")
#: the magic that starts every reply, to tell simple from structured ones
MAGIC = struct.Struct(">I")

# -- structured reply payloads ("Structured reply types") -----------------------------------------------

#: NBD_REPLY_TYPE_OFFSET_DATA: offset (64); then *length - 8* bytes of data
OFFSET_DATA = struct.Struct(">Q")
#: NBD_REPLY_TYPE_OFFSET_HOLE: offset (64), hole size (32)
OFFSET_HOLE = struct.Struct(">QI")
#: NBD_REPLY_TYPE_BLOCK_STATUS: metadata context ID (32); then one or more BLOCK_DESCRIPTOR
BLOCK_STATUS = struct.Struct(">I")
#: one block status descriptor: extent length (32, nonzero), status flags (32)
BLOCK_DESCRIPTOR = struct.Struct(">II")
#: error chunks (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, any type with bit 15): error (32), message length (16);
#: then the message; NBD_REPLY_TYPE_ERROR_OFFSET then has ERROR_OFFSET
ERROR = struct.Struct(">IH")
#: NBD_REPLY_TYPE_ERROR_OFFSET, after the message: offset (64)
ERROR_OFFSET = struct.Struct(">Q")

#: S: a structured reply chunk header followed by an offset (64): the start of OFFSET_DATA and OFFSET_HOLE
#: chunks
CHUNK_WITH_OFFSET = struct.Struct(">IHHQIQ")


class WireError(ValueError):
    """Malformed option data (internal: the protocol cores turn it into a reply or a ProtocolError)."""


def encode_string(text: str) -> bytes:
    """UTF-8 bytes of a protocol string; ``ValueError`` if it holds NUL or is longer than 4096 bytes."""
    data = text.encode()
    if b"\0" in data or len(data) > NBD_MAX_STRING_SIZE:
        raise ValueError(f"not a valid NBD string: {text[:64]!r}")
    return data


def decode_string(data: bytes) -> str:
    """A protocol string from the wire; ``WireError`` if too long, not UTF-8, or holding NUL."""
    if len(data) > NBD_MAX_STRING_SIZE:
        raise WireError(f"string of {len(data)} bytes is longer than {NBD_MAX_STRING_SIZE}")
    if b"\0" in data:
        raise WireError("string holds a NUL byte")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise WireError(f"string is not UTF-8: {err}") from None


def decode_message(data: bytes) -> str:
    """An error message for humans: decoded leniently (invalid UTF-8 is replaced, never an error)."""
    return data.decode(errors="replace")


class _Reader:
    """Reads length-prefixed fields from option data, raising WireError instead of overrunning."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise WireError(f"option data too short: need {n} bytes at {self.pos} of {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
        return value

    def string32(self) -> str:
        return decode_string(self.take(self.u32()))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{len(self.data) - self.pos} trailing bytes in option data")


# -- NBD_OPT_INFO / NBD_OPT_GO data: name length (32), name, number of requests (16), requests (16 each) --


def encode_info_request(name: str, info_requests: tuple[int, ...] | list[int]) -> bytes:
    raw = encode_string(name)
    return b"".join(
        [U32.pack(len(raw)), raw, U16.pack(len(info_requests)), *(U16.pack(i) for i in info_requests)]
    )


def decode_info_request(data: bytes) -> tuple[str, list[int]]:
    """(export name, information requests) of NBD_OPT_INFO / NBD_OPT_GO data."""
    reader = _Reader(data)
    name = reader.string32()
    requests = [reader.u16() for _ in range(reader.u16())]
    reader.end()
    return name, requests


# -- NBD_OPT_LIST_META_CONTEXT / _SET_META_CONTEXT data: name length (32), name, number of queries (32),
#    queries, each as length (32) and string -------------------------------------------------------------


def encode_meta_context_request(name: str, queries: tuple[str, ...] | list[str]) -> bytes:
    parts = [U32.pack(len(raw := encode_string(name))), raw, U32.pack(len(queries))]
    for query in queries:
        parts += [U32.pack(len(raw := encode_string(query))), raw]
    return b"".join(parts)


def decode_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """(export name, queries) of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""
    reader = _Reader(data)
    name = reader.string32()
    count = reader.u32()
    if count > len(data) // 4:  # every query takes at least its 4-byte length
        raise WireError(f"{count} queries cannot fit in {len(data)} bytes")
    queries = [reader.string32() for _ in range(count)]
    reader.end()
    return name, queries


# -- option reply data ----------------------------------------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One option reply: header and data."""
    return OPTION_REPLY_HEADER.pack(NBD_REP_MAGIC, option, reply_type, len(data)) + data


def encode_rep_server(name: str, description: str) -> bytes:
    """NBD_REP_SERVER data: name length (32), name, then the description (the rest of the reply)."""
    raw = encode_string(name)
    return U32.pack(len(raw)) + raw + encode_string(description)


def decode_rep_server(data: bytes) -> tuple[str, str]:
    reader = _Reader(data)
    name = reader.string32()
    return name, decode_message(data[reader.pos :])


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT data: context ID (32), then the name (the rest of the reply)."""
    return U32.pack(context_id) + encode_string(name)


def decode_rep_meta_context(data: bytes) -> tuple[int, str]:
    reader = _Reader(data)
    context_id = reader.u32()
    return context_id, decode_string(data[reader.pos :])


def structured_header_with_offset(
    flags: int, reply_type: int, cookie: int, length: int, offset: int
) -> bytes:
    """A structured reply chunk header (payload ``length`` includes the offset) followed by ``offset``."""
    return CHUNK_WITH_OFFSET.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length, offset)
