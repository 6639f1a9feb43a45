"""Live backups into a repository, from both daemons: ours (push: the backup job writes into a
``cowbackup-repo`` node) and qemu-storage-daemon (pull: fleecing read over NBD).

A chain of a full backup and five incrementals while qemu-io writes, writes zeros and discards through
the daemon's NBD export between them: every snapshot restores to the disk as it was when its backup
started, and each incremental reads exactly the chunks that were written to.  Then the daemon is killed
and restarted: the next incremental cannot trust its bitmap, says why, and falls back to a full read.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import KiB, MiB, RunCli, StartCli, build_image, layout
from .test_live_backup import DaemonKind, DaemonProcess, daemon_argv, kill_all, launch, start_daemon

__all__ = ["start_daemon"]  # the fixture, used here by name

SIZE = 16 * MiB
CHUNK = 256 * KiB
KINDS: list[DaemonKind] = ["cowbackup", "qemu-storage-daemon"]


@pytest.fixture(params=KINDS)
def daemon(
    request: pytest.FixtureRequest, workdir: Path, start_daemon: Callable[[DaemonKind, Path], DaemonProcess]
) -> DaemonProcess:
    segments = layout(SIZE, [(MiB, "data"), (768 * KiB, "hole"), (256 * KiB, "zero"), (2 * MiB, "hole")])
    image = build_image(workdir / "disk.img", SIZE, segments, seed=5).path
    kind: DaemonKind = request.param
    return start_daemon(kind, image)


@pytest.fixture
def repo(run_cli: RunCli, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COWBACKUP_PASSWORD", "live secret")
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(workdir / "cache"))
    proc = run_cli("repo", "init", str(workdir / "repo"), "--chunk-size", str(CHUNK))
    assert proc.returncode == 0, proc.stderr
    return workdir / "repo"


def backup(run_cli: RunCli, daemon: DaemonProcess, repo: Path, *extra: str) -> dict[str, Any]:
    args = ["backup", "--qmp", str(daemon.qmp), "disk", "--repo", str(repo), "--name", "vm1"]
    # The daemon's NBD server runs already (the guest's export): pull mode reuses it.
    args += ["--bitmap", "cb", "--json", "--nbd-socket", str(daemon.nbd), *extra]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def write_round(daemon: DaemonProcess, rng: random.Random) -> set[int]:
    """A few writes, zero writes and discards through the export; the chunk positions they touch."""
    written, discarded = write_round_by_kind(daemon, rng)
    return written | discarded


def write_round_by_kind(daemon: DaemonProcess, rng: random.Random) -> tuple[set[int], set[int]]:
    """:func:`write_round`, whose chunk positions are told apart: written (data or zeros), discarded."""
    commands: list[str] = []
    written: set[int] = set()
    discarded: set[int] = set()
    for _ in range(rng.randrange(2, 7)):
        length = rng.choice([4 * KiB, 64 * KiB, 300 * KiB])
        # 4 KiB-aligned: a smaller discard is trimmed to nothing (advisory), as in QEMU
        offset = rng.randrange(0, SIZE - length) // (4 * KiB) * (4 * KiB)
        op = rng.choice([f"write -P {rng.randrange(1, 256):#04x}", "write -z", "discard"])
        commands += ["-c", f"{op} {offset} {length}"]
        touched = range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
        (discarded if op == "discard" else written).update(touched)
    # -d unmap: else qemu-io drops its discards before they reach the daemon
    subprocess.run(
        ["qemu-io", "-f", "raw", "-d", "unmap", *commands, daemon.uri], check=True, capture_output=True
    )
    return written, discarded


def canary_chunks(changes: dict[str, Any]) -> set[int]:
    """The chunk positions of a snapshot's generation marker: the next incremental reads them too."""
    canary = changes["tracking"]["canary"]
    return {offset // CHUNK for offset in canary["offsets"]}


def restored(run_cli: RunCli, repo: Path, snapshot: str, out: Path) -> bytes:
    proc = run_cli("restore", "--repo", str(repo), snapshot, str(out))
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_a_chain_of_incrementals_restores_every_instant(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    rng = random.Random(11)
    image = workdir / "disk.img"
    chain = []
    previous = backup(run_cli, daemon, repo)
    assert previous["changes"]["method"] == "full"
    chain.append((previous["snapshot"], image.read_bytes()))
    for _ in range(5):
        touched = write_round(daemon, rng) | canary_chunks(previous["changes"])
        truth = image.read_bytes()  # nobody writes between here and the backup's instant
        result = backup(run_cli, daemon, repo, "--incremental")
        assert result["changes"]["method"] == "bitmap", result["stderr"]
        stats = result["stats"]
        # Exactly the written chunks (and the parent's canaries) are read, as data or as zeros; every
        # other one is the parent's.
        assert stats["data_bytes"] + stats["zero_bytes"] == len(touched) * CHUNK
        assert stats["reused_bytes"] == SIZE - len(touched) * CHUNK
        chain.append((result["snapshot"], truth))
        previous = result
    for i, (snapshot, truth) in enumerate(chain):
        assert restored(run_cli, repo, snapshot, workdir / f"restored{i}.img") == truth
    proc = run_cli("verify", "--repo", str(repo), "--read-data")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_writes_during_each_backup_are_in_the_next_one_only(
    run_cli: RunCli, start_cli: StartCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """qemu-io writes, writes zeros and discards while each backup of a chain runs (slowed by --speed):
    each snapshot holds the disk as it was at its instant, never a byte written after it, and the next
    incremental reads exactly what was written during the one before (plus that one's canaries).

    qemu-storage-daemon drops a guest's discards while a backup job runs (its copy-before-write filter
    node is opened without "unmap": they succeed, change nothing and mark no bitmap); ours pass them on."""
    rng = random.Random(12)
    image = workdir / "disk.img"
    chain = []
    previous: dict[str, Any] | None = None
    during: set[int] = set()
    for i in range(5):
        truth = image.read_bytes()  # nobody writes between here and the backup's instant
        args = ["backup", "--qmp", str(daemon.qmp), "disk", "--repo", str(repo), "--name", "vm1"]
        args += ["--bitmap", "cb", "--json", "--nbd-socket", str(daemon.nbd)]
        # A few seconds each: the full reads 16 MiB, an incremental about ten chunks of 256 KiB.
        proc = start_cli(*args, *(["--incremental", "--speed", "1M"] if i else ["--speed", "4M"]))
        proc.wait_line(lambda line: '"type": "start"' in line)  # after the instant
        written, discarded = write_round_by_kind(daemon, rng)
        still_running = proc.proc.poll() is None
        assert proc.finish() == 0, proc.stderr()
        assert still_running, "the writes came after the backup had ended: slow it down further"
        result: dict[str, Any] = json.loads(proc.stdout_lines[-1])
        if previous is not None:
            assert result["changes"]["method"] == "bitmap", proc.stderr()
            read = during | canary_chunks(previous["changes"])
            stats = result["stats"]
            assert stats["data_bytes"] + stats["zero_bytes"] == len(read) * CHUNK
        chain.append((result["snapshot"], truth))
        previous = result
        during = written | discarded if daemon.kind == "cowbackup" else written
    for i, (snapshot, truth) in enumerate(chain):
        assert restored(run_cli, repo, snapshot, workdir / f"restored{i}.img") == truth


def test_a_killed_daemon_makes_the_next_incremental_fall_back(
    run_cli: RunCli,
    daemon: DaemonProcess,
    repo: Path,
    workdir: Path,
    start_daemon: Callable[[DaemonKind, Path], DaemonProcess],
) -> None:
    backup(run_cli, daemon, repo)
    daemon.proc.kill()
    daemon.proc.wait()
    (workdir / "daemon.pid").unlink()
    again = start_daemon(daemon.kind, workdir / "disk.img")
    write_round(again, random.Random(3))
    truth = (workdir / "disk.img").read_bytes()
    refused = run_cli(
        "backup", "--qmp", str(again.qmp), "disk", "--repo", str(repo), "--name", "vm1", "--bitmap", "cb",
        "--incremental", *(["--nbd-socket", str(again.nbd)] if again.kind == "qemu-storage-daemon" else []),
    )  # fmt: skip
    assert refused.returncode == 1 and "cannot back up 'disk' incrementally" in refused.stderr
    # ours kept the bitmap in a sidecar, in use when the daemon died; QEMU's raw file holds none.
    why = "inconsistent" if again.kind == "cowbackup" else "is gone"
    result = backup(run_cli, again, repo, "--incremental", "--fallback-full")
    assert result["changes"]["method"] == "full" and why in result["changes"]["fallback"]
    assert why in result["stderr"]
    assert restored(run_cli, repo, result["snapshot"], workdir / "after.img") == truth
    # The fallback armed a new bitmap: the next one is incremental again.
    touched = (
        write_round(again, random.Random(4))
        | canary_chunks(result["changes"])
        | canary_chunks(result["changes"])
    )
    truth = (workdir / "disk.img").read_bytes()
    following = backup(run_cli, again, repo, "--incremental")
    assert following["changes"]["method"] == "bitmap"
    assert following["stats"]["data_bytes"] + following["stats"]["zero_bytes"] == len(touched) * CHUNK
    assert restored(run_cli, repo, following["snapshot"], workdir / "following.img") == truth
    shutil.rmtree(workdir / "cache", ignore_errors=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_consistent_group_of_two_disks(
    run_cli: RunCli, repo: Path, workdir: Path, kind: DaemonKind
) -> None:
    """``--node`` backs up several disks at one instant into one snapshot; each is incremental on its own."""
    segments = layout(SIZE, [(MiB, "data"), (MiB, "hole")])
    first = build_image(workdir / "disk.img", SIZE, segments, seed=1).path
    second = build_image(workdir / "disk2.img", SIZE, segments, seed=2).path
    blockdevs = [  # discard=unmap: else the daemon drops discards, and they change nothing
        f"driver=file,node-name=disk,filename={first},discard=unmap",
        f"driver=file,node-name=disk2,filename={second},discard=unmap",
    ]
    started: list[subprocess.Popen[bytes]] = []
    try:
        daemon = launch(kind, daemon_argv(kind, first, workdir, blockdevs), workdir, started)
        full = backup(run_cli, daemon, repo, "--node", "disk2")
        assert set(full["disks"]) == {"disk", "disk2"}
        touched = write_round(daemon, random.Random(8))  # through the export of 'disk' only
        truth = (first.read_bytes(), second.read_bytes())
        inc = backup(run_cli, daemon, repo, "--node", "disk2", "--incremental")
        assert {d["method"] for d in inc["disks"].values()} == {"bitmap"}
        stats = inc["stats"]
        # From disk2 only its canaries.
        read = len(touched | canary_chunks(full["disks"]["disk"])) + len(
            canary_chunks(full["disks"]["disk2"])
        )
        assert stats["data_bytes"] + stats["zero_bytes"] == read * CHUNK
        for name, contents in zip(("disk", "disk2"), truth, strict=True):
            out = workdir / f"restored-{name}.img"
            assert restored(run_cli, repo, f"{inc['snapshot']}:{name}", out) == contents
    finally:
        kill_all(started)


def test_an_audit_catches_a_write_behind_the_daemons_back(
    run_cli: RunCli, daemon: DaemonProcess, repo: Path, workdir: Path
) -> None:
    """``--audit``: a sample of what the bitmap calls clean is re-read from the frozen view and compared
    with the parent; a write the bitmap never saw (straight into the image file) is caught, said loudly,
    and the snapshot is read whole -- it still restores to the disk at its instant."""
    image = workdir / "disk.img"
    full = backup(run_cli, daemon, repo)
    touched = write_round(daemon, random.Random(6)) | canary_chunks(full["changes"])
    clean = backup(run_cli, daemon, repo, "--incremental", "--audit", "100")
    assert clean["changes"]["method"] == "bitmap"
    assert clean["changes"]["audit"] == {"checked": SIZE // CHUNK - len(touched), "mismatches": 0}
    with open(image, "r+b") as f:  # behind the daemon's back: no bitmap sees this
        f.seek(5 * CHUNK + 1000)
        f.write(b"\xab" * 3000)
    truth = image.read_bytes()
    audited = backup(run_cli, daemon, repo, "--incremental", "--audit", "100")
    changes = audited["changes"]
    assert changes["method"] == "full" and "the bitmap missed writes" in changes["fallback"]
    assert changes["audit"]["mismatches"] == 1 and "WARNING" in audited["stderr"]
    assert restored(run_cli, repo, audited["snapshot"], workdir / "audited.img") == truth
