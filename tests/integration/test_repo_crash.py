"""Crashes and a full disk: ``backup``, ``forget`` and ``gc`` processes killed at random moments.

The model after any of them: every listed snapshot restores exactly the bytes it was taken from (each
snapshot carries a tag naming its source), ``verify --read-data`` is clean, no interrupted backup is
listed, and the next complete ``gc`` leaves exactly the chunk, index and refs objects the snapshots
reference (read independently of cowbackup, see :func:`referenced_objects`).  Ctrl-C and SIGTERM stop a
backup with exit 130 and no snapshot; a full disk fails a backup cleanly and gc gets the space back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import KiB, MiB, random_file
from .nbd_peers import nbdkit
from .repo_helpers import (
    RepoCli,
    file_sha256,
    kill_group,
    referenced_objects,
    repo_objects,
    rewrite_chunks,
    temp_files,
)

pytestmark = pytest.mark.usefixtures("need_qemu_img")

DISK = 24 * MiB
CHUNK = 64 * KiB


def new_version(previous: bytes, rng: random.Random, changed: float) -> bytes:
    """``previous`` with a fraction ``changed`` of its chunks rewritten with new random data."""
    return rewrite_chunks(previous, rng, changed, CHUNK)


class Model:
    """What the test knows: source digests by tag, and which snapshots must exist."""

    def __init__(self, cli: RepoCli) -> None:
        self.cli = cli
        self.digests: dict[str, str] = {}  # tag -> SHA-256 of the source backed up with that tag

    def check_listing(self) -> list[dict[str, object]]:
        """Every listed snapshot is one the test knows the source of (a backup killed after its commit
        point may have committed: the test knows its source too)."""
        rows = self.cli.snapshots()
        for row in rows:
            tags = row["tags"]
            assert isinstance(tags, list) and len(tags) == 1, row
            assert tags[0] in self.digests, f"snapshot {row['id']} of an unknown backup: {row}"
            assert row["status"] == "ok"
        return rows

    def check_all(self, workdir: Path) -> None:
        """Every listed snapshot restores exactly; verify --read-data is clean."""
        for row in self.check_listing():
            tags = row["tags"]
            assert isinstance(tags, list)
            self.cli.assert_restores(str(row["id"]), self.digests[tags[0]], workdir / "check.img")
        code, report = self.cli.verify("--read-data", "--no-repair")
        assert code == 0 and report["ok"], report

    def check_gc_reclaims(self) -> None:
        """A complete gc leaves exactly what the snapshots reference, and no temporary file."""
        self.cli.gc()
        repo = self.cli.repo
        leftovers = repo_objects(repo) - referenced_objects(repo)
        assert not leftovers, f"{len(leftovers)} unreferenced object(s) after gc: {sorted(leftovers)[:5]}"
        assert referenced_objects(repo) <= repo_objects(repo)
        assert temp_files(repo) == []
        assert not list((repo / "sessions").glob("*")), "session records of dead backups remain"


@pytest.fixture
def cli(workdir: Path) -> RepoCli:
    c = RepoCli(workdir, workdir / "repo")
    c.init("--chunk-size", "64K")
    return c


def timed_backup(cli: RepoCli, source: Path, tag: str) -> float:
    started = time.monotonic()
    cli.backup(source, "vm", "--tag", tag)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_backup_killed_at_random_points(cli: RepoCli, workdir: Path) -> None:
    rng = random.Random(20261205)
    model = Model(cli)
    source = workdir / "disk.img"
    data = rng.randbytes(DISK)
    source.write_bytes(data)
    model.digests["good0"] = file_sha256(source)
    duration = timed_backup(cli, source, "good0")

    committed_by_killed = 0
    for i in range(1, 16):
        # Half of the chunks are new each time: a killed backup is usually uploading when it dies.
        data = new_version(data, rng, 0.5)
        source.write_bytes(data)
        tag = f"killed{i}"
        model.digests[tag] = file_sha256(source)
        proc = cli.start("backup", str(source), "--repo", str(cli.repo), "--name", "vm", "--tag", tag)
        time.sleep(rng.uniform(0.0, duration * 1.1))  # the kill point
        kill_group(proc)
        rows = model.check_listing()
        if proc.returncode == 0 or any(row["tags"] == [tag] for row in rows):
            committed_by_killed += 1  # it reached its commit point before the kill
        if i % 2 == 0:
            model.digests[f"good{i}"] = model.digests[tag]
            timed_backup(cli, source, f"good{i}")

    model.check_all(workdir)
    model.check_gc_reclaims()
    model.check_all(workdir)
    # The kill points were spread over the backup's life: most killed backups never committed.
    assert committed_by_killed < 12


def _forget_all_but_last(cli: RepoCli) -> subprocess.Popen[str]:
    return cli.start("forget", "--repo", str(cli.repo), "--keep-last", "1")


@pytest.mark.slow
def test_forget_and_gc_killed_at_random_points(cli: RepoCli, workdir: Path) -> None:
    rng = random.Random(7)
    model = Model(cli)
    source = workdir / "disk.img"
    data = b""
    for i in range(6):
        data = new_version(data, rng, 1.0) if data else rng.randbytes(8 * MiB)
        source.write_bytes(data)
        model.digests[f"v{i}"] = file_sha256(source)
        cli.backup(source, "vm", "--tag", f"v{i}")

    # forget, killed: each listed snapshot is still whole (a manifest is deleted or not, never half).
    for _ in range(4):
        before = {str(r["id"]) for r in model.check_listing()}
        started = time.monotonic()
        proc = _forget_all_but_last(cli)
        time.sleep(rng.uniform(0.2, 0.7))
        kill_group(proc)
        after = {str(r["id"]) for r in model.check_listing()}
        assert after <= before and after, (before, after, time.monotonic() - started)
    model.check_all(workdir)
    cli.ok("forget", "--repo", str(cli.repo), "--keep-last", "2")

    # gc, killed: it never deletes what a snapshot needs, and a later gc finishes its work.
    for _ in range(6):
        proc = cli.start("gc", "--repo", str(cli.repo))
        time.sleep(rng.uniform(0.2, 0.8))
        kill_group(proc)
        model.check_listing()
        # A backup after a killed gc neither waits for it nor trusts what it deleted.
        data = new_version(data, rng, 0.25)
        source.write_bytes(data)
        tag = f"after-gc{_}"
        model.digests[tag] = file_sha256(source)
        started = time.monotonic()
        cli.backup(source, "vm", "--tag", tag)
        assert time.monotonic() - started < 20, "a backup waited for a gc that was killed"
        cli.ok("forget", "--repo", str(cli.repo), "--keep-last", "2")
    model.check_all(workdir)
    model.check_gc_reclaims()
    model.check_all(workdir)


# ---------------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def slow_source(workdir: Path, size: int) -> Iterator[str]:
    """An NBD export of random data whose reads take 20 ms each: a backup of it lasts seconds."""
    image = random_file(workdir / "slow.img", size, seed=99)
    with nbdkit(workdir, "file", str(image), "delay-read=20ms", filters=["delay"]) as peer:
        yield peer.uri()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_backup_leaves_no_snapshot(cli: RepoCli, workdir: Path, sig: signal.Signals) -> None:
    with slow_source(workdir, 16 * MiB) as uri:
        proc = cli.start("backup", uri, "--repo", str(cli.repo), "--name", "vm", "--json")
        assert proc.stdout is not None
        seen = 0
        for line in proc.stdout:  # wait until chunks are being stored
            record = json.loads(line)
            if record["type"] == "progress" and record["current"] > 0:
                seen += 1
                if seen >= 2:
                    break
        assert seen >= 2, "the backup ended before it made progress"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"interrupted by {sig.name}" in err
    assert cli.snapshots() == []
    assert not list((cli.repo / "sessions").glob("*")), "the session record outlived the backup"
    assert repo_objects(cli.repo), "nothing was stored before the signal: the test proves nothing"
    cli.gc()
    assert repo_objects(cli.repo) == set()
    assert temp_files(cli.repo) == []


# ---------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_filesystem(directory: Path, size_mib: int) -> Iterator[Path]:
    """A file system of ``size_mib`` MiB mounted on ``directory``: tmpfs, or a loop-mounted ext4 image."""
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        image = directory.with_suffix(".ext4")
        with open(image, "wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(directory)], check=True, capture_output=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_fails_cleanly_and_gc_reclaims(workdir: Path) -> None:
    with small_filesystem(workdir / "small", 24) as mnt:
        cli = RepoCli(workdir, mnt / "repo")
        cli.init("--chunk-size", "64K")
        ballast = mnt / "ballast"
        ballast.write_bytes(bytes(2 * MiB))
        first = random_file(workdir / "first.img", 4 * MiB, seed=1)
        sid = cli.backup(first, "vm")
        after_first = used_bytes(mnt)

        big = random_file(workdir / "big.img", 32 * MiB, seed=2)
        proc = cli.run("backup", str(big), "--repo", str(cli.repo), "--name", "vm")
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0], proc.stderr
        assert [r["id"] for r in cli.snapshots()] == [sid]
        assert used_bytes(mnt) > after_first + 8 * MiB, "the backup stored little before the disk filled"
        cli.assert_restores(sid, file_sha256(first), workdir / "out.img")
        code, report = cli.verify("--read-data")
        assert code == 0 and report["ok"], report
        assert temp_files(cli.repo) == []
        # A restore onto the full file system fails as cleanly.
        proc = cli.restore(sid, mnt / "restored.img")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "space" in lines[0].lower(), proc.stderr
        (mnt / "restored.img").unlink()

        ballast.unlink()
        cli.gc()
        assert repo_objects(cli.repo) == referenced_objects(cli.repo)
        assert used_bytes(mnt) < after_first + MiB
        # With the space back, the same backup now fits... almost: a smaller one does.
        sid2 = cli.backup(random_file(workdir / "third.img", 8 * MiB, seed=3), "vm")
        assert {r["id"] for r in cli.snapshots()} == {sid, sid2}
