"""``cowbackup serve --repo REPO SNAP[:DISK]``: a repository snapshot over NBD, read by the real peers.

The source image mixes data, written zeros and holes around 1 MiB chunk boundaries, one chunk that ends
in zeros, two identical chunks (stored once), and a short last chunk.  It is backed up into a fresh
encrypted repository once per module; each test serves it and checks what qemu-img, qemu-io, nbdinfo,
nbdcopy and libnbd see against the source: the bytes, the allocation map (zero chunks are hole+zero),
refused writes, an overlay that takes writes and keeps them across restarts while the snapshot stays
as it was, EIO for a chunk missing from the store, and clear errors for bad input.  The last test runs
the node in-process on a sparse 1 GiB disk of two index segments to check that segments load lazily
and that the caches stay within their bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowbackup.block.node import Status
from cowbackup.cli.main import main
from cowbackup.repo.backends import open_store
from cowbackup.repo.repository import Repository, chunk_name
from cowbackup.repo.snapshot_node import SnapshotNode

from .conftest import (
    CliProcess,
    Image,
    KiB,
    MiB,
    RunCli,
    Segment,
    assert_same_content,
    build_image,
    qemu_img_compare,
)
from .nbd_server_fixtures import (
    SERVE_TIMEOUT,
    ServedImage,
    check_tool,
    nbdinfo_map,
    nbdsh_script,
    run_tool,
    script_result,
    system_python_env,
)

PASSWORD = "correct horse"
CHUNK = 1 * MiB
SIZE = 20 * MiB + 64 * KiB  # a short last chunk
SEGMENTS = (
    Segment(0, 3 * MiB // 2, "data"),  # chunk 0 data, chunk 1 half data, half hole
    Segment(3 * MiB // 2, 3 * MiB // 2, "hole"),  # chunk 2: a hole -> zero chunk
    Segment(3 * MiB, 3 * MiB, "zero"),  # chunks 3-5: written zeros -> zero chunks
    Segment(6 * MiB, 4 * KiB, "data"),  # chunk 6: 4 KiB of data, then holes
    Segment(6 * MiB + 4 * KiB, 4 * MiB - 4 * KiB, "hole"),  # chunks 7-9 zero
    Segment(10 * MiB, 512 * KiB, "data"),  # chunk 10: data, then written zeros
    Segment(10 * MiB + 512 * KiB, 512 * KiB, "zero"),
    Segment(11 * MiB, 1 * MiB, "hole"),  # chunk 11 zero; chunk 12 becomes a copy of chunk 0
    Segment(13 * MiB, 6 * MiB, "hole"),  # chunks 13-18 zero
    Segment(19 * MiB, SIZE - 19 * MiB, "data"),  # chunks 19 and the short 20
)
DATA_CHUNKS = (0, 1, 6, 10, 12, 19, 20)

_serial = itertools.count()


@dataclass(frozen=True)
class Repo:
    path: Path
    source: Image
    snapshot: str  # the id of the source's snapshot ("a")
    other: str  # the id of a second snapshot ("b") of the same bytes


@pytest.fixture(scope="module", autouse=True)
def _environment(module_workdir: Path) -> Iterator[None]:
    """The passphrase, and cache and key directories of the module's own (never ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COWBACKUP_PASSWORD", PASSWORD)
        mp.setenv("COWBACKUP_CACHE_DIR", str(module_workdir / "cache"))
        mp.setenv("COWBACKUP_KEYS_DIR", str(module_workdir / "keys"))
        yield


def cowbackup(*args: str) -> None:
    """Run a cowbackup command in this process (the CLI's entry point; quicker than a process)."""
    assert main(list(args)) == 0, args


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run a cowbackup command in this process that must fail with exit 2; its stderr."""
    capsys.readouterr()
    code: int | str | None
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert "Traceback" not in err, err
    return err


def open_repo(path: Path) -> Repository:
    return Repository.open(open_store(str(path), "none"), lambda: PASSWORD.encode())


def backup(image: Path, repo: Path, name: str) -> str:
    """Back ``image`` up as snapshot ``name``; its id."""
    cowbackup("backup", str(image), "--repo", str(repo), "--name", name)
    (snap,) = [s for s in open_repo(repo).snapshots() if s.name == name]
    return snap.id


@pytest.fixture(scope="module")
def repo(module_workdir: Path, _environment: None) -> Repo:
    image = build_image(module_workdir / "source.img", SIZE, SEGMENTS, seed=12)
    with open(image.path, "r+b") as f:  # chunk 12 = chunk 0: stored once, read through one cache entry
        first = f.read(CHUNK)
        f.seek(12 * CHUNK)
        f.write(first)
    path = module_workdir / "repo"
    cowbackup("repo", "init", str(path), "--chunk-size", "1M", "--encryption", "repokey")
    a = backup(image.path, path, "a")
    b = backup(image.path, path, "b")
    return Repo(path, image, a, b)


@contextlib.contextmanager
def serve(workdir: Path, *args: str) -> Iterator[ServedImage]:
    """``cowbackup serve ARGS --socket PATH``; stopped with SIGINT at the end (exit 0, no traceback)."""
    n = next(_serial)
    sock = workdir / f"repo-nbd-{n}.sock"
    proc = CliProcess(["serve", *args, "--socket", str(sock)], workdir, workdir / f"serve-{n}.stderr")
    try:
        uri = proc.wait_line(lambda line: line.startswith("nbd"), timeout=SERVE_TIMEOUT)
        served = ServedImage(uri, sock, proc)
        yield served
        assert served.running(), f"serve ended early: {proc.stderr()}"
        code = served.stop()
        assert code == 0, f"cowbackup serve exited {code}: {proc.stderr()}"
        assert "Traceback" not in proc.stderr(), proc.stderr()
    finally:
        proc.close()


def expected_map(path: Path) -> list[tuple[int, int, bool]]:
    """Chunk by chunk: data unless the chunk reads as zeros (merged)."""
    extents: list[tuple[int, int, bool]] = []
    with open(path, "rb") as f:
        for start in range(0, SIZE, CHUNK):
            end = min(SIZE, start + CHUNK)
            data = f.read(end - start).count(0) != end - start
            if extents and extents[-1][2] == data:
                extents[-1] = (extents[-1][0], end, data)
            else:
                extents.append((start, end, data))
    return extents


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    """qemu-io on the export; every command must succeed."""
    argv = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        argv += ["-c", command]
    out = check_tool(*argv, uri)
    assert "failed" not in out, out
    return out


# ---------------------------------------------------------------------------------------- read-only


def test_serve_read_only_matches_source(repo: Repo, workdir: Path) -> None:
    with serve(workdir, "--repo", str(repo.path), repo.snapshot[:8]) as served:
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(repo.source.path), served.uri)
        # base:allocation: zero chunks are holes that read as zeros, everything else data.
        mapped = nbdinfo_map(served.uri)
        assert mapped == expected_map(repo.source.path)
        assert [s // CHUNK for s, _, data in mapped for s in range(s, _, CHUNK) if data] == list(DATA_CHUNKS)
        copy = workdir / "copy.img"
        check_tool("nbdcopy", served.uri, str(copy))
        assert_same_content(copy, repo.source.path)
        # qemu-io reads: zero chunks, a data chunk's zero tail, odd-sized reads across chunk boundaries.
        out = qemu_io(
            served.uri,
            "read -P 0 2M 4M",
            "read -P 0 10752k 512k",
            "read 1048575 3",
            "read 19M 1088k",
            read_only=True,
        )
        assert out.count("read ") == 4, out
        # Writes reach the server (libnbd's strict mode off) and are refused there; reads go on.
        results = script_result(
            run_tool(*nbdsh_script("nbdsh_errors.py", served.uri, "ro"), env=system_python_env())
        )
        for case in ("write", "trim", "write zeroes"):
            assert results[case] == {"result": "EPERM", "usable": True}, results
        assert results["unaligned read"]["result"] == "ok", results


# ------------------------------------------------------------------------------------------ overlay

OVERLAY_WRITES = (
    "write -P 0xab 1M 64k",  # inside a data chunk
    "write -z 0 4k",  # write zeroes over data
    "write -P 0xcd 3M 100k",  # inside a zero chunk
    "write -P 0xef 20M 64k",  # the short last chunk, up to the end of the disk
    "write -P 0x11 2096652 1000",  # unaligned, across a chunk boundary
)
OVERLAY_CHECKS = (
    "read -P 0xab 1M 64k",
    "read -P 0 0 4k",
    "read -P 0xcd 3M 100k",
    "read -P 0 3172k 2948k",
    "read -P 0xef 20M 64k",
    "read -P 0x11 2096652 1000",
)


def test_overlay_takes_writes_and_keeps_them(repo: Repo, workdir: Path) -> None:
    overlay = workdir / "overlay.qcow2"
    expected = workdir / "expected.img"
    shutil.copyfile(repo.source.path, expected)
    qemu_io(str(expected), *OVERLAY_WRITES)  # the same writes on a plain copy: what the export must read

    with serve(workdir, "--repo", str(repo.path), repo.snapshot, "--overlay", str(overlay)) as served:
        qemu_io(served.uri, *OVERLAY_WRITES, *OVERLAY_CHECKS)
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), served.uri)
    info = json.loads(check_tool("qemu-img", "info", "--output=json", str(overlay)))
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    assert repo.snapshot in info["backing-filename"]
    # Sparse: the overlay holds the writes, not the disk.
    assert os.stat(overlay).st_blocks * 512 < 4 * MiB

    # A restarted serve with the same overlay sees the same bytes and goes on writing there.
    with serve(workdir, "--repo", str(repo.path), repo.snapshot, "--overlay", str(overlay)) as served:
        qemu_io(served.uri, *OVERLAY_CHECKS, read_only=True)
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), served.uri)
        qemu_io(served.uri, "write -P 0x22 8M 4k")
        qemu_io(str(expected), "write -P 0x22 8M 4k")
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), served.uri)

    # The snapshot itself never changed: it restores to the source's bytes, and serves them read-only.
    restored = workdir / "restored.img"
    cowbackup("restore", "--repo", str(repo.path), repo.snapshot, str(restored))
    qemu_img_compare(restored, repo.source.path)
    with serve(workdir, "--repo", str(repo.path), repo.snapshot) as served:
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(repo.source.path), served.uri)


def test_overlay_of_another_snapshot_or_in_use_is_refused(
    repo: Repo, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = workdir / "overlay.qcow2"

    def serve_overlay(snapshot: str, path: Path) -> str:
        return refused(capsys, "serve", "--repo", str(repo.path), snapshot, "--overlay", str(path),
                       "--socket", str(workdir / "refused.sock"))  # fmt: skip

    with serve(workdir, "--repo", str(repo.path), repo.snapshot, "--overlay", str(overlay)) as served:
        qemu_io(served.uri, "write -P 0x33 0 4k")
        # The same overlay in use by a running serve: refused, not shared.
        assert "lock" in serve_overlay(repo.snapshot, overlay)
    before = overlay.read_bytes()

    # Snapshot b has the same bytes, but the overlay was made for a: refused, and left as it was.
    err = serve_overlay(repo.other, overlay)
    assert "made for another snapshot" in err and repo.snapshot in err, err
    assert overlay.read_bytes() == before

    # A file that is no overlay of ours: a raw file, a qcow2 with another backing file.
    raw = workdir / "raw.img"
    raw.write_bytes(bytes(64 * KiB))
    other = workdir / "other.qcow2"
    check_tool("qemu-img", "create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(other), str(SIZE))
    assert "cannot be used" in serve_overlay(repo.snapshot, raw)
    assert "not a cowbackup overlay" in serve_overlay(repo.snapshot, other)
    assert raw.read_bytes() == bytes(64 * KiB)


# ------------------------------------------------------------------------------------------- damage

NBDSH_READS = """
import json
def outcome(offset, length):
    try:
        return h.pread(length, offset).hex()[:16]
    except nbd.Error as err:
        return "errno %s" % err.errno
print(json.dumps([outcome(6 * 1024 * 1024, 4096), outcome(0, 8), outcome(6 * 1024 * 1024 + 100, 10)]))
"""


def test_missing_chunk_is_eio_for_its_range_only(repo: Repo, workdir: Path) -> None:
    damaged = workdir / "damaged"
    shutil.copytree(repo.path, damaged)
    repository = open_repo(damaged)
    disk = repository.load_manifest(repo.snapshot).disk(None)
    entries = repository.read_index(disk.segments[0])
    lost = entries[6]  # the chunk at 6 MiB (unique data)
    assert not lost.is_zero and [e for e in entries if e == lost] == [lost]
    os.unlink(damaged / chunk_name(lost.chunk_id))

    with serve(workdir, "--repo", str(damaged), repo.snapshot) as served:
        out = run_tool("qemu-io", "-r", "-f", "raw", "-c", "read 6M 4k", served.uri)
        assert "Input/output error" in out.stdout + out.stderr, out
        # One libnbd connection: EIO for the missing chunk, then data elsewhere, then EIO again.
        proc = run_tool("nbdsh", "-u", served.uri, "-c", NBDSH_READS, env=system_python_env())
        assert proc.returncode == 0, proc.stderr
        first = repo.source.path.read_bytes()[:8].hex()
        assert json.loads(proc.stdout) == ["errno EIO", first, "errno EIO"]
        # A whole-disk copy fails on that range; the server stays up and serves the rest.
        assert run_tool("nbdcopy", served.uri, str(workdir / "copy.img")).returncode != 0
        qemu_io(served.uri, "read 0 6M", "read -P 0 7M 3M", "read 10M 10M", read_only=True)
        assert served.running()
    assert "chunk at offset 6291456" in served.cli.stderr()


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_clearly(
    repo: Repo, run_cli: RunCli, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(workdir / "nbd.sock")
    cases = [
        (("--repo", str(repo.path), "0123abcd"), "no snapshot '0123abcd'"),
        (("--repo", str(repo.path), "nosuch@latest"), "no snapshot named 'nosuch'"),
        (("--repo", str(repo.path), f"{repo.snapshot}:disk7"), "has no disk 'disk7'"),
        ((str(repo.source.path), "--overlay", str(workdir / "o.qcow2")), "--overlay needs --repo"),
        ((str(repo.source.path), "--cache-size", "1M"), "--cache-size needs --repo"),
        (("--repo", str(workdir / "nowhere"), "latest"), "nowhere"),
        (("--repo", str(repo.path), "latest", "--overlay", str(workdir / "no" / "o.qcow2")), "directory"),
        (("--repo", str(repo.path), "latest", "--cache-size", "lots"), "invalid size 'lots'"),
    ]
    # In-process (the CLI's own entry point, quicker than a process per case) ...
    for args, message in cases:
        err = refused(capsys, "serve", *args, "--socket", sock)
        assert message in err, (args, err)
        assert not (workdir / "o.qcow2").exists() and not os.path.exists(sock)
    # ... and as a command: the exit code, for an unknown snapshot and a wrong passphrase.
    proc = run_cli("serve", "--repo", str(repo.path), "0123abcd", "--socket", sock)
    assert proc.returncode == 2 and "no snapshot '0123abcd'" in proc.stderr, proc.stderr
    wrong = workdir / "wrong-password"
    wrong.write_text("not it\n")
    proc = run_cli(
        "serve", "--repo", str(repo.path), "latest", "--password-file", str(wrong), "--socket", sock
    )
    assert proc.returncode == 2 and "passphrase" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- caches (in-process)


def test_segments_load_lazily_and_caches_stay_bounded(workdir: Path) -> None:
    """A sparse 1 GiB + 1 MiB disk of 64 KiB chunks has two index segments (16384 entries each)."""
    cs = 64 * KiB
    size = (1 << 30) + 1 * MiB
    segments = [Segment(0, 8 * cs, "data"), Segment(8 * cs, (1 << 30) - 8 * cs, "hole")]
    segments.append(Segment(1 << 30, 1 * MiB, "data"))
    image = build_image(workdir / "sparse.img", size, segments, seed=5)
    path = workdir / "repo"
    cowbackup("repo", "init", str(path), "--chunk-size", "64K", "--encryption", "repokey")
    sid = backup(image.path, path, "sparse")
    repository = open_repo(path)
    disk = repository.load_manifest(sid).disk(None)
    assert len(disk.segments) == 2
    source = image.path.read_bytes()

    async def check() -> None:
        node = SnapshotNode("snap", repository, sid, disk, cache_bytes=3 * cs, max_segments=1)
        try:
            assert node.segments.loads == 0  # nothing loaded up front
            # Eight readers of one chunk at once: one fetch.
            bufs = [bytearray(4096) for _ in range(8)]
            await asyncio.gather(*(node.read(100, buf) for buf in bufs))
            assert all(bytes(buf) == source[100 : 100 + 4096] for buf in bufs)
            assert (node.chunks.loads, node.segments.loads) == (1, 1)
            # Block status: data, then one zero extent that stops at the end of the segment.
            first = await node.block_status(0, size)
            assert (first.length, first.flags & Status.DATA) == (8 * cs, Status.DATA)
            hole = await node.block_status(8 * cs, size)
            assert hole.flags & Status.ZERO and not hole.flags & Status.DATA
            assert hole.end == 16384 * cs
            assert node.segments.loads == 1
            # Every data chunk of both segments, in one request each: the caches stay within bounds.
            head = bytearray(8 * cs)
            await node.read(0, head)
            tail = bytearray(1 * MiB)
            await node.read(1 << 30, tail)
            assert bytes(head) == source[: 8 * cs] and bytes(tail) == source[1 << 30 :]
            assert node.segments.loads == 2 and node.segments.used == 1
            assert node.chunks.loads == 8 + 16 and node.chunks.used <= 3 * cs
        finally:
            await node.close()

    asyncio.run(check())
