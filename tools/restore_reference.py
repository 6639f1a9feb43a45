#!/usr/bin/env python3
"""Restore one disk of a cowbackup snapshot to a sparse raw file -- written from docs/repository.md alone.

    python tools/restore_reference.py REPO SNAPSHOT_ID_OR_PREFIX OUTPUT [--disk NAME]
                                      [--password-file F]       (or COWBACKUP_PASSWORD)

An independent reader: the standard library, ``cryptography`` and zstd only, no ``cowbackup`` import,
so that the format document is proved complete.  It trusts nothing it reads: the manifest is
authenticated, every object's stored size and SHA-256 are checked against the record that names it,
every sealed object is authenticated (encrypted repository) and re-hashed to its id, and no path it
opens may lead outside REPO.  Zero chunks are never written: they stay holes in OUTPUT.  On any error
OUTPUT is removed and the exit code is 1 (2 for a usage error or a wrong passphrase).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import struct
import sys
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

HEADER = struct.Struct(">4sBBBBQ")  # magic, kind, compression, encryption, reserved, plaintext length
ENTRY = struct.Struct(">32sI32s")  # chunk id, stored length, SHA-256 of the stored bytes
KIND_CHUNK, KIND_INDEX = 1, 2
HEX32, HEX64 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{64}")
MAX_CONFIG, MAX_KEY, MAX_MANIFEST = 64 * 1024, 16 * 1024, 64 * 1024 * 1024


class Corrupt(Exception):
    """The repository is damaged, altered, or not what it claims (exit 1)."""


class Usage(Exception):
    """The request or the passphrase is wrong (exit 2)."""


class Repo:
    def __init__(self, root: str, passphrase: bytes | None) -> None:
        self.root = os.path.realpath(root)
        config = self.read_json("config", MAX_CONFIG)
        if config.get("format") != "cowbackup-repository" or config.get("version") != 1:
            raise Usage(f"'{root}' is not a version 1 cowbackup repository")
        self.id = config["id"]
        if not isinstance(self.id, str) or not HEX32.fullmatch(self.id):
            raise Corrupt("config: bad repository id")
        self.encrypted = config["encryption"] != "none"
        self.enc_key = self.id_key = self.mac_key = b""
        if self.encrypted:
            master = self.unwrap_master(config["encryption"], passphrase)
            self.enc_key, self.id_key, self.mac_key = (
                hmac.digest(master, label, "sha256")
                for label in (b"cowbackup enc", b"cowbackup id", b"cowbackup mac")
            )

    # -- objects ----------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        """The file of object ``name``; it must resolve (symbolic links followed) inside the repository."""
        if not re.fullmatch(r"[a-z]+(/[0-9a-z]+)*", name):
            raise Corrupt(f"refusing object name {name!r}")
        real = os.path.realpath(os.path.join(self.root, name))
        if not real.startswith(self.root + os.sep):
            raise Corrupt(f"object '{name}' leads outside the repository")
        return real

    def read(self, name: str, limit: int) -> bytes:
        """The object's bytes; Corrupt if it is missing or larger than ``limit`` (read no more)."""
        try:
            with open(self.path(name), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise Corrupt(f"object '{name}' is missing") from None
        if len(data) > limit:
            raise Corrupt(f"object '{name}' is larger than {limit} bytes")
        return data

    def read_json(self, name: str, limit: int) -> dict[str, Any]:
        try:
            doc = json.loads(self.read(name, limit))
        except ValueError as err:
            raise Corrupt(f"object '{name}' is not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise Corrupt(f"object '{name}' is not a JSON object")
        return doc

    def read_checked(self, name: str, size: int, sha256: bytes) -> bytes:
        """An object that a manifest or index entry names with its stored size and checksum."""
        stored = self.read(name, size)
        if len(stored) != size or not hmac.compare_digest(hashlib.sha256(stored).digest(), sha256):
            raise Corrupt(f"object '{name}': stored size or checksum differs from its record")
        return stored

    # -- keys and sealed objects --------------------------------------------------------------------

    def unwrap_master(self, mode: str, passphrase: bytes | None) -> bytes:
        if mode == "repokey":
            name, raw = "keys/repokey", self.read("keys/repokey", MAX_KEY)
        else:
            base = os.environ.get("COWBACKUP_KEYS_DIR") or os.path.join(
                os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "cowbackup", "keys"
            )
            name = os.path.join(base, self.id)
            with open(name, "rb") as f:
                raw = f.read(MAX_KEY + 1)
        if passphrase is None:
            raise Usage("the repository is encrypted: give --password-file or COWBACKUP_PASSWORD")
        try:
            key = json.loads(raw)
            kdf = key["kdf"]
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            salt, nonce, wrapped = (base64.b64decode(v) for v in (kdf["salt"], key["nonce"], key["wrapped"]))
            ok = key["format"] == "cowbackup-key" and kdf["name"] == "scrypt" and key["repository"] == self.id
        except (ValueError, KeyError, TypeError) as err:
            raise Corrupt(f"key '{name}' is malformed: {err}") from None
        if (
            len(raw) > MAX_KEY
            or not ok
            or not (2 <= n <= 1 << 20 and n & (n - 1) == 0 and r <= 32 and p <= 16)
        ):
            raise Corrupt(f"key '{name}' is not this repository's, or its scrypt parameters are out of range")
        wrapping = hashlib.scrypt(
            passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=32
        )
        try:
            return AESGCM(wrapping).decrypt(nonce, wrapped, b"cowbackup-key:" + self.id.encode())
        except InvalidTag:
            raise Usage("wrong passphrase") from None

    def object_id(self, plaintext: bytes) -> bytes:
        """The id of a chunk or index segment: keyed in an encrypted repository, plain SHA-256 otherwise."""
        if self.encrypted:
            return hmac.digest(self.id_key, plaintext, "sha256")
        return hashlib.sha256(plaintext).digest()

    def unseal(self, name: str, kind: int, object_id: bytes, stored: bytes, length: int) -> bytes:
        """The plaintext of a sealed object, which must be exactly ``length`` bytes and hash to its id."""
        if len(stored) < HEADER.size:
            raise Corrupt(f"object '{name}' is truncated")
        magic, got_kind, compression, encryption, reserved, announced = HEADER.unpack_from(stored)
        if (magic, got_kind, reserved, announced) != (b"CWBK", kind, 0, length) or compression not in (0, 1):
            raise Corrupt(f"object '{name}' has a bad header")
        if encryption != (1 if self.encrypted else 0):
            raise Corrupt(f"object '{name}' has the wrong encryption")
        body = stored[HEADER.size :]
        if self.encrypted:
            try:
                body = AESGCM(self.enc_key).decrypt(body[:12], body[12:], stored[: HEADER.size] + object_id)
            except (InvalidTag, ValueError):
                raise Corrupt(f"object '{name}' fails authentication") from None
        if compression == 1:
            try:
                decompressor = zstd.ZstdDecompressor()
                body = decompressor.decompress(body, max_length=length + 1)
            except zstd.ZstdError as err:
                raise Corrupt(f"object '{name}' does not decompress: {err}") from None
            if not decompressor.eof or decompressor.unused_data:
                raise Corrupt(f"object '{name}' is not exactly one zstd frame")
        if len(body) != length or not hmac.compare_digest(self.object_id(body), object_id):
            raise Corrupt(f"object '{name}' does not hold the data its id names")
        return body

    # -- snapshots --------------------------------------------------------------------------------

    def find_snapshot(self, prefix: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{1,32}", prefix):
            raise Usage(f"'{prefix}' is not a snapshot id or prefix")
        try:
            names = os.listdir(os.path.join(self.root, "snapshots"))
        except FileNotFoundError:
            names = []
        matches = [n for n in names if HEX32.fullmatch(n) and n.startswith(prefix)]
        if len(matches) != 1:
            raise Usage(f"'{prefix}' matches {len(matches)} snapshots")
        return matches[0]

    def manifest(self, sid: str) -> dict[str, Any]:
        """The authenticated manifest body of snapshot ``sid``."""
        name = f"snapshots/{sid}"
        doc = self.read_json(name, MAX_MANIFEST)
        body, mac = doc.get("manifest"), doc.get("mac")
        if doc.get("format") != "cowbackup-snapshot" or doc.get("version") != 1 or not isinstance(body, dict):
            raise Corrupt(f"object '{name}' is not a version 1 snapshot manifest")
        try:
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Corrupt(f"object '{name}' holds text that is not UTF-8") from None
        if self.encrypted:
            expected = "hmac-sha256:" + hmac.new(self.mac_key, canonical, "sha256").hexdigest()
        else:
            expected = "sha256:" + hashlib.sha256(canonical).hexdigest()
        if not isinstance(mac, str) or not hmac.compare_digest(expected.encode(), mac.encode()):
            raise Corrupt(f"object '{name}': manifest authentication failed")
        if body.get("id") != sid or body.get("repository") != self.id:
            raise Corrupt(f"object '{name}' belongs to another snapshot or repository")
        return body


def restore(repo: Repo, disk: dict[str, Any], out: int) -> None:
    size, cs, per_segment, segments = (
        disk["size"],
        disk["chunk_size"],
        disk["segment_entries"],
        disk["segments"],
    )
    sane = all(isinstance(v, int) and not isinstance(v, bool) for v in (size, cs, per_segment))
    if not sane or not (0 <= size < 1 << 62 and 1 << 16 <= cs <= 1 << 24 and 1 <= per_segment <= 1 << 20):
        raise Corrupt("disk record out of range")
    positions = -(-size // cs)
    if cs & (cs - 1) or not isinstance(segments, list) or len(segments) != -(-positions // per_segment):
        raise Corrupt("disk record: chunk size or segment count inconsistent")
    os.ftruncate(out, size)  # every byte not written below reads as zero: a hole
    for s, seg in enumerate(segments):
        first = s * per_segment
        count = min(per_segment, positions - first)
        if seg.get("entries") != count or not all(
            HEX64.fullmatch(str(seg.get(k))) for k in ("index", "index_sha256")
        ):
            raise Corrupt(f"segment {s}: malformed record")
        index_id = bytes.fromhex(seg["index"])
        name = f"index/{seg['index'][:2]}/{seg['index']}"
        stored = repo.read_checked(name, int(seg["index_size"]), bytes.fromhex(seg["index_sha256"]))
        entries = repo.unseal(name, KIND_INDEX, index_id, stored, count * ENTRY.size)
        for i, (chunk_id, stored_size, checksum) in enumerate(ENTRY.iter_unpack(entries)):
            if chunk_id == bytes(32):
                if stored_size or any(checksum):
                    raise Corrupt(f"{name}: a zero entry that is not all zero")
                continue
            offset = (first + i) * cs
            hex_id = chunk_id.hex()
            chunk = f"chunks/{hex_id[:2]}/{hex_id}"
            data = repo.unseal(
                chunk,
                KIND_CHUNK,
                chunk_id,
                repo.read_checked(chunk, stored_size, checksum),
                min(cs, size - offset),
            )
            os.pwrite(out, data, offset)
    os.fsync(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repo")
    parser.add_argument("snapshot", metavar="SNAPSHOT_ID_OR_PREFIX")
    parser.add_argument("output", help="a raw file to create (it must not exist)")
    parser.add_argument("--disk", help="the disk's name (needed when the snapshot has several)")
    parser.add_argument("--password-file", help="read the passphrase from this file's first line")
    args = parser.parse_args(argv)
    out = -1
    try:
        if args.password_file:
            with open(args.password_file, "rb") as f:
                passphrase: bytes | None = f.readline().rstrip(b"\r\n")
        else:
            env = os.environ.get("COWBACKUP_PASSWORD")
            passphrase = env.encode() if env else None
        repo = Repo(args.repo, passphrase)
        body = repo.manifest(repo.find_snapshot(args.snapshot))
        disks = [d for d in body["disks"] if args.disk is None or d.get("name") == args.disk]
        if len(disks) != 1:
            raise Usage(f"snapshot has {len(body['disks'])} disk(s); name one that exists with --disk")
        out = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        restore(repo, disks[0], out)
    except (Corrupt, Usage, OSError, AttributeError, KeyError, TypeError, ValueError) as err:
        if out >= 0:
            os.unlink(args.output)
        sys.stderr.write(f"restore_reference: {type(err).__name__}: {err}\n")
        return 2 if isinstance(err, Usage) else 1
    finally:
        if out >= 0:
            os.close(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
