"""The storage backend interface: a flat key-value store of immutable-ish objects.

The repository above it never knows which backend it talks to (local directory today; S3 plugs in
behind the same methods).  Every method is blocking and safe to call from several threads at once;
callers on the event loop run them in a thread pool.

Object names are ``/``-separated paths of plain segments (letters, digits, ``.``, ``_``, ``-``; no
empty, ``.`` or ``..`` segment).  :func:`check_name` enforces that for every name a backend is given,
so that a hostile name read from a repository object can never escape the store.

Durability contract: ``put``/``put_if_absent`` with ``durable=True`` return only once the object (and
its name) survive a crash.  With ``durable=False`` they may be cached; :meth:`Store.sync` then makes
everything written so far durable.  A snapshot manifest is written durably after a ``sync``.
"""

from __future__ import annotations

import abc
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cowbackup.repo.errors import CorruptObject, RepoUsageError

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing tells of one object: its name, stored size, and last-modified time (the store's
    clock, seconds since the epoch)."""

    name: str
    size: int
    mtime: float


def check_size(name: str, size: int, limit: int | None) -> None:
    """CorruptObject if an object of ``size`` bytes exceeds ``limit`` (None: no limit)."""
    if limit is not None and size > limit:
        raise CorruptObject(name, f"{size} bytes, more than the {limit} an object of its kind may have")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise RepoUsageError (never a path escape)."""
    parts = name.split("/")
    if not name or len(name) > 1024 or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise RepoUsageError(f"invalid object name {name!r}")
    if any(p in (".", "..") for p in parts):
        raise RepoUsageError(f"invalid object name {name!r}")
    return name


class Store(abc.ABC):
    """A storage backend.  Errors: MissingObject for an absent object, StoreError for anything the
    backend cannot do (I/O error, full disk, refused request)."""

    #: A URL-like description for messages (never contains credentials).
    location: str

    @abc.abstractmethod
    def get(self, name: str, *, limit: int | None = None) -> bytes:
        """The whole object.  With ``limit``, an object larger than ``limit`` bytes is CorruptObject
        before it is read: a hostile repository never makes us allocate without bound."""

    @abc.abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the object)."""

    @abc.abstractmethod
    def put(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
        """Create or atomically replace the object: readers see the old or the new bytes, never a mix."""

    @abc.abstractmethod
    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> bool:
        """Create the object unless it exists; True if this call created it, False if it was there."""

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectInfo | None:
        """The object's info, or None if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a directory-like prefix ending in ``/``, or
        ``""`` for all), in no particular order.  Objects written concurrently may or may not appear."""

    @abc.abstractmethod
    def delete(self, names: Iterable[str]) -> None:
        """Delete the objects; a name that does not exist is not an error."""

    def sync(self) -> None:  # noqa: B027 - a no-op is right for stores whose writes are durable at once
        """Make every object written so far durable."""

    def remove_partial_writes(self) -> int:
        """Remove what writers that died mid-write left behind (never visible as objects, so gc cannot
        see it); the bytes freed.  Only writes provably abandoned are removed.  Stores whose writes leave
        nothing behind have nothing to do."""
        return 0

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the backend's resources; may be called twice."""


class CountingStore(Store):
    """A store that counts the requests it forwards, by kind (what an object store bills for)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.location = inner.location
        self.counts = {"put": 0, "get": 0, "list": 0, "delete": 0, "stat": 0}
        self._lock = threading.Lock()

    def _count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] += n

    def get(self, name: str, *, limit: int | None = None) -> bytes:
        self._count("get")
        return self.inner.get(name, limit=limit)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._count("get")
        return self.inner.get_range(name, offset, length)

    def put(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
        self._count("put")
        self.inner.put(name, data, durable=durable)

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview, *, durable: bool = True) -> bool:
        self._count("put")
        return self.inner.put_if_absent(name, data, durable=durable)

    def stat(self, name: str) -> ObjectInfo | None:
        self._count("stat")
        return self.inner.stat(name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def delete(self, names: Iterable[str]) -> None:
        batch = list(names)
        self._count("delete", len(batch))
        self.inner.delete(batch)

    def sync(self) -> None:
        self.inner.sync()

    def remove_partial_writes(self) -> int:
        return self.inner.remove_partial_writes()

    def close(self) -> None:
        self.inner.close()
