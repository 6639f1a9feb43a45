"""Keys and the primitives built on them: chunk ids, manifest MACs, AES-256-GCM, the passphrase KDF.

An encrypted repository has one 32-byte *master secret*.  Three keys are derived from it, each for one
purpose, as HMAC-SHA256(master, label)::

    enc_key = HMAC(master, "cowbackup enc")     AES-256-GCM key of every sealed object
    id_key  = HMAC(master, "cowbackup id")      chunk ids: HMAC-SHA256(id_key, plaintext)
    mac_key = HMAC(master, "cowbackup mac")     snapshot manifests: HMAC-SHA256(mac_key, canonical JSON)

Keyed chunk ids mean the store cannot confirm a guess of content.  A repository without encryption
uses plain SHA-256 for both ids and manifest checksums.

The master secret is kept wrapped: AES-256-GCM under a key derived from the passphrase with scrypt
(memory-hard; N=2^15, r=8, p=1 by default: 32 MiB and about 0.1 s here).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1


class AuthenticationFailed(Exception):
    """AES-GCM refused the ciphertext: wrong key, or altered bytes."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The derived keys of an encrypted repository."""

    enc_key: bytes
    id_key: bytes
    mac_key: bytes

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        def derive(label: bytes) -> bytes:
            return hmac.digest(master, label, "sha256")

        return cls(derive(b"cowbackup enc"), derive(b"cowbackup id"), derive(b"cowbackup mac"))


def new_master() -> bytes:
    return os.urandom(MASTER_SIZE)


def chunk_id(keys: Keys | None, data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte id of a chunk (or index segment) with plaintext ``data``."""
    if keys is None:
        return hashlib.sha256(data).digest()
    return hmac.digest(keys.id_key, data, "sha256")


def manifest_mac(keys: Keys | None, canonical: bytes) -> str:
    """The text that authenticates a manifest: ``hmac-sha256:HEX`` (encrypted) or ``sha256:HEX``."""
    if keys is None:
        return "sha256:" + hashlib.sha256(canonical).hexdigest()
    return "hmac-sha256:" + hmac.new(keys.mac_key, canonical, "sha256").hexdigest()


def encrypt(key: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM with a fresh random nonce: ``(nonce, ciphertext || tag)``."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise AuthenticationFailed from None


def passphrase_key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The 32-byte wrapping key for ``passphrase`` (scrypt)."""
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=32)
