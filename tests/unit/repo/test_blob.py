"""The object envelope: every alteration is a CorruptObject that names the object, never garbage."""

from __future__ import annotations

import struct
import sys

import pytest

from cowbackup.repo import blob, crypto
from cowbackup.repo.blob import HEADER, Kind
from cowbackup.repo.errors import CorruptObject

from .helpers import data

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

KEYS = crypto.Keys.from_master(bytes(range(32)))
NAME = "chunks/ab/" + "ab" * 32
OID = bytes.fromhex("ab" * 32)
COMPRESSIBLE = b"cowbackup " * 1000
RANDOM = data(1, 10_000)


@pytest.mark.parametrize("keys", [KEYS, None], ids=["encrypted", "plain"])
@pytest.mark.parametrize("plaintext", [COMPRESSIBLE, RANDOM], ids=["compressible", "random"])
@pytest.mark.parametrize("position", range(HEADER.size))
def test_every_header_byte_altered_is_refused(
    keys: crypto.Keys | None, plaintext: bytes, position: int
) -> None:
    stored = bytearray(blob.seal(Kind.CHUNK, OID, plaintext, keys, 3))
    assert blob.unseal(NAME, Kind.CHUNK, OID, bytes(stored), keys, len(plaintext)) == plaintext
    for bit in (0x01, 0x80):
        altered = bytearray(stored)
        altered[position] ^= bit
        with pytest.raises(CorruptObject) as caught:
            blob.unseal(NAME, Kind.CHUNK, OID, bytes(altered), keys, len(plaintext))
        assert caught.value.name == NAME
        assert NAME in str(caught.value)


@pytest.mark.parametrize("plaintext", [COMPRESSIBLE, RANDOM], ids=["compressible", "random"])
def test_every_payload_byte_altered_fails_authentication(plaintext: bytes) -> None:
    stored = blob.seal(Kind.INDEX, OID, plaintext, KEYS, 3)
    for position in range(HEADER.size, len(stored), max(1, len(stored) // 97)):
        altered = bytearray(stored)
        altered[position] ^= 0x04
        with pytest.raises(CorruptObject, match="authentication failed"):
            blob.unseal(NAME, Kind.INDEX, OID, bytes(altered), KEYS, len(plaintext))


def test_an_object_sealed_under_one_id_does_not_open_as_another() -> None:
    stored = blob.seal(Kind.CHUNK, OID, RANDOM, KEYS, 3)
    other = bytes.fromhex("cd" * 32)
    with pytest.raises(CorruptObject, match="authentication failed"):
        blob.unseal("chunks/cd/" + "cd" * 32, Kind.CHUNK, other, stored, KEYS, len(RANDOM))
    # Nor under another kind, nor with another key.
    with pytest.raises(CorruptObject, match="holds a chunk, not a index"):
        blob.unseal(NAME, Kind.INDEX, OID, stored, KEYS, len(RANDOM))
    with pytest.raises(CorruptObject, match="authentication failed"):
        blob.unseal(NAME, Kind.CHUNK, OID, stored, crypto.Keys.from_master(bytes(32)), len(RANDOM))


@pytest.mark.parametrize("keys", [KEYS, None], ids=["encrypted", "plain"])
def test_a_plaintext_longer_than_allowed_is_refused_before_decompressing(keys: crypto.Keys | None) -> None:
    stored = blob.seal(Kind.CHUNK, OID, COMPRESSIBLE, keys, 3)
    with pytest.raises(CorruptObject, match="more than the"):
        blob.unseal(NAME, Kind.CHUNK, OID, stored, keys, len(COMPRESSIBLE) - 1)
    # A header announcing 2^60 bytes is refused without allocating them.
    lying = HEADER.pack(blob.MAGIC, Kind.CHUNK, 0, 0, 0, 1 << 60) + b"x"
    with pytest.raises(CorruptObject, match="more than the"):
        blob.unseal(NAME, Kind.CHUNK, OID, lying, None, 1 << 20)


def test_a_decompression_bomb_stops_at_the_announced_length() -> None:
    # 64 MiB of zeros packed in a few KiB, behind a header that announces 100 bytes.
    bomb = zstd.compress(bytes(64 << 20), 3)
    stored = HEADER.pack(blob.MAGIC, Kind.CHUNK, blob.COMPRESSION_ZSTD, 0, 0, 100) + bomb
    with pytest.raises(CorruptObject, match="does not end where it should"):
        blob.unseal(NAME, Kind.CHUNK, OID, stored, None, 1 << 20)


def test_payloads_that_lie_about_their_length() -> None:
    short = HEADER.pack(blob.MAGIC, Kind.CHUNK, 0, 0, 0, 10) + b"123"
    with pytest.raises(CorruptObject, match="holds 3 bytes, the header says 10"):
        blob.unseal(NAME, Kind.CHUNK, OID, short, None, 100)
    packed = zstd.compress(b"abc" * 10)
    wrong = HEADER.pack(blob.MAGIC, Kind.CHUNK, blob.COMPRESSION_ZSTD, 0, 0, 31) + packed
    with pytest.raises(CorruptObject, match="holds 30 bytes"):
        blob.unseal(NAME, Kind.CHUNK, OID, wrong, None, 100)
    trailing = HEADER.pack(blob.MAGIC, Kind.CHUNK, blob.COMPRESSION_ZSTD, 0, 0, 30) + packed + packed
    with pytest.raises(CorruptObject):
        blob.unseal(NAME, Kind.CHUNK, OID, trailing, None, 100)


@pytest.mark.parametrize("length", range(0, HEADER.size + crypto.NONCE_SIZE + crypto.TAG_SIZE))
def test_truncated_objects(length: int) -> None:
    stored = blob.seal(Kind.CHUNK, OID, b"", KEYS, 3)
    assert len(stored) == HEADER.size + crypto.NONCE_SIZE + crypto.TAG_SIZE
    with pytest.raises(CorruptObject) as caught:
        blob.unseal(NAME, Kind.CHUNK, OID, stored[:length], KEYS, 0)
    assert caught.value.name == NAME


@pytest.mark.parametrize("keys", [KEYS, None], ids=["encrypted", "plain"])
def test_stored_raw_when_compression_does_not_shrink(keys: crypto.Keys | None) -> None:
    def compression(stored: bytes) -> int:
        return int(struct.unpack_from(">4sBB", stored)[2])

    assert compression(blob.seal(Kind.CHUNK, OID, RANDOM, keys, 3)) == blob.COMPRESSION_NONE
    assert compression(blob.seal(Kind.CHUNK, OID, COMPRESSIBLE, keys, 3)) == blob.COMPRESSION_ZSTD
    assert compression(blob.seal(Kind.CHUNK, OID, COMPRESSIBLE, keys, 0)) == blob.COMPRESSION_NONE
    plain = blob.seal(Kind.CHUNK, OID, RANDOM, None, 3)
    assert plain == HEADER.pack(blob.MAGIC, Kind.CHUNK, 0, 0, 0, len(RANDOM)) + RANDOM
    for level in (0, 3, 19):
        stored = blob.seal(Kind.REFS, OID, COMPRESSIBLE, keys, level)
        assert blob.unseal(NAME, Kind.REFS, OID, stored, keys, len(COMPRESSIBLE)) == COMPRESSIBLE


def test_each_seal_uses_a_fresh_nonce() -> None:
    first = blob.seal(Kind.CHUNK, OID, RANDOM, KEYS, 3)
    second = blob.seal(Kind.CHUNK, OID, RANDOM, KEYS, 3)
    assert first[HEADER.size : HEADER.size + crypto.NONCE_SIZE] != second[HEADER.size : HEADER.size + 12]
    assert blob.stored_checksum(first) != blob.stored_checksum(second)


def test_an_encrypted_object_is_refused_by_a_plain_reader_and_back() -> None:
    with pytest.raises(CorruptObject, match="encryption 1"):
        blob.unseal(NAME, Kind.CHUNK, OID, blob.seal(Kind.CHUNK, OID, RANDOM, KEYS, 3), None, len(RANDOM))
    with pytest.raises(CorruptObject, match="encryption 0"):
        blob.unseal(NAME, Kind.CHUNK, OID, blob.seal(Kind.CHUNK, OID, RANDOM, None, 3), KEYS, len(RANDOM))
