"""Backup sessions: a record that says "a backup is running and may commit", for garbage collection.

A backup creates ``sessions/<id>`` (JSON: host, boot id, pid, the pid's start time) *before* it decides
that any chunk exists, and deletes it when it has committed or given up.  While it runs, a heartbeat
thread rewrites ``sessions/<id>.alive`` every :data:`HEARTBEAT` seconds.  The record's last-modified
time (the store's clock) is the session's start; GC compares it with its own markers (``gc.py``).

A session is *live* unless it is provably dead:

* on this machine (same host name and boot id): its process is gone (pid absent, or reused by a process
  that started at another time) -- so a backup killed with SIGKILL stops counting at once;
* elsewhere: neither the record nor its heartbeat changed for :data:`LEASE` seconds of store time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from cowbackup.repo.errors import ConcurrentChange, CorruptObject, MissingObject, StoreError
from cowbackup.repo.store import Store

SESSIONS = "sessions/"
HEARTBEAT = 60.0
LEASE = 600.0
MAX_RECORD = 64 * 1024


def _clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return stat.rpartition(")")[2].split()[19]


def process_record() -> bytes:
    """Who this process is (JSON: host, boot id, pid, the pid's start time), as session records and gc
    sweep markers tell it, so that others can see it die."""
    record = {
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
    }
    return json.dumps(record).encode()


def process_gone(raw: bytes) -> bool:
    """True if ``raw`` (a :func:`process_record`) names a process of this machine that no longer runs.
    A record of another machine, or one we cannot read, is never judged gone."""
    try:
        doc = json.loads(raw)
        host, boot, pid, pid_start = doc["host"], doc["boot_id"], int(doc["pid"]), str(doc["pid_start"])
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or not boot or boot != boot_id():
        return False
    return process_start(pid) != pid_start


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    host: str
    boot_id: str
    pid: int
    pid_start: str
    started: float  # store time
    last_seen: float  # store time of the latest heartbeat (or the start)

    @property
    def is_local(self) -> bool:
        """Started on this machine since its last boot: its pid tells whether it runs."""
        return self.host == socket.gethostname() and bool(self.boot_id) and self.boot_id == boot_id()

    def is_live(self, store_now: float) -> bool:
        if self.is_local:
            return process_start(self.pid) == self.pid_start
        return store_now - self.last_seen < LEASE


class Session:
    """A backup session of this process; :meth:`end` removes it (safe to call twice)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.id = secrets.token_hex(16)
        self.name = SESSIONS + self.id
        store.put_if_absent(self.name, process_record(), durable=True)
        info = store.stat(self.name)
        if info is None:
            raise StoreError(f"the session record {self.name} vanished right after it was written")
        self.started = info.mtime
        #: When the store last confirmed we are alive (the boot clock: it counts a suspended machine's
        #: sleep too): the record, then each heartbeat.  ``lapsed`` latches a gap longer than the lease.
        self.last_confirmed = _clock()
        self.lapsed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"session-{self.id[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            sent = _clock()
            if sent - self.last_confirmed > LEASE - 2 * HEARTBEAT:
                # Others may have judged us dead meanwhile; a later heartbeat does not undo that.
                self.lapsed = True
            with contextlib.suppress(StoreError):
                self.store.put(self.name + ".alive", b"", durable=False)
                self.last_confirmed = sent

    def check_fresh(self) -> None:
        """ConcurrentChange if other hosts may have declared this session dead: its last confirmed
        heartbeat is older than the lease minus a margin (the process was stopped, or the store did not
        take our heartbeats).  Then a gc may have swept chunks this backup reuses: it must not commit."""
        age = _clock() - self.last_confirmed
        if self.lapsed or age > LEASE - 2 * HEARTBEAT:
            raise ConcurrentChange(
                "this backup's session went unconfirmed for most of its lease (the process was stopped, "
                "or the store did not take its heartbeats); a gc may have removed chunks it reuses, so it "
                "does not commit -- run it again"
            )
        if self.store.stat(self.name) is None:
            raise ConcurrentChange(
                "this backup's session record is gone (another host's gc judged it dead); it does not "
                "commit -- run it again"
            )

    def end(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with contextlib.suppress(StoreError):
            self.store.delete([self.name + ".alive", self.name])

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def list_sessions(store: Store) -> list[SessionInfo]:
    """Every session record, with its heartbeat."""
    records: dict[str, float] = {}
    beats: dict[str, float] = {}
    for info in store.list(SESSIONS):
        base = info.name[len(SESSIONS) :]
        if base.endswith(".alive"):
            beats[base[: -len(".alive")]] = info.mtime
        else:
            records[base] = info.mtime
    found = []
    for sid, started in records.items():
        try:
            doc = json.loads(store.get(SESSIONS + sid, limit=MAX_RECORD))
            host, boot, pid, pid_start = doc["host"], doc["boot_id"], int(doc["pid"]), str(doc["pid_start"])
        except MissingObject:
            continue  # ended while we listed
        except (ValueError, KeyError, TypeError, RecursionError, CorruptObject):
            # A record we cannot read is live until its lease runs out: never assume a backup is dead.
            host, boot, pid, pid_start = "", "", 0, ""
        found.append(
            SessionInfo(sid, str(host), str(boot), pid, pid_start, started, max(started, beats.get(sid, 0)))
        )
    return found


def remove_dead(store: Store, sessions: list[SessionInfo], store_now: float | None) -> int:
    """Delete the records of sessions that are provably dead (a backup killed before it could remove
    its own); how many.  With ``store_now`` None (no store time at hand) only sessions of this machine
    are judged, by their pid; otherwise also those whose lease ran out."""
    dead = [
        s
        for s in sessions
        if (s.is_local or store_now is not None)
        and not s.is_live(store_now if store_now is not None else 0.0)
    ]
    store.delete(name for s in dead for name in (SESSIONS + s.id + ".alive", SESSIONS + s.id))
    return len(dead)
