"""Live backups into a repository when something is wrong: issue 13's "Bad input and failure".

Every way a bitmap may no longer be trusted -- its parent snapshot forgotten or recorded damaged, the
bitmap deleted or disabled by someone else -- makes ``--incremental`` refuse with the exact reason, and
``--fallback-full`` read the whole disk instead, whose snapshot restores to the disk at its instant.  A
repository that fills up mid-backup fails the backup and commits nothing while the guest goes on writing;
a monitor that refuses a command midway leaves nothing of the fleecing set-up behind.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import MiB, RunCli, random_file
from .test_live_backup import DaemonKind, DaemonProcess, daemon_argv, kill_all, launch, start_daemon
from .test_live_repo import SIZE, backup, daemon, repo, restored, write_round
from .test_repo_crash import small_filesystem

__all__ = ["daemon", "repo", "start_daemon"]  # fixtures, used here by name

KINDS: list[DaemonKind] = ["cowbackup", "qemu-storage-daemon"]


def qmp(run_cli: RunCli, daemon: DaemonProcess, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command through ``cowbackup qmp``; its return value."""
    args = [json.dumps(arguments)] if arguments is not None else []
    proc = run_cli("qmp", "--socket", str(daemon.qmp), command, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def bitmaps(run_cli: RunCli, daemon: DaemonProcess, node: str = "disk") -> dict[str, dict[str, Any]]:
    """The dirty bitmaps of ``node``, by name."""
    nodes = qmp(run_cli, daemon, "query-named-block-nodes")
    entry = next(n for n in nodes if n["node-name"] == node)
    return {b["name"]: b for b in entry.get("dirty-bitmaps", [])}


def node_names(run_cli: RunCli, daemon: DaemonProcess) -> set[str]:
    return {n["node-name"] for n in qmp(run_cli, daemon, "query-named-block-nodes")}


def snapshots(run_cli: RunCli, repo: Path) -> list[dict[str, Any]]:
    proc = run_cli("snapshots", "--repo", str(repo), "--json")
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def tracking_bitmap_of(run_cli: RunCli, repo: Path, snapshot: str) -> str:
    """The bitmap the snapshot's manifest binds it to (``changes.tracking.bitmap``)."""
    row = next(r for r in snapshots(run_cli, repo) if r["id"] == snapshot)
    name: str = row["disks"][0]["changes"]["tracking"]["bitmap"]
    return name


def incremental(run_cli: RunCli, daemon: DaemonProcess, repo: Path) -> subprocess.CompletedProcess[str]:
    """``backup --incremental`` without a fallback: the caller expects a refusal."""
    return run_cli(
        "backup", "--qmp", str(daemon.qmp), "disk", "--repo", str(repo), "--name", "vm1", "--bitmap", "cb",
        "--incremental", "--nbd-socket", str(daemon.nbd),
    )  # fmt: skip


def refuses_then_falls_back(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path, why: str
) -> dict[str, Any]:
    """The incremental refuses with ``why``; with --fallback-full it reads everything, says ``why`` and
    restores to the disk as it was when it started.  The fallback's result."""
    refused = incremental(run_cli, daemon, repo)
    assert refused.returncode == 1, refused.stderr
    assert "cannot back up 'disk' incrementally" in refused.stderr and why in refused.stderr, refused.stderr
    truth = (workdir / "disk.img").read_bytes()  # nobody writes between here and the backup's instant
    result = backup(run_cli, daemon, repo, "--incremental", "--fallback-full")
    changes = result["changes"]
    assert changes["method"] == "full" and why in changes["fallback"], changes
    assert why in result["stderr"]
    # Nothing taken from a parent: all of it read.
    assert result["stats"]["reused_bytes"] == 0, result["stats"]
    assert restored(run_cli, repo, result["snapshot"], workdir / "fallback.img") == truth
    # The fallback armed its own bitmap at its instant and removed the one it could not trust.
    assert set(bitmaps(run_cli, daemon)) == {tracking_bitmap_of(run_cli, repo, result["snapshot"])}
    return result


@pytest.mark.slow  # three or four backups, two restores
def test_a_forgotten_only_parent_means_no_parent(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    first = backup(run_cli, daemon, repo)
    proc = run_cli("forget", "--repo", str(repo), first["snapshot"])
    assert proc.returncode == 0, proc.stderr
    write_round(daemon, random.Random(21))
    refuses_then_falls_back(run_cli, daemon, repo, workdir, "no earlier snapshot of this name")


@pytest.mark.slow  # three or four backups, two restores
def test_a_forgotten_parent_falls_back_to_its_own_parent_whose_bitmap_is_gone(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """Forget the newest snapshot: the one before it becomes the parent, but its bitmap was retired when
    the newer one committed -- that bitmap cannot say what changed since."""
    first = backup(run_cli, daemon, repo)
    write_round(daemon, random.Random(22))
    second = backup(run_cli, daemon, repo, "--incremental")
    assert second["changes"]["method"] == "bitmap"
    proc = run_cli("forget", "--repo", str(repo), second["snapshot"])
    assert proc.returncode == 0, proc.stderr
    write_round(daemon, random.Random(23))
    gone = tracking_bitmap_of(run_cli, repo, first["snapshot"])
    refuses_then_falls_back(run_cli, daemon, repo, workdir, f"bitmap '{gone}' is gone")


def test_a_parent_recorded_damaged(run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path) -> None:
    first = backup(run_cli, daemon, repo)
    chunk = sorted((repo / "chunks").glob("*/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = run_cli("verify", "--repo", str(repo), "--read-data")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [r["status"] for r in snapshots(run_cli, repo)] == ["damaged"]
    write_round(daemon, random.Random(24))
    why = f"the parent snapshot {first['snapshot'][:8]} is recorded damaged"
    refuses_then_falls_back(run_cli, daemon, repo, workdir, why)


def test_a_bitmap_deleted_by_someone_else(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    first = backup(run_cli, daemon, repo)
    name = tracking_bitmap_of(run_cli, repo, first["snapshot"])
    assert set(bitmaps(run_cli, daemon)) == {name}
    qmp(run_cli, daemon, "block-dirty-bitmap-remove", {"node": "disk", "name": name})
    write_round(daemon, random.Random(25))
    refuses_then_falls_back(run_cli, daemon, repo, workdir, f"bitmap '{name}' is gone")


def test_a_bitmap_deleted_and_created_again_by_someone_else(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """Same name, same node, enabled, consistent: it only lacks the writes made while it did not exist --
    and the parent's generation marker, which gives it away."""
    first = backup(run_cli, daemon, repo)
    name = tracking_bitmap_of(run_cli, repo, first["snapshot"])
    qmp(run_cli, daemon, "block-dirty-bitmap-remove", {"node": "disk", "name": name})
    write_round(daemon, random.Random(29))  # unrecorded by the impostor
    persistent = daemon.kind == "cowbackup"  # qemu-storage-daemon stores bitmaps in qcow2 images only
    qmp(run_cli, daemon, "block-dirty-bitmap-add", {"node": "disk", "name": name, "persistent": persistent})
    write_round(daemon, random.Random(30))  # recorded by it
    why = f"bitmap '{name}' lacks the generation marker of the parent snapshot {first['snapshot'][:8]}"
    refuses_then_falls_back(run_cli, daemon, repo, workdir, why)
    assert "cb-" not in "".join(n for n in node_names(run_cli, daemon) if n != "disk")  # no canary left


@pytest.mark.parametrize("kind", KINDS)
def test_a_daemon_killed_between_two_incrementals_leaves_its_qcow2_bitmap_in_use(
    run_cli: RunCli, repo: Path, workdir: Path, kind: DaemonKind
) -> None:
    """A qcow2 image keeps the tracking bitmap; a clean restart stores it (and the next open marks it in
    use); a SIGKILL then leaves it in use, so it loads inconsistent: the next incremental falls back."""
    image = workdir / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(image), str(SIZE)], check=True, capture_output=True
    )
    blockdevs = [f"driver=qcow2,node-name=disk,file.driver=file,file.filename={image}"]
    started: list[subprocess.Popen[bytes]] = []

    def start() -> DaemonProcess:
        (workdir / "daemon.pid").unlink(missing_ok=True)
        return launch(kind, daemon_argv(kind, image, workdir, blockdevs), workdir, started)

    try:
        daemon = start()
        write_round(daemon, random.Random(31))
        first = backup(run_cli, daemon, repo)
        name = tracking_bitmap_of(run_cli, repo, first["snapshot"])
        qmp(run_cli, daemon, "quit")  # a clean stop stores the bitmap
        daemon.proc.wait(30)
        daemon = start()
        assert bitmaps(run_cli, daemon)[name]["persistent"] is True
        write_round(daemon, random.Random(32))
        second = backup(run_cli, daemon, repo, "--incremental")  # the chain goes on across the restart
        assert second["changes"]["method"] == "bitmap", second["stderr"]
        name = tracking_bitmap_of(run_cli, repo, second["snapshot"])
        qmp(run_cli, daemon, "quit")
        daemon.proc.wait(30)
        daemon = start()  # the bitmap is stored now, and marked in use while the image is open
        write_round(daemon, random.Random(33))
        daemon.proc.kill()
        daemon.proc.wait(30)
        daemon = start()
        assert bitmaps(run_cli, daemon)[name]["inconsistent"] is True
        write_round(daemon, random.Random(34))
        refused = incremental(run_cli, daemon, repo)
        why = f"bitmap '{name}' is inconsistent (its daemon stopped while it was in use)"
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        truth = run_image_bytes(image)
        result = backup(run_cli, daemon, repo, "--incremental", "--fallback-full")
        assert result["changes"]["method"] == "full" and why in result["changes"]["fallback"]
        assert restored(run_cli, repo, result["snapshot"], workdir / "fallback.img") == truth
    finally:
        kill_all(started)


def run_image_bytes(image: Path) -> bytes:
    """The guest's view of a qcow2 image (its daemon writes nothing meanwhile)."""
    raw = image.with_suffix(".view.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def test_a_bitmap_disabled_by_someone_else(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    first = backup(run_cli, daemon, repo)
    name = tracking_bitmap_of(run_cli, repo, first["snapshot"])
    qmp(run_cli, daemon, "block-dirty-bitmap-disable", {"node": "disk", "name": name})
    assert bitmaps(run_cli, daemon)[name]["recording"] is False
    write_round(daemon, random.Random(26))  # unrecorded: an incremental now would miss these
    refuses_then_falls_back(run_cli, daemon, repo, workdir, f"bitmap '{name}' was disabled")


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_repository_fails_the_backup_and_commits_nothing(
    run_cli: RunCli, repo: Path, workdir: Path, kind: DaemonKind
) -> None:
    """The repository's file system fills up mid-backup: exit 1 with the reason, no snapshot, nothing
    left on the daemon (target or fleecing nodes, the new bitmap), and the guest still writes."""
    image = random_file(workdir / "disk.img", 24 * MiB, seed=7)  # random: neither dedup nor zstd shrink it
    started: list[subprocess.Popen[bytes]] = []
    with small_filesystem(workdir / "small", 8) as mnt:
        full = mnt / "repo"
        proc = run_cli("repo", "init", str(full), "--chunk-size", "256K")
        assert proc.returncode == 0, proc.stderr
        try:
            daemon = launch(kind, daemon_argv(kind, image, workdir), workdir, started)
            before = snapshots(run_cli, full)
            args = ["backup", "--qmp", str(daemon.qmp), "disk", "--repo", str(full), "--name", "vm1"]
            proc = run_cli(*args, "--bitmap", "cb", "--nbd-socket", str(daemon.nbd))
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            # Push: the job's error; pull: the repository's own, naming the chunk it could not write.
            space = "No space left on device" if kind == "cowbackup" else "no space left on the repository's"
            assert lines[0].startswith("cowbackup: backup failed: ") and space in lines[0], lines
            assert lines[0].endswith("; no snapshot committed"), lines
            assert snapshots(run_cli, full) == before == []
            # Nothing of the backup is left on the daemon: no target, no fleecing node, no bitmap.
            leftovers = {n for n in node_names(run_cli, daemon) if n.startswith(("repo-", "cb-"))}
            assert leftovers == set()
            assert bitmaps(run_cli, daemon) == {}
            exports = qmp(run_cli, daemon, "query-block-exports")
            assert [e["id"] for e in exports] == ["e"]
            # The guest goes on writing through its export, and reads back what it wrote.
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M", daemon.uri],
                check=True,
                capture_output=True,
            )
            assert image.read_bytes()[MiB : 2 * MiB] == b"\x5a" * MiB
        finally:
            kill_all(started)


@pytest.fixture
def qsd(start_daemon: Callable[[DaemonKind, Path], DaemonProcess], workdir: Path) -> DaemonProcess:
    random_file(workdir / "disk.img", SIZE, seed=9)  # write_round writes anywhere in SIZE
    return start_daemon("qemu-storage-daemon", workdir / "disk.img")


def assert_nothing_left(run_cli: RunCli, daemon: DaemonProcess, scratch: Path) -> None:
    """No fleecing node, no bitmap (ours are all named cb-...), no export but the guest's, no scratch file."""
    assert {n for n in node_names(run_cli, daemon) if n.startswith("cb-")} == set()
    assert bitmaps(run_cli, daemon) == {}
    assert [e["id"] for e in qmp(run_cli, daemon, "query-block-exports")] == ["e"]
    assert list(scratch.iterdir()) == []


def test_a_refused_nbd_server_start_undoes_the_fleecing(
    run_cli: RunCli, qsd: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """Without --nbd-socket, pull mode starts its own NBD server -- refused, since the daemon runs one for
    the guest.  By then the scratch node, its job, the frozen and the new bitmap exist: all go."""
    scratch = workdir / "scratch"
    scratch.mkdir()
    backup(run_cli, qsd, repo)  # a parent, so the refused one is incremental: a frozen bitmap too
    parent_bitmap = next(iter(bitmaps(run_cli, qsd)))
    write_round(qsd, random.Random(27))
    args = ["backup", "--qmp", str(qsd.qmp), "disk", "--repo", str(repo), "--name", "vm1", "--bitmap", "cb"]
    proc = run_cli(*args, "--incremental", "--scratch-dir", str(scratch))
    assert proc.returncode == 1, proc.stderr
    assert "the daemon already runs an NBD server" in proc.stderr, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr  # the teardown itself went without a hitch
    assert len(snapshots(run_cli, repo)) == 1
    qmp(run_cli, qsd, "block-dirty-bitmap-remove", {"node": "disk", "name": parent_bitmap})
    assert_nothing_left(run_cli, qsd, scratch)


def test_a_missing_scratch_dir_fails_before_anything_is_set_up(
    run_cli: RunCli, qsd: DaemonProcess, repo: Path, workdir: Path
) -> None:
    missing = workdir / "no-such-dir"
    args = ["backup", "--qmp", str(qsd.qmp), "disk", "--repo", str(repo), "--name", "vm1", "--bitmap", "cb"]
    proc = run_cli(*args, "--scratch-dir", str(missing), "--nbd-socket", str(qsd.nbd))
    # A block-layer error on bad input: exit 2, as for every BlockError (cli/main.py).
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Could not create '{missing}/cb-" in lines[0], proc.stderr
    assert lines[0].endswith(": No such file or directory"), proc.stderr
    assert snapshots(run_cli, repo) == []
    scratch = workdir / "scratch"
    scratch.mkdir()
    assert_nothing_left(run_cli, qsd, scratch)


def test_a_full_backup_retires_the_bitmap_of_the_one_before(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """A full backup (no --incremental) arms its own bitmap; the next incremental's parent is that full
    one, so the bitmap of the snapshot before it is of no use any more: it goes when the full commits."""
    backup(run_cli, daemon, repo)
    write_round(daemon, random.Random(28))
    second = backup(run_cli, daemon, repo)
    assert set(bitmaps(run_cli, daemon)) == {tracking_bitmap_of(run_cli, repo, second["snapshot"])}
