"""GC and backups interleaved deterministically, at every step where a race could hide.

The race the protocol must win (issue 12): a backup finds a chunk already stored (D, held by snapshot
``old``), then ``old`` is forgotten and a gc removes what referenced D, then the backup commits a
snapshot that needs D.  Here a :class:`Driven` backup runs phase by phase (start / write_disk / commit
/ close) on its own event loop thread, and ``gc.collect``'s step hook runs the phases placed at each of
its steps.  For every placement of the four phases among gc's steps, the committed snapshot must restore
exactly, verify must be clean, and a later gc with no backup running must leave no unreferenced object.

The copies of the template repository live in stores made by the ``new_store`` fixture: a directory
here; ``tests/integration/test_s3_gc_races.py`` overrides it with S3 on Ceph and runs these tests again
(and :func:`interleave` on a spread of placements: each costs a few hundred requests there).

A ``start`` placed while a sweep marker is present must wait for the sweep: it is left running, and the
phases after it run once gc has returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowbackup.repo import gc, sessions
from cowbackup.repo.manifest import DiskRecord, Manifest
from cowbackup.repo.repository import Repository, chunk_name, snapshot_name
from cowbackup.repo.store import Store
from cowbackup.repo.store_local import LocalStore
from cowbackup.repo.verify import verify
from cowbackup.repo.writer import BackupRun

from .helpers import CHUNK, backup, data, memory_disk, new_repo, reopen, restore

D, E, F = data(10), data(11), data(12)
OLD_DISK = D + E + bytes(CHUNK)
NEW_DISK = bytes(CHUNK) + D + F

PHASES = ("start", "write_disk", "commit", "close")
#: Where a phase may run: before gc, at one of gc's steps, or after gc returned.
STEPS = ("mark", "marked", "condemned", "sweep-marker", "sessions-checked", "rereferenced", "deleted")
SLOTS = ("before", *STEPS, "after")
#: Steps at which gc's sweep marker is in the store (a backup starting then must wait).
SWEEPING = ("sweep-marker", "sessions-checked", "rereferenced", "deleted")
DEADLINE = 30.0


@dataclass
class Template:
    path: Path
    repo: Repository
    old: Manifest


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """One encrypted repository holding snapshot ``old``; each test works on a copy of it."""
    base = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COWBACKUP_CACHE_DIR", str(base / "cache"))
        mp.setenv("COWBACKUP_KEYS_DIR", str(base / "keys"))
        repo = new_repo(base / "repo")
        old = asyncio.run(backup(repo, {"d": OLD_DISK}, "old"))
        yield Template(base / "repo", repo, old)


#: Makes a fresh, empty store named ``name`` (unique within a test).
NewStore = Callable[[str], Store]


@pytest.fixture
def new_store(tmp_path: Path) -> NewStore:
    return lambda name: LocalStore(str(tmp_path / name), "none")


def copy_of(template: Template, store: Store) -> Repository:
    """A copy of the template repository in ``store``, opened with its keys (no passphrase derivation
    per test).  The copies share the template's repository id but not their chunk caches: a cache is
    kept per location."""
    source = template.repo.store
    for info in source.list(""):
        store.put(info.name, source.get(info.name), durable=False)
    t = template.repo
    return Repository(store, t.config, t.keys, None)


class Driven:
    """A BackupRun of ``contents`` driven phase by phase from another thread."""

    def __init__(self, repo: Repository, contents: bytes, name: str = "new", *, use_cache: bool = True):
        self.repo, self.contents, self.name, self.use_cache = repo, contents, name, use_cache
        self.run: BackupRun | None = None
        self.record: DiskRecord | None = None
        self.snap: Manifest | None = None
        self.done: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="driven-backup", daemon=True)
        self.thread.start()

    def submit(self, phase: str) -> concurrent.futures.Future[None]:
        future = asyncio.run_coroutine_threadsafe(getattr(self, f"_{phase}")(), self.loop)

        def finished(f: concurrent.futures.Future[None]) -> None:
            if f.exception() is None:
                self.done.append(phase)

        future.add_done_callback(finished)
        return future

    def phase(self, phase: str) -> None:
        self.submit(phase).result(timeout=DEADLINE)

    async def _start(self) -> None:
        self.run = await BackupRun.start(self.repo, workers=2, use_cache=self.use_cache)

    async def _write_disk(self) -> None:
        assert self.run is not None
        self.record = await self.run.write_disk("d", memory_disk(self.contents))

    async def _commit(self) -> None:
        assert self.run is not None and self.record is not None
        self.snap = await self.run.commit(self.name, [self.record])

    async def _close(self) -> None:
        assert self.run is not None
        await self.run.close()

    def stop(self) -> None:
        if self.run is not None:
            asyncio.run_coroutine_threadsafe(self.run.close(), self.loop).result(timeout=DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=DEADLINE)
        self.loop.close()


def wait_for(condition: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.005)


def session_count(repo: Repository) -> int:
    return sum(1 for info in repo.store.list(sessions.SESSIONS) if not info.name.endswith(".alive"))


def sweeping(repo: Repository) -> bool:
    return bool(gc.read_state(repo.store).sweeps_in_progress(time.time()))


def assert_whole(repo: Repository, snaps: dict[str, bytes]) -> None:
    """Every snapshot in ``snaps`` (id -> contents) restores exactly; verify --read-data is clean; a gc
    with no backup running leaves exactly the referenced objects."""
    by_id = {s.id: s for s in repo.snapshots()}
    for sid, contents in snaps.items():
        assert asyncio.run(restore(repo, by_id[sid])) == contents
    report = verify(repo, read_data=100, repair=False)
    assert report.ok, report
    gc.collect(repo)
    present = {info.name for prefix in gc.GARBAGE_PREFIXES for info in repo.store.list(prefix)}
    assert present == gc.referenced(repo)
    for sid, contents in snaps.items():
        assert asyncio.run(restore(repo, by_id[sid])) == contents


def interleave(repo: Repository, old: Manifest, placement: dict[str, str], *, use_cache: bool) -> list[str]:
    """Run the race with the backup's phases at ``placement``; the order things happened in."""
    driven = Driven(repo, NEW_DISK, use_cache=use_cache)
    order: list[str] = []
    queue = list(PHASES)
    waiting: list[concurrent.futures.Future[None]] = []

    def run_due(slot: str) -> None:
        while queue and not waiting and (slot == "after" or placement[queue[0]] == slot):
            phase = queue.pop(0)
            if phase == "start" and sweeping(repo):
                # It must wait for the sweep: let it write its session record, then go on with gc.
                waiting.append(driven.submit("start"))
                wait_for("the session record", lambda: session_count(repo) > 0)
                order.append("backup:start-begun")
                return
            driven.phase(phase)
            order.append(f"backup:{phase}")

    def step(name: str) -> None:
        order.append(f"gc:{name}")
        run_due(name)

    try:
        run_due("before")
        repo.store.delete([snapshot_name(old.id)])  # forget the snapshot that held D
        gc.collect(repo, step=step)
        order.append("gc:end")
        if waiting:
            waiting[0].result(timeout=DEADLINE)
            assert not sweeping(repo)
            order.append("backup:start")
            waiting.clear()
        run_due("after")
        assert driven.done == list(PHASES), order
        assert driven.snap is not None
    finally:
        driven.stop()
    assert_whole(repo, {driven.snap.id: NEW_DISK})
    return order


def placements() -> list[dict[str, str]]:
    """Every placement of the phases in order among the slots; phases after a start that must wait
    all run after gc (they cannot run before it), so such placements are listed once."""
    found: dict[tuple[str, ...], dict[str, str]] = {}
    for slots in itertools.combinations_with_replacement(SLOTS, len(PHASES)):
        if slots[0] in SWEEPING:
            slots = (slots[0], "after", "after", "after")
        found.setdefault(slots, dict(zip(PHASES, slots, strict=True)))
    return list(found.values())


PLACEMENTS = placements()


@pytest.mark.parametrize("start", SLOTS)
def test_every_placement_of_a_backup_among_gc_steps(
    template: Template, new_store: NewStore, start: str
) -> None:
    cases = [p for p in PLACEMENTS if p["start"] == start]
    for i, placement in enumerate(cases):
        # Commit and close at one step, or apart: the cache only matters for the few first ones.
        repo = copy_of(template, new_store(f"case{i}"))
        order = interleave(repo, template.old, placement, use_cache=i % 3 != 2)
        if start in SWEEPING:
            assert order.index("backup:start") > order.index("gc:end"), order


def test_without_a_cache_the_backup_finds_the_chunk_by_put_if_absent(
    template: Template, new_store: NewStore
) -> None:
    for i, slot in enumerate(STEPS):
        placement = {"start": "before", "write_disk": "before", "commit": slot, "close": slot}
        interleave(copy_of(template, new_store(f"case{i}")), template.old, placement, use_cache=False)


def test_two_backups_in_a_row_and_a_later_gc_sweeps_the_postponed_record(
    template: Template, new_store: NewStore
) -> None:
    repo = copy_of(template, new_store("repo"))
    first = Driven(repo, NEW_DISK, "first")
    second = Driven(repo, D + D + E, "second")
    try:
        first.phase("start")
        first.phase("write_disk")
        repo.store.delete([snapshot_name(template.old.id)])
        result = gc.collect(repo)  # first is running: the record is postponed
        assert result.postponed == [1] and not result.swept
        first.phase("commit")
        second.phase("start")  # before first closes: its session also protects the record
        first.phase("close")
        assert gc.collect(repo).postponed == [1, 2]
        second.phase("write_disk")
        second.phase("commit")
        second.phase("close")
        assert first.snap is not None and second.snap is not None
    finally:
        first.stop()
        second.stop()
    result = gc.collect(repo)  # no backup runs now: the postponed records are swept
    assert result.swept == [1, 2] and not result.postponed
    assert repo.store.stat(chunk_name(repo.hash(D))) is not None
    assert repo.store.stat(chunk_name(repo.hash(E))) is not None  # second put E back in use
    assert_whole(repo, {first.snap.id: NEW_DISK, second.snap.id: D + D + E})


def test_a_backup_starting_during_a_sweep_waits_for_it(template: Template, new_store: NewStore) -> None:
    repo = copy_of(template, new_store("repo"))
    repo.store.delete([snapshot_name(template.old.id)])
    started: list[BackupRun] = []
    at_deleted: list[bool] = []

    def start_backup() -> None:
        async def go() -> None:
            started.append(await BackupRun.start(repo, workers=2))

        asyncio.run(go())

    thread = threading.Thread(target=start_backup)

    def step(name: str) -> None:
        if name == "sessions-checked":
            thread.start()
            wait_for("the session record", lambda: session_count(repo) == 1)
        if name == "deleted":
            time.sleep(0.3)  # three of the waiting backup's polls: it must still be waiting
            at_deleted.append(bool(started))

    result = gc.collect(repo, step=step)
    thread.join(timeout=DEADLINE)
    assert at_deleted == [False] and len(started) == 1 and result.swept == [1]
    run = started[0]
    assert repo.hash(D) not in run.known and repo.hash(E) not in run.known  # it forgot what was swept

    async def finish() -> Manifest:
        record = await run.write_disk("d", memory_disk(NEW_DISK))
        snap = await run.commit("new", [record])
        await run.close()
        return snap

    snap = asyncio.run(finish())
    assert_whole(repo, {snap.id: NEW_DISK})


def dead_pid() -> int:
    """A pid no process has now."""
    pid = 999_999
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_a_dead_session_does_not_block_sweeping(template: Template, new_store: NewStore) -> None:
    repo = copy_of(template, new_store("repo"))
    # A backup killed with SIGKILL: its record stays, with a pid that no longer runs.
    killed = {
        "host": socket.gethostname(),
        "boot_id": sessions.boot_id(),
        "pid": dead_pid(),
        "pid_start": "1",
    }
    repo.store.put(sessions.SESSIONS + "0" * 32, json.dumps(killed).encode())
    # And one whose pid now belongs to another process (this one), started at another time.
    reused = dict(killed, pid=os.getpid(), pid_start="1")
    repo.store.put(sessions.SESSIONS + "1" * 32, json.dumps(reused).encode())
    repo.store.delete([snapshot_name(template.old.id)])
    result = gc.collect(repo)
    assert result.swept == [1] and not result.postponed
    assert repo.store.stat(chunk_name(repo.hash(D))) is None


def test_a_live_session_elsewhere_blocks_sweeping_until_its_lease_ends(
    template: Template, tmp_path: Path
) -> None:
    # Local only: it ages the session's files behind the store's back.
    repo = copy_of(template, LocalStore(str(tmp_path / "repo"), "none"))
    remote = {"host": "elsewhere.example", "boot_id": "b", "pid": 1, "pid_start": "1"}
    name = sessions.SESSIONS + "2" * 32
    repo.store.put(name, json.dumps(remote).encode())
    repo.store.delete([snapshot_name(template.old.id)])
    assert gc.collect(repo).postponed == [1]
    # Its lease runs out: the record and heartbeat are older than LEASE.
    old = time.time() - sessions.LEASE - 60
    os.utime(os.path.join(repo.store.location, name), (old, old))
    result = gc.collect(repo)
    assert result.swept == [1]
    assert_whole(repo, {})


def test_two_gc_runs_never_sweep_one_record_at_once(tmp_path: Path) -> None:
    """A second gc that meets a record being swept leaves it to the first: it must not delete with its
    own, older view of the snapshots, nor take the first one's marker away from waiting backups."""
    from cowbackup.repo import gc as gc_module

    repo = new_repo(tmp_path / "repo")
    doomed = asyncio.run(backup(repo, {"d": data(41)}))
    repo.store.delete([snapshot_name(doomed.id)])
    seen: list[gc_module.GcResult] = []

    marker = gc_module.record_name(1, "sweep")
    held: list[bool] = []

    def second_gc(step: str) -> None:
        if step == "sessions-checked":  # the first gc holds record 1's marker now
            seen.append(gc_module.collect(reopen(repo)))
            held.append(repo.store.stat(marker) is not None)

    gc_module.collect(repo, step=second_gc)
    (second,) = seen
    # The second left record 1 to the first, and its marker in place (backups starting now wait for
    # it); what it deleted, it deleted under a record and a marker of its own, with its own view.
    assert second.postponed == [1] and 1 not in second.swept and held == [True]
    assert not [i for i in repo.store.list("gc/") if i.name.endswith(".sweep")]
