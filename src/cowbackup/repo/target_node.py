"""``cowbackup-repo``: a block node that is a repository snapshot in the making -- a backup job's target.

``blockdev-add`` it, then ``blockdev-backup`` into it: the job (copy-before-write and all) writes whole
chunks, which are hashed, compressed, encrypted and stored off the event loop as they come; when the job
succeeds (its *prepare* phase) the node writes the index and commits the snapshot.  A job that fails or is
cancelled commits nothing: what was stored is garbage for ``gc``.

Writes are *write-behind*: a write returns once its data is copied into memory, and is stored in the
background (at most :data:`WRITE_BEHIND_BYTES` at a time; then writers wait).  So a guest write that must
first copy its cluster waits for a read and a memcpy, as with a file target, not for the repository.  A
store that fails fails the next write and the job's prepare: the snapshot breaks, nothing is committed,
the guest goes on writing -- even with ``on-cbw-error=break-guest-write``, whose guest write has returned
by then (the policy still applies to a failing read of the source).

Options::

    repo            the repository (a directory)                                     required
    name            the snapshot's name, e.g. host1/vm7                              required
    size            the disk's size (the backup source's)                            required
    disk            the disk's name in the snapshot                                  default disk0
    password-file   the repository passphrase (first line); else $COWBACKUP_PASSWORD
    key-file        instead of a passphrase: a private file holding the repository's unwrapped key
                    (``keys.dump_master``), written by ``backup --qmp --repo``, which has unwrapped it
                    already -- so that one backup runs scrypt once; read when the node is added
    parent          a snapshot id: an incremental -- a chunk the job never writes is the parent's
    snapshot-id     the new snapshot's id (32 hex digits; default random), known before the job runs so
                    that a dirty bitmap can be named after it
    group           nodes with the same group make one snapshot of several disks, committed when
                    ``group-disks`` of them have been prepared                          default: node name
    group-disks     how many disks the group has                                    default 1
    changes         JSON object: how the changes were found (recorded in the manifest)
    tag             a tag for the snapshot
    sync-level      none | file | filesystem                                           default filesystem

The node is write-only (a read is EACCES).  Chunk alignment is the repository's chunk size, which the
job takes as its cluster size; a write that is not whole chunks (except at the end of the disk) is EINVAL.
For a full backup the node reads as zeros, so the job stores no zero cluster at all; for an incremental
it reads as data, so zeros the guest wrote since the parent do reach it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import weakref
from dataclasses import dataclass, field

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode, Extent, RequestFlags, Status
from cowbackup.block.options import Options
from cowbackup.repo.backends import open_store
from cowbackup.repo.errors import RepoError, RepoUsageError
from cowbackup.repo.index import ZERO_ENTRY
from cowbackup.repo.keys import MAX_KEY_SIZE, passphrase_from
from cowbackup.repo.manifest import DiskRecord, Manifest, check_disk_name, check_snapshot_name, is_snapshot_id
from cowbackup.repo.repository import Repository
from cowbackup.repo.writer import BackupRun, DiskStats


@dataclass
class PendingSnapshot:
    """The disks of one snapshot in the making, shared by the target nodes of one group."""

    run: BackupRun
    name: str
    disks_expected: int
    parent: str | None
    snapshot_id: str | None
    tags: list[str]
    disks: dict[str, DiskRecord] = field(default_factory=dict)
    committed: Manifest | None = None
    aborted: bool = False
    members: int = 0
    members_disks: set[str] = field(default_factory=set)

    async def disk_ready(self, disk: DiskRecord) -> None:
        if self.aborted:
            raise RepoError("the snapshot was abandoned: another disk of its group failed")
        if disk.name in self.disks:
            raise RepoError(f"disk '{disk.name}' was backed up twice into one snapshot")
        self.disks[disk.name] = disk
        if len(self.disks) == self.disks_expected:
            self.committed = await self.run.commit(
                self.name,
                [self.disks[k] for k in sorted(self.disks)],
                tags=self.tags,
                parent=self.parent,
                snapshot_id=self.snapshot_id,
            )


#: Copies accepted but not stored yet, at most this many bytes in all.  A write returns once its data is
#: copied into memory -- a guest write that had to copy its cluster first waits for a memcpy, not for
#: hashing, compression, encryption and upload -- and beyond this, writers wait for room.
WRITE_BEHIND_BYTES = 64 << 20

#: Pending snapshots by group, per graph (a process may run several daemons, tests do).
_groups: weakref.WeakKeyDictionary[BlockGraph, dict[str, PendingSnapshot]] = weakref.WeakKeyDictionary()


class RepoTargetNode(BlockNode):
    driver_name = "cowbackup-repo"

    def __init__(
        self,
        node_name: str,
        pending: PendingSnapshot,
        group: str,
        groups: dict[str, PendingSnapshot],
        disk: str,
        size: int,
        parent: DiskRecord | None,
        changes: dict[str, object],
    ) -> None:
        super().__init__(node_name)
        self.pending = pending
        self.run = pending.run
        self._group = group
        self._groups = groups
        self.disk = disk
        self._size = size
        self.parent = parent
        self.changes = changes
        self.chunk_size = self.run.repo.config.chunk_size
        self.limits.cluster_size = self.chunk_size
        self.limits.max_transfer = max(self.chunk_size, 32 << 20) // self.chunk_size * self.chunk_size
        #: Unwritten chunks read as zeros in a full backup; in an incremental they are the parent's.
        self.known_zero_init = parent is None
        self.written: dict[int, bytes] = {}
        self.stats = DiskStats(size=size)
        #: Stores in the background (write-behind), their bytes, and the first that failed.
        self._behind: dict[asyncio.Task[None], int] = {}
        self._behind_bytes = 0
        self._room = asyncio.Event()
        self._failure: OSError | None = None
        #: The newest write of each position: an older store finishing late never overwrites it.
        self._latest: dict[int, object] = {}

    def describe(self) -> dict[str, object]:
        return {"file": f"cowbackup-repo:{self.run.repo.store.location}", "snapshot": self.pending.name}

    def _positions(self, offset: int, length: int) -> range:
        cs = self.chunk_size
        if offset % cs or (length % cs and offset + length != self._size):
            raise OSError(errno.EINVAL, f"a repository target takes whole {cs}-byte chunks")
        return range(offset // cs, -(-(offset + length) // cs))

    async def _do_read(self, offset: int, buf: memoryview) -> None:
        raise OSError(errno.EACCES, "a repository target is write-only")

    async def _do_write(self, offset: int, data: memoryview, flags: RequestFlags) -> None:
        positions = self._positions(offset, len(data))
        self._raise_failure()
        while self._behind and self._behind_bytes + len(data) > WRITE_BEHIND_BYTES:
            # One event for all waiters (not a wait on every store: with a thousand small chunks held,
            # that made each write cost a thousand callbacks).
            self._room.clear()
            await self._room.wait()
            self._raise_failure()
        copy = bytes(data)  # the caller's buffer is the caller's again once we return
        token = object()
        for pos in positions:
            self._latest[pos] = token
        self._behind_bytes += len(copy)
        task = asyncio.create_task(self._store(offset, positions, copy, token))
        self._behind[task] = len(copy)
        task.add_done_callback(self._stored)

    async def _store(self, offset: int, positions: range, data: bytes, token: object) -> None:
        cs = self.chunk_size
        view = memoryview(data)
        try:
            # The chunks of one large write are stored in parallel (the workers hash, seal and upload).
            entries = await asyncio.gather(
                *(
                    self.run.store_chunk(view[p * cs - offset : (p + 1) * cs - offset], self.stats)
                    for p in positions
                )
            )
        except RepoError as err:
            # The block layer knows write errors as OSError: the next write or the job's prepare fails
            # with it (the snapshot breaks; the guest's writes went on).
            if self._failure is None:
                cause = err.__cause__
                code = cause.errno if isinstance(cause, OSError) and cause.errno else errno.EIO
                self._failure = OSError(code, str(err))
            return
        for pos, packed in zip(positions, entries, strict=True):
            if self._latest.get(pos) is token:
                self.written[pos] = packed

    def _stored(self, task: asyncio.Task[None]) -> None:
        self._behind_bytes -= self._behind.pop(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = OSError(errno.EIO, f"storing a chunk failed: {task.exception()!r}")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise OSError(self._failure.errno, self._failure.strerror)

    async def _drain_behind(self) -> None:
        """Wait for every store in the background; raise the first failure."""
        while self._behind:
            await asyncio.wait(set(self._behind))
        self._raise_failure()

    async def _do_write_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        positions = self._positions(offset, length)
        for pos in positions:
            self.written[pos] = ZERO_ENTRY
            self._latest[pos] = ZERO_ENTRY
        self.stats.zero_bytes += min(self._size, positions.stop * self.chunk_size) - offset

    async def _do_discard(self, offset: int, length: int) -> None:
        raise OSError(errno.ENOTSUP, "a repository target cannot discard")

    async def _do_flush(self) -> None:
        pass  # durability is the commit's business

    async def _do_block_status(self, offset: int, length: int) -> Extent:
        if self.known_zero_init:
            return Extent(offset, length, Status.ZERO)
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    def backup_target_check(self, sync: str) -> None:
        # What the job leaves unwritten reads as zeros (full) or as the parent's (an incremental): a mode
        # that leaves anything else unwritten (top: the backing file's data; none) would lose data.
        wanted = ("bitmap", "incremental") if self.parent is not None else ("full",)
        if sync not in wanted:
            kind = f"an incremental over snapshot {self.pending.parent}" if self.parent else "a full snapshot"
            raise BlockError(
                f"cowbackup-repo node '{self.node_name}' is {kind}: a backup into it needs sync="
                + " or ".join(wanted)
            )

    async def backup_target_prepare(self) -> None:
        await self._drain_behind()
        try:
            record = await self.run.finish_disk(
                self.disk, self._size, self.written, self.stats, parent=self.parent, changes=self.changes
            )
            await self.pending.disk_ready(record)
        except RepoError as err:
            raise OSError(errno.EIO, f"repository: {err}") from err

    async def backup_target_abort(self) -> None:
        self.pending.aborted = True
        await self._cancel_behind()

    async def _cancel_behind(self) -> None:
        for task in self._behind:
            task.cancel()
        while self._behind:
            await asyncio.wait(set(self._behind))

    async def _do_close(self) -> None:
        await self._cancel_behind()
        self.pending.members -= 1
        if self.pending.members == 0:
            self._groups.pop(self._group, None)
            await self.run.close()


async def open_node(graph: BlockGraph, node_name: str, opts: Options) -> BlockNode:
    location = opts.get_str("repo")
    name = opts.get_str("name")
    size = opts.get_int("size", minimum=1)
    disk = opts.get_str("disk", "disk0")
    password_file = opts.get_str("password-file", None)
    key_file = opts.get_str("key-file", None)
    parent_id = opts.get_str("parent", None)
    snapshot_id = opts.get_str("snapshot-id", None)
    group = opts.get_str("group", node_name)
    group_disks = opts.get_int("group-disks", 1, minimum=1)
    changes_text = opts.get_str("changes", None)
    tag = opts.get_str("tag", None)
    sync_level = opts.get_enum("sync-level", ("none", "file", "filesystem"), "filesystem")
    try:
        check_snapshot_name(name)
        check_disk_name(disk)
        changes = json.loads(changes_text) if changes_text else {"method": "bitmap" if parent_id else "full"}
        if not isinstance(changes, dict):
            raise ValueError("'changes' must be a JSON object")
    except ValueError as err:
        raise BlockError(f"cowbackup-repo: {err}") from None
    if password_file is not None and key_file is not None:
        raise BlockError("cowbackup-repo: give 'password-file' or 'key-file', not both")
    for key, value in (("parent", parent_id), ("snapshot-id", snapshot_id)):
        if value is not None and not is_snapshot_id(value):
            raise BlockError(f"cowbackup-repo: '{key}' must be a snapshot id of 32 hex digits")
    loop = asyncio.get_running_loop()
    groups = _groups.setdefault(graph, {})
    pending = groups.get(group)
    try:
        if pending is None:
            repo = await loop.run_in_executor(
                None, _open_repository, location, password_file, key_file, sync_level
            )
            run = await BackupRun.start(repo)
            pending = PendingSnapshot(run, name, group_disks, parent_id, snapshot_id, [tag] if tag else [])
            groups[group] = pending
        elif (pending.name, pending.disks_expected, pending.parent, pending.snapshot_id) != (
            name,
            group_disks,
            parent_id,
            snapshot_id,
        ) or (tag is not None and [tag] != pending.tags):
            raise BlockError(
                f"cowbackup-repo: group '{group}' is snapshot '{pending.name}' of {pending.disks_expected} "
                "disk(s); every node of a group must name the same snapshot, parent, id and tag"
            )
        elif disk in pending.members_disks:
            raise BlockError(f"cowbackup-repo: group '{group}' has a disk '{disk}' already")
        parent = None
        if parent_id is not None:
            snap = await loop.run_in_executor(None, pending.run.repo.load_manifest, parent_id)
            try:
                parent = snap.disk(disk)
            except KeyError as err:
                raise BlockError(f"cowbackup-repo: {err.args[0]}") from None
    except BaseException as err:
        if pending is not None and pending.members == 0:  # made for this node: nobody else holds it
            groups.pop(group, None)
            await pending.run.close()
        if isinstance(err, RepoError):
            raise BlockError(f"cowbackup-repo: {err}") from None
        raise
    pending.members += 1
    pending.members_disks.add(disk)
    return RepoTargetNode(node_name, pending, group, groups, disk, size, parent, changes)


def _open_repository(
    location: str, password_file: str | None, key_file: str | None, sync_level: str
) -> Repository:
    store = open_store(location, sync_level)
    if key_file is not None:
        try:
            with open(key_file, "rb") as f:
                data = f.read(MAX_KEY_SIZE + 1)
        except OSError as err:
            raise RepoUsageError(f"cannot read key-file '{key_file}': {err.strerror}") from None
        return Repository.open_with_master(store, data, key_file)

    def passphrase() -> bytes:
        given = passphrase_from(password_file, "password-file")
        if given is None:
            raise RepoError("the repository is encrypted: give 'password-file' (or COWBACKUP_PASSWORD)")
        return given

    return Repository.open(store, passphrase)
