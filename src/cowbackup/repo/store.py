"""The storage backend interface: a flat key-value store of immutable-ish objects.

The repository above it never knows which backend it talks to (local directory today; S3 plugs in
behind the same methods).  Every method is blocking and safe to call from several threads at once;
callers on the event loop run them in a thread pool.

Object names are ``/``-separated paths of plain segments (letters, digits, ``.``, ``_``, ``-``; no
empty, ``.`` or ``..`` segment).  :func:`check_name` enforces that for every name a backend is given,
so that a hostile name read from a repository object can never escape the store.

Requests: every backend counts what it sends in :attr:`Store.requests` (a :class:`RequestCounts`), in the
units an object store bills -- see that class for the conventions.

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


#: The kinds of requests counted, as ``requests_<kind>`` keys in backup stats.
REQUEST_KINDS = ("put", "get", "stat", "list", "delete")
#: Most names one delete request carries (S3's DeleteObjects limit); local stores count the same way.
DELETE_BATCH = 1000
#: Most names one listing page carries (S3's ListObjectsV2 limit); local stores count the same way.
LIST_PAGE = 1000


class RequestCounts:
    """The requests a store has sent, by kind, as a bill counts them (thread-safe).

    ============  =====================================================================================
    ``put``       each PutObject; a multipart upload is its CreateMultipartUpload, each UploadPart and
                  the CompleteMultipartUpload
    ``get``       each GetObject, whole or ranged
    ``stat``      each HeadObject (and the HeadBucket when a store is opened)
    ``list``      each page of a listing (S3 returns at most 1,000 keys a page)
    ``delete``    each delete *request*: a DeleteObjects of up to 1,000 names counts one, whatever the
                  number of names (and AbortMultipartUpload one); deleted objects are not counted
    ``retries``   attempts that repeated a failed one (also counted in their kind above: a store bills
                  the attempts it received)
    ============  =====================================================================================

    A local directory counts its calls the same way (a listing is one page per 1,000 names, a delete one
    per 1,000 names), so that the numbers compare across backends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((*REQUEST_KINDS, "retries"), 0)

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def snapshot(self) -> dict[str, int]:
        """The counts so far: ``{kind: n}`` for every kind and ``retries``."""
        with self._lock:
            return dict(self._counts)

    def paged(self, listing: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
        """``listing`` passed through, counting one ``list`` request per LIST_PAGE names (at least one):
        for backends that have no pages of their own."""
        self.add("list")
        for n, info in enumerate(listing):
            if n and n % LIST_PAGE == 0:
                self.add("list")
            yield info

    def deleted(self, names: int) -> None:
        """Count the delete requests of ``names`` names sent in batches of DELETE_BATCH."""
        self.add("delete", -(-names // DELETE_BATCH))

    @staticmethod
    def since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
        """What was sent between two snapshots."""
        return {kind: now[kind] - before.get(kind, 0) for kind in now}


class Store(abc.ABC):
    """A storage backend.  Errors: MissingObject for an absent object, StoreError for anything the
    backend cannot do (I/O error, full disk, refused request)."""

    #: A URL-like description for messages (never contains credentials).
    location: str
    #: What this store has sent so far (every backend creates its own in ``__init__``).
    requests: RequestCounts

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
