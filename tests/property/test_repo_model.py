"""The repository as a state machine: backup / crashed backup / forget / gc (crashed or not) / verify /
restore over random disks, against the model "every committed snapshot restores exactly the bytes it
was taken from".

Disks are ``memory`` nodes of up to 2 MiB in 64 KiB chunks: random data, data shared between disks and
snapshots, written zeros, holes, chunks half zero, and a short last chunk.  Crashes are made the way
``kill -9`` leaves them:

* a backup abandoned after k chunks: its objects are uploaded, nothing is committed, its session record
  stays but names a pid that no longer exists (and its cache is never saved);
* a gc interrupted at one of its steps (``step`` hook raises); a sweep marker it leaves behind is aged
  past its lease, as the next backups would find it once the dead gc's lease ran out.

Invariants: every committed snapshot restores exactly; ``verify --read-data`` is clean; after a gc with
no backup running, no unreferenced object remains.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import tempfile
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.repo import gc, sessions
from cowbackup.repo.reader import restore_disk
from cowbackup.repo.repository import Repository, snapshot_name
from cowbackup.repo.store_local import LocalStore
from cowbackup.repo.verify import verify
from cowbackup.repo.writer import BackupRun

CHUNK = 64 * 1024
MAX_CHUNKS = 32  # 2 MiB
GC_STEPS = ("mark", "marked", "condemned", "sweep-marker", "sessions-checked", "rereferenced", "deleted")
#: Chunk contents shared by every disk of every example (dedup across disks and snapshots).
SHARED = [random.Random(n).randbytes(CHUNK) for n in range(4)]

# A chunk of a disk: ("data", seed) fresh random, ("shared", i), ("half", seed) data then zeros,
# ("zero",) written zeros, ("hole",) never written.
PIECES = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 2**32)),
    st.tuples(st.just("shared"), st.integers(0, len(SHARED) - 1)),
    st.tuples(st.just("half"), st.integers(0, 2**32)),
    st.tuples(st.sampled_from(["zero", "hole"])),
)
DISKS = st.lists(
    st.tuples(st.lists(PIECES, min_size=1, max_size=MAX_CHUNKS), st.integers(0, CHUNK - 1)),
    min_size=1,
    max_size=2,
)


class Crash(Exception):
    """Where the simulated kill -9 lands."""


def build_disk(pieces: list[tuple[object, ...]], short: int) -> MemoryNode:
    """The disk described by ``pieces``; its last chunk is ``short`` bytes shorter."""
    size = len(pieces) * CHUNK - short
    node = MemoryNode("disk", size)
    for i, piece in enumerate(pieces):
        offset, kind, seed = i * CHUNK, piece[0], int(str(piece[-1])) if len(piece) > 1 else 0
        length = min(CHUNK, size - offset)
        if kind == "hole":
            continue
        if kind == "data":
            chunk = random.Random(seed).randbytes(CHUNK)
        elif kind == "shared":
            chunk = SHARED[seed]
        elif kind == "half":
            chunk = random.Random(seed).randbytes(CHUNK // 2) + bytes(CHUNK // 2)
        else:
            chunk = bytes(CHUNK)
        node.data[offset : offset + length] = chunk[:length]
        node.allocated.set(offset, length)
    return node


def dead_pid() -> int:
    pid = 999_999
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


class RepositoryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="repo-model-")
        self.saved_env = {k: os.environ.get(k) for k in ("COWBACKUP_CACHE_DIR", "COWBACKUP_KEYS_DIR")}
        os.environ["COWBACKUP_CACHE_DIR"] = os.path.join(self.tmp, "cache")
        os.environ["COWBACKUP_KEYS_DIR"] = os.path.join(self.tmp, "keys")
        self.repo = Repository.create(
            LocalStore(os.path.join(self.tmp, "repo"), "none"),
            chunk_size=CHUNK,
            encryption="repokey",
            level=1,
            passphrase=b"model",
            created="2026-01-01T00:00:00Z",
        )
        #: snapshot id -> disk name -> the bytes it was taken from
        self.model: dict[str, dict[str, bytes]] = {}
        self.gc_crashed = False

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # -- rules ------------------------------------------------------------------------------------

    @rule(disks=DISKS)
    def backup(self, disks: list[tuple[list[tuple[object, ...]], int]]) -> None:
        nodes = {f"disk{i}": build_disk(pieces, short) for i, (pieces, short) in enumerate(disks)}

        async def go() -> str:
            run = await BackupRun.start(self.repo, workers=2)
            try:
                records = [await run.write_disk(name, node) for name, node in nodes.items()]
                return (await run.commit("host/vm", records)).id
            finally:
                await run.close()

        sid = asyncio.run(go())
        self.model[sid] = {name: node.snapshot() for name, node in nodes.items()}

    @rule(pieces=st.lists(PIECES, min_size=1, max_size=MAX_CHUNKS), k=st.integers(0, MAX_CHUNKS))
    def crashed_backup(self, pieces: list[tuple[object, ...]], k: int) -> None:
        """Killed after storing the first k chunks (and maybe a segment): no commit, a dead session."""
        node = build_disk(pieces[:k] or pieces[:1], 0)

        async def go() -> None:
            run = await BackupRun.start(self.repo, workers=2)
            if k:
                await run.write_disk("disk0", node)
            # kill -9: the heartbeat and the workers stop, the record stays, its process is gone.
            session = run.session
            session._stop.set()
            run._pool.shutdown(wait=True)
            record = {"host": socket.gethostname(), "boot_id": sessions.boot_id(), "pid": dead_pid()}
            self.repo.store.put(session.name, json.dumps({**record, "pid_start": "1"}).encode())

        asyncio.run(go())

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.repo.store.delete([snapshot_name(sid)])
        del self.model[sid]

    @rule(crash_at=st.none() | st.sampled_from(GC_STEPS))
    def collect(self, crash_at: str | None) -> None:
        def step(name: str) -> None:
            if name == crash_at:
                raise Crash(name)

        try:
            gc.collect(self.repo, step=step)
        except Crash:
            # A dead gc's sweep marker blocks backups until its lease ends: let it have ended.
            old = time.time() - gc.SWEEP_LEASE - 1
            state = gc.read_state(self.repo.store)
            for seq, kinds in state.records.items():
                if "sweep" in kinds and "done" not in kinds:
                    path = os.path.join(self.repo.store.location, gc.record_name(seq, "sweep"))
                    os.utime(path, (old, old))
            return
        # No backup runs now (crashed ones are dead): nothing unreferenced may remain.
        present = {i.name for prefix in gc.GARBAGE_PREFIXES for i in self.repo.store.list(prefix)}
        assert present == gc.referenced(self.repo)

    @rule()
    def verify_read_data(self) -> None:
        report = verify(self.repo, read_data=100, repair=False)
        assert report.ok, report
        assert report.snapshots == len(self.model)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.check_snapshot(sid)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def snapshots_are_the_committed_ones(self) -> None:
        assert set(self.repo.snapshot_ids()) == set(self.model)

    def check_snapshot(self, sid: str) -> None:
        snap = self.repo.load_manifest(sid)
        assert {d.name for d in snap.disks} == set(self.model[sid])
        for disk in snap.disks:
            target = MemoryNode("target", disk.size)
            asyncio.run(restore_disk(self.repo, disk, target, target_reads_zero=True, workers=2))
            assert target.snapshot() == self.model[sid][disk.name], (sid, disk.name)

    def check_all(self) -> None:
        for sid in sorted(self.model):
            self.check_snapshot(sid)


class FinalCheck(RepositoryModel):
    """At the end of every example: every snapshot restores and verify is clean, then a clean gc."""

    def teardown(self) -> None:
        try:
            self.check_all()
            self.verify_read_data()
            self.collect(None)
            self.check_all()
        finally:
            super().teardown()


FinalCheck.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestRepositoryModel = FinalCheck.TestCase
