"""An open repository: where objects live, how they are sealed and read, and the snapshots.

Object names (see ``docs/repository.md``)::

    config                          the repository's config (plain JSON)
    keys/repokey                    the wrapped master key (encryption repokey)
    chunks/<2 hex>/<64 hex id>      one chunk of disk data
    index/<2 hex>/<64 hex id>       an index segment
    refs/<2 hex>/<64 hex id>        a refs segment
    snapshots/<32 hex id>           a snapshot manifest
    sessions/<32 hex id>[.alive]    a backup in progress and its heartbeat
    gc/<10 digits>.<kind>           garbage-collection and quarantine records
    damage/<snapshot id>            what verify found wrong with a snapshot
    quarantine/<...>                objects verify moved out of the way

Sealing and unsealing are pure CPU work and thread-safe: writers and readers run them in worker
threads (hashlib, zstd and AES-GCM release the GIL, so every core works).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cowbackup.repo import blob, crypto, index, keys, manifest
from cowbackup.repo.blob import Kind
from cowbackup.repo.config import CONFIG_NAME, RepoConfig, load_config, new_config
from cowbackup.repo.errors import (
    CorruptObject,
    MissingObject,
    RepoError,
    RepoUsageError,
    SnapshotNotFound,
)
from cowbackup.repo.index import Entry, check_entries, entries_of, parse_entries
from cowbackup.repo.manifest import Manifest, SegmentRef
from cowbackup.repo.manifest_cache import ManifestCache
from cowbackup.repo.store import ObjectInfo, Store

log = logging.getLogger(__name__)

#: A function that returns the passphrase (asked only when a key must be unwrapped).
PassphraseSource = Callable[[], bytes]

SNAPSHOTS = "snapshots/"
MAX_DAMAGE_RECORD = 16 * 1024 * 1024
DAMAGE = "damage/"


def chunk_name(chunk_id: bytes) -> str:
    h = chunk_id.hex()
    return f"chunks/{h[:2]}/{h}"


def index_name(segment_id: bytes) -> str:
    h = segment_id.hex()
    return f"index/{h[:2]}/{h}"


def refs_name(refs_id: bytes) -> str:
    h = refs_id.hex()
    return f"refs/{h[:2]}/{h}"


def snapshot_name(snapshot_id: str) -> str:
    return SNAPSHOTS + snapshot_id


def id_from_name(name: str) -> bytes | None:
    """The 32-byte id of a ``chunks/``, ``index/`` or ``refs/`` object name, or None if it is not one."""
    parts = name.split("/")
    if len(parts) != 3 or len(parts[2]) != 64 or parts[1] != parts[2][:2]:
        return None
    try:
        return bytes.fromhex(parts[2])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SegmentData:
    """One segment of a disk, read and checked: its entries in position order."""

    first_position: int
    entries: list[Entry]


class Repository:
    """A repository opened on a store.  ``keys`` is None for an unencrypted one, and for an encrypted one
    opened without its key (``verify --no-key``, ``gc``): then only key-less operations work."""

    def __init__(
        self, store: Store, config: RepoConfig, keyset: crypto.Keys | None, master: bytes | None
    ) -> None:
        self.store = store
        self.config = config
        self.keys = keyset
        self._master = master
        self.level = config.level
        #: Manifests already read, kept locally; only with the MAC key, which can prove a kept copy
        #: authentic (a key-less reader, or a repository without encryption, reads the store always).
        #: A caller may set it to None to read every manifest from the store.
        self.manifest_cache: ManifestCache | None = (
            ManifestCache(config.id, store.location) if keyset is not None else None
        )

    # -- creating and opening ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        store: Store,
        *,
        chunk_size: int,
        encryption: str,
        level: int,
        passphrase: bytes | None,
        created: str,
    ) -> Repository:
        """``repo init``: write the key (if any), then the config (last: it makes the repository exist)."""
        if store.stat(CONFIG_NAME) is not None:
            raise RepoUsageError(f"'{store.location}' already holds a repository")
        config = new_config(chunk_size, encryption, level, created)
        master = keyset = None
        if encryption != "none":
            if not passphrase:
                raise RepoUsageError(
                    "an encrypted repository needs a passphrase (COWBACKUP_PASSWORD or --password-file)"
                )
            master = crypto.new_master()
            keyset = crypto.Keys.from_master(master)
            wrapped = keys.wrap_master(master, config.id, passphrase)
            if encryption == "repokey":
                store.put(keys.REPOKEY_NAME, wrapped)
            else:
                _write_keyfile(keys.keyfile_path(config.id), wrapped)
        if not store.put_if_absent(CONFIG_NAME, config.to_json()):
            raise RepoUsageError(f"'{store.location}' already holds a repository")
        return cls(store, config, keyset, master)

    @classmethod
    def open(cls, store: Store, passphrase: PassphraseSource | None) -> Repository:
        """Open the repository; with ``passphrase`` None an encrypted one opens without its key."""
        config = load_config(store)
        if config.encryption == "none" or passphrase is None:
            return cls(store, config, None, None)
        where, wrapped = cls._key_object(store, config)
        master = keys.unwrap_master(wrapped, config.id, passphrase(), where)
        return cls(store, config, crypto.Keys.from_master(master), master)

    @classmethod
    def open_with_master(cls, store: Store, master_file: bytes, where: str) -> Repository:
        """Open an encrypted repository with its master secret already unwrapped (the contents of a
        :func:`keys.dump_master` file, named ``where`` in errors): no scrypt.  RepoUsageError if the
        repository is not encrypted or the file is not this repository's key."""
        config = load_config(store)
        if config.encryption == "none":
            raise RepoUsageError(f"'{store.location}' is not encrypted: it takes no key")
        master = keys.load_master(master_file, config.id, where)
        return cls(store, config, crypto.Keys.from_master(master), master)

    def dump_master(self) -> bytes:
        """The master secret as an unwrapped key file (:func:`keys.dump_master`: keep it private)."""
        if self._master is None:
            raise RepoUsageError("the repository is not open with its key")
        return keys.dump_master(self._master, self.config.id)

    @staticmethod
    def _key_object(store: Store, config: RepoConfig) -> tuple[str, bytes]:
        if config.encryption == "repokey":
            try:
                return keys.REPOKEY_NAME, store.get(keys.REPOKEY_NAME, limit=keys.MAX_KEY_SIZE)
            except MissingObject:
                raise RepoError(
                    f"the repository's key ({keys.REPOKEY_NAME}) is missing; 'repo key import' a saved copy"
                ) from None
        path = keys.keyfile_path(config.id)
        try:
            with open(path, "rb") as f:
                return path, f.read(keys.MAX_KEY_SIZE + 1)
        except FileNotFoundError:
            raise RepoUsageError(
                f"no key file for repository {config.id} at {path}; 'repo key import' it"
            ) from None

    @property
    def encrypted(self) -> bool:
        return self.config.encryption != "none"

    @property
    def has_key(self) -> bool:
        return self.keys is not None or not self.encrypted

    def require_key(self) -> None:
        if not self.has_key:
            raise RepoUsageError("this operation needs the repository's key")

    # -- keys -------------------------------------------------------------------------------------

    def export_key(self) -> bytes:
        """The wrapped key object as stored (for ``repo key export``)."""
        if not self.encrypted:
            raise RepoUsageError("the repository is not encrypted: it has no key")
        return self._key_object(self.store, self.config)[1]

    def import_key(self, key_object: bytes, passphrase: bytes) -> None:
        """Install a key object after checking it opens with ``passphrase`` (for ``repo key import``)."""
        if not self.encrypted:
            raise RepoUsageError("the repository is not encrypted: it has no key")
        keys.unwrap_master(key_object, self.config.id, passphrase, "the imported key")
        self._install_key(key_object)

    def change_passphrase(self, new_passphrase: bytes) -> None:
        if self._master is None:
            raise RepoUsageError("open the repository with its current passphrase first")
        if not new_passphrase:
            raise RepoUsageError("the new passphrase is empty")
        self._install_key(keys.wrap_master(self._master, self.config.id, new_passphrase))

    def _install_key(self, key_object: bytes) -> None:
        if self.config.encryption == "repokey":
            self.store.put(keys.REPOKEY_NAME, key_object)
        else:
            _write_keyfile(keys.keyfile_path(self.config.id), key_object)

    # -- sealing ----------------------------------------------------------------------------------

    def hash(self, data: bytes | bytearray | memoryview) -> bytes:
        return crypto.chunk_id(self.keys, data)

    def seal(
        self,
        kind: Kind,
        object_id: bytes,
        plaintext: bytes | bytearray | memoryview,
        level: int | None = None,
    ) -> bytes:
        self.require_key()
        return blob.seal(kind, object_id, plaintext, self.keys, self.level if level is None else level)

    def unseal_chunk(self, entry: Entry, stored: bytes, length: int) -> bytes:
        """The plaintext of a chunk (``length`` bytes) checked against its id: authenticated in an
        encrypted repository, re-hashed in a plain one.  The stored size and checksum the index recorded
        are not required: a chunk stored again (healed after quarantine, with a fresh nonce or another
        compression level) is other bytes of the same content, and the id proves the content."""
        name = chunk_name(entry.chunk_id)
        data = blob.unseal(name, Kind.CHUNK, entry.chunk_id, stored, self.keys, length)
        if len(data) != length:
            raise CorruptObject(name, f"holds {len(data)} bytes where the disk needs {length}")
        if self.keys is None and not hmac.compare_digest(self.hash(data), entry.chunk_id):
            raise CorruptObject(name, "its contents do not hash to its id")
        return data

    def read_chunk(self, entry: Entry, length: int) -> bytes:
        stored = self.store.get(chunk_name(entry.chunk_id), limit=blob.max_stored_size(length))
        return self.unseal_chunk(entry, stored, length)

    # -- segments ---------------------------------------------------------------------------------

    def read_index(self, segment: SegmentRef) -> list[Entry]:
        """The entries of an index segment, proven by its id (authenticated, or re-hashed)."""
        return entries_of(self.read_index_plaintext(segment))

    def read_index_plaintext(self, segment: SegmentRef) -> bytes:
        """The plaintext of an index segment, proven by its id and checked entry by entry as
        :meth:`read_index` does, without making an object of each entry (an incremental copies its
        parent's segments whole)."""
        self.require_key()
        name = index_name(segment.index_id)
        limit = blob.max_stored_size(segment.entries * index.ENTRY_SIZE)
        # Proven by its id below, not by the stored checksum: a copy stored again (a rotten one replaced,
        # a fresh nonce) holds other bytes of the same content.
        stored = self.store.get(name, limit=limit)
        plaintext = blob.unseal(
            name, Kind.INDEX, segment.index_id, stored, self.keys, segment.entries * index.ENTRY_SIZE
        )
        if self.keys is None and not hmac.compare_digest(self.hash(plaintext), segment.index_id):
            raise CorruptObject(name, "its contents do not hash to its id")
        try:
            check_entries(plaintext, segment.entries)
        except ValueError as err:
            raise CorruptObject(name, str(err)) from None
        return plaintext

    def read_refs(self, segment: SegmentRef, max_entries: int) -> list[Entry]:
        """The records of a refs segment (works without the key)."""
        name = refs_name(segment.refs_id)
        limit = blob.max_stored_size(max_entries * index.ENTRY_SIZE)
        stored = self.store.get(name, limit=limit)  # proven by its id below
        plaintext = blob.unseal(
            name, Kind.REFS, segment.refs_id, stored, None, max_entries * index.ENTRY_SIZE
        )
        if not hmac.compare_digest(crypto.chunk_id(None, plaintext), segment.refs_id):
            raise CorruptObject(name, "its contents do not hash to its id")
        try:
            return parse_entries(plaintext, name, -1)
        except ValueError as err:
            raise CorruptObject(name, str(err)) from None

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        return sorted(self._listing())

    def _listing(self) -> dict[str, ObjectInfo]:
        """What ``snapshots/`` holds now, by snapshot id (names that are not snapshot ids are skipped)."""
        found = {}
        for info in self.store.list(SNAPSHOTS):
            sid = info.name[len(SNAPSHOTS) :]
            if manifest.is_snapshot_id(sid):
                found[sid] = info
        return found

    def load_manifest(self, snapshot_id: str) -> Manifest:
        """The manifest read from the store (never from the local cache: ``verify`` checks the store's
        copy), authenticated when the key is at hand (checksummed in a plain repository)."""
        name = snapshot_name(snapshot_id)
        return self._check_manifest(self.store.get(name, limit=manifest.MAX_MANIFEST_SIZE), name)

    def _check_manifest(self, raw: bytes, name: str) -> Manifest:
        parsed, canonical, mac = manifest.decode(raw, name)
        if parsed.repository != self.config.id:
            raise CorruptObject(name, f"belongs to repository {parsed.repository}")
        if self.has_key and not hmac.compare_digest(crypto.manifest_mac(self.keys, canonical), mac):
            raise CorruptObject(name, "manifest authentication failed (altered, or written with another key)")
        return parsed

    def _listed_manifest(self, snapshot_id: str, listed: ObjectInfo) -> Manifest:
        """The manifest a listing showed as ``listed``: the local cache's copy if it holds this very
        object and it passes every check a copy from the store must pass, MAC included; otherwise read
        from the store and, once checked, kept in the cache."""
        name = snapshot_name(snapshot_id)
        cache = self.manifest_cache
        if cache is not None:
            kept = cache.load(snapshot_id, listed)
            if kept is not None:
                try:
                    return self._check_manifest(kept, name)
                except CorruptObject as err:
                    log.warning("manifest cache: %s is unsound (%s); read again", name, err.problem)
        raw = self.store.get(name, limit=manifest.MAX_MANIFEST_SIZE)
        snap = self._check_manifest(raw, name)
        if cache is not None:
            cache.save(snapshot_id, listed, raw)
        return snap

    def snapshots(self, *, skip_corrupt: bool = False) -> list[Manifest]:
        """Every snapshot, oldest first (deleted meanwhile: skipped).

        One listing of ``snapshots/``; a manifest is read from the store only when the local manifest
        cache has no sound copy of it (:mod:`.manifest_cache`), so a second call reads none that did not
        change.  The listing decides which snapshots exist: the cache forgets every other id.
        """
        listing = self._listing()
        if self.manifest_cache is not None:
            self.manifest_cache.retain(set(listing))
        found = []
        for sid in sorted(listing):
            try:
                found.append(self._listed_manifest(sid, listing[sid]))
            except MissingObject:
                continue
            except CorruptObject:
                if not skip_corrupt:
                    raise
        found.sort(key=lambda m: (m.time, m.id))
        return found

    def resolve(self, spec: str) -> Manifest:
        """A snapshot by id or unique id prefix (at least 4 hex digits), or ``latest`` / ``NAME@latest``."""
        if spec == "latest" or spec.endswith("@latest"):
            wanted = None if spec == "latest" else spec[: -len("@latest")]
            candidates = [m for m in self.snapshots() if wanted is None or m.name == wanted]
            if not candidates:
                raise SnapshotNotFound(
                    f"no snapshot{' named ' + repr(wanted) if wanted else ''} in the repository"
                )
            return candidates[-1]
        if len(spec) < 4 or not all(c in "0123456789abcdef" for c in spec):
            raise SnapshotNotFound(f"'{spec}' is not a snapshot id (at least 4 hex digits) or 'latest'")
        listing = self._listing()
        matches = [sid for sid in listing if sid.startswith(spec)]
        if not matches:
            raise SnapshotNotFound(f"no snapshot '{spec}' in the repository")
        if len(matches) > 1:
            raise SnapshotNotFound(f"'{spec}' matches {len(matches)} snapshots; give more digits")
        return self._listed_manifest(matches[0], listing[matches[0]])

    def commit(self, snap: Manifest, last_check: Callable[[], None] | None = None) -> None:
        """Write the manifest -- the commit point.  Everything it references must be written already:
        this makes it durable first (``sync``), runs ``last_check`` (a backup's lease, as late as it
        can be), then puts the manifest durably, never over another."""
        self.require_key()
        canonical = manifest.canonical(snap.body())
        data = manifest.encode(snap, crypto.manifest_mac(self.keys, canonical))
        self.store.sync()
        if last_check is not None:
            last_check()
        if not self.store.put_if_absent(snapshot_name(snap.id), data, durable=True):
            raise RepoError(f"snapshot {snap.id} exists already")

    # -- damage records -----------------------------------------------------------------------------

    def damage(self) -> dict[str, dict[str, Any]]:
        """What verify recorded as damaged, by snapshot id."""
        found: dict[str, dict[str, Any]] = {}
        for info in self.store.list(DAMAGE):
            sid = info.name[len(DAMAGE) :]
            if not manifest.is_snapshot_id(sid) or info.size > MAX_DAMAGE_RECORD:
                continue
            try:
                doc = json.loads(self.store.get(info.name, limit=MAX_DAMAGE_RECORD))
            except (MissingObject, CorruptObject, ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                found[sid] = doc
        return found


def _write_keyfile(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
