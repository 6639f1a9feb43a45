"""Garbage collection that is safe while backups run, from any number of hosts, with no lock.

Records in ``gc/`` (one sequence of numbers shared by all kinds; a number is taken with put-if-absent)::

    gc/<seq>.condemned   JSON {"seq": N, "kind": "condemned", "names": [...]}: objects that no
                         snapshot referenced when this record was written (mark phase)
    gc/<seq>.quarantine  the same for objects verify moved to quarantine/ (already gone)
    gc/<seq>.sweep       marker: a gc is deleting the objects of record <seq>; JSON naming the gc's
                         process as a session record does (host, boot id, pid, the pid's start)
    gc/<seq>.done        marker: record <seq> is swept

The protocol (``docs/repository.md`` proves it step by step):

1. **Mark.**  List snapshots, read their refs (no key needed), list ``chunks/``, ``index/``, ``refs/``;
   write what nothing references as a new ``condemned`` record.  Nothing is deleted.
2. **Sweep** a condemned record: write its ``.sweep`` marker (store time T_M), then list sessions.  If a
   live session started at or before T_M (+ the clock-skew allowance), postpone: remove the marker and
   leave the record for a later gc.  Otherwise list the snapshots again and delete the record's objects
   that no snapshot references now; then write ``.done``.
3. A **backup** writes its session record first, then lists ``gc/``.  If it sees a sweep in progress it
   waits for it to finish (sweeps are short: they only delete), or for its gc to be provably dead (a
   process of this machine that is gone deletes nothing more).  It forgets every object of every
   swept or quarantine record it has not seen before (so its chunk cache never names a deleted object).

Why a chunk a backup reuses can never be deleted under it: a session either started before the sweep
marker, and then the sweep is postponed until that backup has committed (and its snapshot protects the
chunk) or died; or it started after, and then it saw the marker, waited, and no longer believes in any
object the sweep deleted.  Objects a backup uploads but has not yet committed are protected the same
way.  No atime, no lock that blocks backups; sweeps only wait for older backups to end.

Store times may be coarse: S3 gives Last-Modified in whole seconds, and the S3 backend floors every time
to the second.  Flooring keeps the order of a single clock (a session written before the marker never
reads as later), and the test ``started <= marked_at + clock_skew`` counts a tie as "before": a coarse
clock only postpones more sweeps.  With several gateway servers whose clocks differ by up to D seconds,
``clock_skew`` must be at least D rounded up to a whole second; the default (1 s) covers servers within
a second of each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cowbackup.repo.errors import ConcurrentChange, CorruptObject, MissingObject, RepoError
from cowbackup.repo.repository import (
    DAMAGE,
    Repository,
    chunk_name,
    index_name,
    refs_name,
)
from cowbackup.repo.sessions import list_sessions, process_gone, process_record, remove_dead
from cowbackup.repo.store import Store

log = logging.getLogger(__name__)

GC = "gc/"
GARBAGE_PREFIXES = ("chunks/", "index/", "refs/")
#: A sweep marker older than this (store time) belongs to a gc that died; a sweeper stops deleting
#: before half of it has passed.
SWEEP_LEASE = 300.0
#: How far apart the clocks of the store's servers may be, in whole seconds when store times are (only
#: matters for S3 stores with several servers; a local store has one clock).
DEFAULT_CLOCK_SKEW = 1.0
#: How many records are kept; a chunk cache that missed more than this many is rebuilt.
KEEP_RECORDS = 200
#: A sweep marker names its gc process (a few hundred bytes of JSON).
MAX_RECORD_MARKER = 64 * 1024
_GARBAGE_NAME = re.compile(r"(chunks|index|refs)/([0-9a-f]{2})/\2[0-9a-f]{62}")
#: A condemned list of 4 million names; larger records are refused as corrupt.
MAX_RECORD = 512 * 1024 * 1024
_RECORD = re.compile(r"gc/(\d{10})\.(condemned|quarantine|sweep|done)")

#: Called at each step of a gc with the step's name (deterministic interleaving in tests).
StepHook = Callable[[str], None]


@dataclass
class GcState:
    """What ``gc/`` holds: for each sequence number, its kinds and their store times."""

    records: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def highest(self) -> int:
        return max(self.records, default=0)

    def is_swept(self, seq: int) -> bool:
        """Record ``seq`` will delete nothing more: its condemned part (if any; a quarantine record may
        share the number) is done.  A number left with markers only (pruning cut short) is swept."""
        kinds = self.records.get(seq, {})
        return "condemned" not in kinds or "done" in kinds

    def sweeps_in_progress(self, now: float) -> list[int]:
        return [
            seq
            for seq, kinds in self.records.items()
            if "sweep" in kinds and "done" not in kinds and now - kinds["sweep"] < SWEEP_LEASE
        ]


def record_name(seq: int, kind: str) -> str:
    return f"{GC}{seq:010d}.{kind}"


def read_state(store: Store) -> GcState:
    state = GcState()
    for info in store.list(GC):
        m = _RECORD.fullmatch(info.name)
        if m:
            state.records.setdefault(int(m.group(1)), {})[m.group(2)] = info.mtime
    return state


def read_names(store: Store, seq: int, kind: str) -> list[str]:
    """The object names of record ``seq``; CorruptObject if it is malformed."""
    name = record_name(seq, kind)
    try:
        doc = json.loads(store.get(name, limit=MAX_RECORD))
        names = doc["names"]
        if doc["seq"] != seq or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CorruptObject(name, f"malformed gc record ({type(err).__name__})") from None
    # Only well-formed object names: a hostile record cannot make gc delete anything else.
    return [n for n in names if _GARBAGE_NAME.fullmatch(n)]


def write_record(store: Store, kind: str, names: Iterable[str]) -> int:
    """Write a new record of ``kind`` under the next free sequence number; that number."""
    listed = sorted(names)
    seq = read_state(store).highest + 1
    for _ in range(1000):
        body = json.dumps({"seq": seq, "kind": kind, "names": listed}).encode()
        if store.put_if_absent(record_name(seq, kind), body, durable=True):
            return seq
        seq = max(seq + 1, read_state(store).highest + 1)
    raise ConcurrentChange("could not take a gc sequence number (too many concurrent writers)")


def wait_for_sweeps(store: Store, session_started: float, timeout: float = SWEEP_LEASE) -> GcState:
    """For a backup that has written its session record: wait until no sweep is in progress; the state
    of ``gc/`` it may then rely on."""
    begun = time.monotonic()
    while True:
        state = read_state(store)
        # The store's clock now, near enough: the session's start (store time) plus what has passed.
        sweeping = state.sweeps_in_progress(session_started + time.monotonic() - begun)
        # A gc killed while sweeping leaves its marker: waiting out its lease would stall every backup
        # for minutes.  One provably dead (its process on this machine is gone) deletes nothing more.
        if all(_sweeper_gone(store, seq) for seq in sweeping):
            return state
        if time.monotonic() - begun > timeout:
            raise ConcurrentChange("a garbage collection has been deleting for too long; try again later")
        time.sleep(0.1)


def _sweeper_gone(store: Store, seq: int) -> bool:
    try:
        return _holder_gone(store.get(record_name(seq, "sweep"), limit=MAX_RECORD_MARKER))
    except MissingObject:
        return True  # the sweep ended while we looked
    except CorruptObject:
        return False  # not readable: its lease decides


def referenced(repo: Repository) -> set[str]:
    """Names of every chunk, index and refs object a committed snapshot needs (no key needed).

    RepoError if a snapshot cannot be read: gc never guesses what an unreadable snapshot needs.
    """
    names: set[str] = set()
    seen_refs: set[bytes] = set()
    for sid in repo.snapshot_ids():
        try:
            snap = repo.load_manifest(sid)
        except MissingObject:
            continue  # forgotten while we listed
        except CorruptObject as err:
            raise RepoError(f"gc stops: {err}; run verify, and forget that snapshot if it is lost") from None
        for disk in snap.disks:
            for seg in disk.segments:
                names.add(index_name(seg.index_id))
                names.add(refs_name(seg.refs_id))
                if seg.refs_id in seen_refs:
                    continue
                seen_refs.add(seg.refs_id)
                try:
                    refs = repo.read_refs(seg, seg.entries)
                except (MissingObject, CorruptObject) as err:
                    raise RepoError(f"gc stops: snapshot {sid[:8]}: {err}; run verify") from None
                names.update(chunk_name(e.chunk_id) for e in refs)
    return names


@dataclass
class GcResult:
    referenced: int = 0
    condemned: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    postponed: list[int] = field(default_factory=list)
    swept: list[int] = field(default_factory=list)


def collect(
    repo: Repository,
    *,
    dry_run: bool = False,
    clock_skew: float = DEFAULT_CLOCK_SKEW,
    step: StepHook | None = None,
) -> GcResult:
    """One gc run: sweep the pending records it safely can, mark what is unreferenced now, and sweep
    that at once too if no backup is running.  ``dry_run`` only counts."""
    store = repo.store
    hook = step or (lambda _name: None)
    result = GcResult()
    state = read_state(store)
    pending = sorted(s for s, kinds in state.records.items() if "condemned" in kinds and "done" not in kinds)
    if not dry_run:
        # Leftovers of writers killed mid-write: never objects, so the mark phase cannot see them.
        result.deleted_bytes += store.remove_partial_writes()
        remove_dead(store, list_sessions(store), None)
        for seq in pending:
            _sweep(repo, seq, clock_skew, hook, result)
    hook("mark")
    keep = referenced(repo)
    result.referenced = len(keep)
    sizes = {}
    for prefix in GARBAGE_PREFIXES:
        for info in store.list(prefix):
            if info.name not in keep:
                sizes[info.name] = info.size
    hook("marked")
    result.condemned = len(sizes)
    if dry_run:
        result.deleted_bytes = sum(sizes.values())
        return result
    if sizes:
        seq = write_record(store, "condemned", sizes)
        hook("condemned")
        _sweep(repo, seq, clock_skew, hook, result, sizes)
    _prune_records(store)
    # Damage records of snapshots that were forgotten since.
    live = set(repo.snapshot_ids())
    store.delete(info.name for info in store.list(DAMAGE) if info.name[len(DAMAGE) :] not in live)
    return result


def _sweep(
    repo: Repository,
    seq: int,
    clock_skew: float,
    hook: StepHook,
    result: GcResult,
    sizes: dict[str, int] | None = None,
) -> None:
    store = repo.store
    names = read_names(store, seq, "condemned")
    marker = record_name(seq, "sweep")
    mine = _take_marker(store, marker)
    if mine is None:
        log.info("gc: record %d is being swept by another gc; left to it", seq)
        result.postponed.append(seq)
        return
    info = store.stat(marker)
    marked_at = info.mtime if info is not None else time.time()
    started = time.monotonic()
    hook("sweep-marker")
    sessions = list_sessions(store)
    older = [s for s in sessions if s.started <= marked_at + clock_skew and s.is_live(marked_at)]
    remove_dead(store, sessions, marked_at)
    if older:
        log.info("gc: record %d postponed: %d backup(s) started before the sweep", seq, len(older))
        _release_marker(store, marker, mine)
        result.postponed.append(seq)
        return
    try:
        hook("sessions-checked")
        keep = referenced(repo)
        hook("rereferenced")
        doomed = [n for n in names if n not in keep]
        for i in range(0, len(doomed), 1000):
            if time.monotonic() - started > SWEEP_LEASE / 2:
                # Backups treat our marker as dead after SWEEP_LEASE: stop well before; a later gc goes on
                # (the record stays pending, and chunk caches forget pending records' objects too).
                log.warning("gc: sweep of record %d took too long; a later gc finishes it", seq)
                result.postponed.append(seq)
                return
            if not _still_mine(store, marker, mine):
                # Another gc judged us dead and took the record over: it sweeps with its own view.
                log.warning("gc: lost the sweep of record %d to another gc", seq)
                return
            batch = doomed[i : i + 1000]
            store.delete(batch)
            result.deleted += len(batch)
            if sizes is not None:
                result.deleted_bytes += sum(sizes.get(n, 0) for n in batch)
        hook("deleted")
        store.put(record_name(seq, "done"), b"", durable=True)
        result.swept.append(seq)
    finally:
        # Waiting backups go on once the marker is gone (or, if we die here, once it is stale).
        with contextlib.suppress(RepoError):
            _release_marker(store, marker, mine)


def _take_marker(store: Store, marker: str) -> bytes | None:
    """Become the only sweeper of a record: its marker, put if absent, naming us (with a token, so two
    gc processes of one host differ).  A marker that is there already belongs to another gc, unless
    that gc is provably dead (its process gone, or its lease run out): then it is replaced -- deleted,
    and put if absent again, so that of two gc runs replacing it at once only one wins.  None if
    another gc holds the record."""
    body = json.dumps({"gc": json.loads(process_record()), "token": secrets.token_hex(8)}).encode()
    for _ in range(2):
        if store.put_if_absent(marker, body, durable=True):
            return body
        info = store.stat(marker)
        if info is None:
            continue  # released meanwhile
        try:
            holder = store.get(marker, limit=MAX_RECORD_MARKER)
        except (MissingObject, CorruptObject):
            continue
        stale = store_now(store) - info.mtime > SWEEP_LEASE
        if not (stale or _holder_gone(holder)):
            return None
        if _still_mine(store, marker, holder):  # unchanged since we judged it: replace it
            store.delete([marker])
    return None


def _holder_gone(marker: bytes) -> bool:
    """True if the gc process a sweep marker names provably no longer runs (see process_gone)."""
    try:
        doc = json.loads(marker)
        holder = doc["gc"] if isinstance(doc, dict) else None
    except (ValueError, KeyError, TypeError, RecursionError):
        return False
    return isinstance(holder, dict) and process_gone(json.dumps(holder).encode())


def _still_mine(store: Store, marker: str, body: bytes) -> bool:
    try:
        return store.get(marker, limit=MAX_RECORD_MARKER) == body
    except (MissingObject, CorruptObject):
        return False


def _release_marker(store: Store, marker: str, body: bytes) -> None:
    """Delete the marker if it is still ours (another gc may have taken over a marker it judged dead)."""
    if _still_mine(store, marker, body):
        store.delete([marker])


def store_now(store: Store) -> float:
    """The store's clock: the last-modified time of an object written just now."""
    store.put(GC + "clock", b"", durable=False)
    info = store.stat(GC + "clock")
    if info is None:
        raise ConcurrentChange("gc/clock vanished right after it was written")
    return info.mtime


def _prune_records(store: Store) -> None:
    state = read_state(store)
    cutoff = state.highest - KEEP_RECORDS
    old = [s for s in state.records if s <= cutoff and state.is_swept(s)]
    # Records before markers: cut short, this leaves inert markers, never a condemned record without
    # its ``done`` (which a later gc would sweep again behind the caches' backs).
    first = ("condemned", "quarantine")
    store.delete(record_name(s, kind) for s in old for kind in first if kind in state.records[s])
    store.delete(record_name(s, kind) for s in old for kind in state.records[s] if kind not in first)
