"""The envelope every chunk, index segment and refs segment is stored in.

::

    offset  size  field
    0       4     magic "CWBK"
    4       1     kind: 1 chunk, 2 index segment, 3 refs segment
    5       1     compression: 0 none, 1 zstd (one zstd frame)
    6       1     encryption: 0 none, 1 AES-256-GCM
    7       1     reserved, 0
    8       8     plaintext length (big-endian), after decompression
    16      ...   encryption 0: the (compressed) payload
                  encryption 1: nonce (12) || AES-256-GCM(compressed payload) || tag (16)

Encryption authenticates, as associated data, the 16 header bytes followed by the object's 32-byte id:
an object cannot be passed off as another (a chunk swapped for another chunk, or an index segment for a
chunk), nor can its header be altered.  Compression runs before encryption and is skipped when it does
not shrink the data.  The *stored checksum* of an object is SHA-256 over all its stored bytes; it can be
checked by anyone, with or without the key.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import sys

from cowbackup.repo.crypto import NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Keys, decrypt, encrypt
from cowbackup.repo.errors import CorruptObject

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

MAGIC = b"CWBK"
#: magic, kind, compression, encryption, reserved, plaintext length
HEADER = struct.Struct(">4sBBBBQ")


class Kind(enum.IntEnum):
    CHUNK = 1
    INDEX = 2
    REFS = 3


COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
ENCRYPTION_NONE = 0
ENCRYPTION_AES_GCM = 1


def max_stored_size(plaintext_limit: int) -> int:
    """The largest stored object a plaintext of ``plaintext_limit`` bytes can become: the header, a
    nonce and a tag, and the plaintext itself (compression is only kept when it shrinks)."""
    return HEADER.size + NONCE_SIZE + plaintext_limit + TAG_SIZE


def seal(
    kind: Kind, object_id: bytes, plaintext: bytes | bytearray | memoryview, keys: Keys | None, level: int
) -> bytes:
    """The stored bytes of an object.  ``level`` 0 means no compression."""
    payload: bytes | bytearray | memoryview = plaintext
    compression = COMPRESSION_NONE
    if level > 0 and len(plaintext) > 0:
        packed = zstd.compress(plaintext, level)
        if len(packed) < len(plaintext):
            payload, compression = packed, COMPRESSION_ZSTD
    encryption = ENCRYPTION_NONE if keys is None else ENCRYPTION_AES_GCM
    header = HEADER.pack(MAGIC, kind, compression, encryption, 0, len(plaintext))
    if keys is None:
        return header + payload
    nonce, sealed = encrypt(keys.enc_key, payload, header + object_id)
    return b"".join((header, nonce, sealed))


def unseal(
    name: str, kind: Kind, object_id: bytes, stored: bytes, keys: Keys | None, max_length: int
) -> bytes:
    """The plaintext of a stored object, authenticated (encrypted) and length-checked.

    CorruptObject naming ``name`` for anything wrong: bad magic or header, a kind other than ``kind``, a
    plaintext longer than ``max_length`` (a hostile length never makes us allocate more), a failed
    authentication, or a payload that does not decompress to the announced length.
    """
    if len(stored) < HEADER.size:
        raise CorruptObject(name, f"truncated ({len(stored)} bytes)")
    magic, got_kind, compression, encryption, reserved, length = HEADER.unpack_from(stored)
    if magic != MAGIC:
        raise CorruptObject(name, "bad magic")
    if got_kind != kind:
        raise CorruptObject(name, f"holds a {_kind_name(got_kind)}, not a {_kind_name(kind)}")
    if compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD) or reserved != 0:
        raise CorruptObject(name, f"unknown compression {compression} or reserved byte {reserved}")
    if length > max_length:
        raise CorruptObject(name, f"announces {length} bytes, more than the {max_length} allowed")
    expected = ENCRYPTION_NONE if keys is None else ENCRYPTION_AES_GCM
    if encryption != expected:
        raise CorruptObject(name, f"encryption {encryption}, but the repository uses {expected}")
    body = memoryview(stored)[HEADER.size :]
    if keys is not None:
        if len(body) < NONCE_SIZE + TAG_SIZE:
            raise CorruptObject(name, "truncated ciphertext")
        try:
            payload = decrypt(
                keys.enc_key,
                bytes(body[:NONCE_SIZE]),
                body[NONCE_SIZE:],
                bytes(stored[: HEADER.size]) + object_id,
            )
        except AuthenticationFailed:
            raise CorruptObject(name, "authentication failed (altered bytes, or not this object)") from None
        body = memoryview(payload)
    if compression == COMPRESSION_ZSTD:
        try:
            decompressor = zstd.ZstdDecompressor()
            plaintext = decompressor.decompress(body, max_length=length + 1)
        except zstd.ZstdError as err:
            raise CorruptObject(name, f"does not decompress: {err}") from None
        if not decompressor.eof or decompressor.unused_data:
            raise CorruptObject(name, "compressed payload does not end where it should")
    else:
        plaintext = bytes(body)
    if len(plaintext) != length:
        raise CorruptObject(name, f"holds {len(plaintext)} bytes, the header says {length}")
    return plaintext


def stored_checksum(stored: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 over an object's stored bytes (what ``verify --no-key`` checks)."""
    return hashlib.sha256(stored).digest()


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"object of unknown kind {kind}"
