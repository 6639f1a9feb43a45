"""The repository commands end to end, through the real ``cowbackup`` process.

``repo init`` (each encryption mode, chunk sizes), ``backup --repo`` from a raw file, a qcow2 chain and an
NBD export, ``snapshots``, ``restore`` (sparse raw file, existing file, qcow2, NBD export), ``forget``,
``gc``, ``verify`` and ``repo key ...``; then bad input and failures, each with its defined outcome: the
exit code (0 ok, 1 failed, 2 usage), a one-line message naming what is wrong, and nothing written where
nothing may be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    Image,
    KiB,
    MiB,
    SegmentKind,
    allocated,
    assert_same_content,
    build_image,
    layout,
    qemu_img,
    qemu_img_compare,
    random_file,
)
from .nbd_peers import qemu_nbd
from .repo_helpers import (
    RepoCli,
    file_sha256,
    referenced_objects,
    repo_bytes,
    repo_objects,
    tree_state,
)

pytestmark = pytest.mark.usefixtures("need_qemu_img")

CHUNK = 64 * KiB

#: 1 MiB groups of data, written zeros and holes: restores must keep the zeros and holes unallocated.
PATTERN: list[tuple[int, SegmentKind]] = [
    (256 * KiB, "data"),
    (256 * KiB, "hole"),
    (128 * KiB, "zero"),
    (128 * KiB, "data"),
    (256 * KiB, "hole"),
]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's message: exactly one ``cowbackup: ...`` line on stderr (no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowbackup: "), proc.stderr
    return lines[0]


@pytest.fixture
def cli(workdir: Path) -> RepoCli:
    """An encrypted (repokey) repository with 64 KiB chunks, created."""
    c = RepoCli(workdir, workdir / "repo")
    c.init("--chunk-size", "64K")
    return c


@pytest.fixture
def image(workdir: Path) -> Image:
    """16 MiB: 6 MiB of data, 2 MiB of written zeros, 8 MiB of holes."""
    return build_image(workdir / "disk.img", 16 * MiB, layout(16 * MiB, PATTERN), seed=7)


# ---------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("encryption", ["repokey", "keyfile", "none"])
def test_init_each_encryption_backs_up_and_restores(workdir: Path, encryption: str) -> None:
    cli = RepoCli(workdir, workdir / "repo")
    info = cli.init("--encryption", encryption, "--chunk-size", "128K")
    assert info["encryption"] == encryption
    assert info["chunk_size"] == 128 * KiB
    keyfile = cli.keys_dir / info["id"]
    assert (cli.repo / "keys" / "repokey").exists() == (encryption == "repokey")
    assert keyfile.exists() == (encryption == "keyfile")
    if encryption == "keyfile":
        assert keyfile.stat().st_mode & 0o077 == 0, "the key file is readable by others"

    src = random_file(workdir / "src.img", 3 * MiB + 4 * KiB, seed=1)  # a partial last chunk
    sid = cli.backup(src, "host/vm/disk0")
    cli.assert_restores(sid[:8], file_sha256(src), workdir / "out.img")

    listed = cli.ok("repo", "info", str(cli.repo), "--json", password="")
    assert json.loads(listed.stdout)["snapshots"] == 1


@pytest.mark.parametrize("size", ["64K", "4M", "16M"])
def test_init_chunk_sizes(workdir: Path, size: str) -> None:
    info = RepoCli(workdir, workdir / "repo").init("--encryption", "none", "--chunk-size", size)
    assert info["chunk_size"] == {"64K": 64 * KiB, "4M": 4 * MiB, "16M": 16 * MiB}[size]


@pytest.mark.parametrize("size", ["32K", "100K", "32M", "0", "abc"])
def test_init_bad_chunk_size_is_a_usage_error(workdir: Path, size: str) -> None:
    cli = RepoCli(workdir, workdir / "repo")
    proc = cli.run("repo", "init", str(cli.repo), "--chunk-size", size)
    assert proc.returncode == 2, proc.stderr
    assert "chunk" in proc.stderr or "size" in proc.stderr
    assert not (cli.repo / "config").exists()


def test_init_twice_is_refused(cli: RepoCli) -> None:
    before = tree_state(cli.repo)
    proc = cli.run("repo", "init", str(cli.repo))
    assert proc.returncode == 2
    assert "already" in one_line_error(proc)
    assert tree_state(cli.repo) == before


# ---------------------------------------------------------------------------------------------- backup


def test_backup_raw_json_snapshots_and_sparse_restore(cli: RepoCli, image: Image, workdir: Path) -> None:
    proc = cli.ok(
        "backup", str(image.path), "--repo", str(cli.repo), "--name", "h1/vm1", "--json", "--tag", "t1"
    )
    records = json_lines(proc.stdout)
    assert records[0] == {"type": "start", "job": "h1/vm1", "total": image.size}
    progress = [r["current"] for r in records if r["type"] == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] == image.size
    assert [r["type"] for r in records][-1] == "result"
    assert {r["type"] for r in records} == {"start", "progress", "result"}
    result = records[-1]
    assert result["bytes"] == image.size
    assert result["stats"]["data_bytes"] == image.data_bytes
    assert result["stats"]["new_chunks"] == image.data_bytes // CHUNK
    sid = result["snapshot"]

    # A second backup of the same disk stores no new chunk; its parent is the first.
    second = json_lines(
        cli.ok("backup", str(image.path), "--repo", str(cli.repo), "--name", "h1/vm1", "--json").stdout
    )[-1]
    assert second["stats"]["new_chunks"] == 0 and second["stats"]["new_stored_bytes"] == 0

    rows = cli.snapshots()
    assert [r["id"] for r in rows] == [sid, second["snapshot"]]
    first = rows[0]
    assert (first["name"], first["status"], first["size"], first["tags"]) == (
        "h1/vm1",
        "ok",
        image.size,
        ["t1"],
    )
    assert rows[1]["parent"] == sid
    # Most of the data is random: it is stored at about its size (headers, nonces and tags on top).
    assert image.data_bytes <= first["stored_bytes"] < image.data_bytes * 1.02
    stats = first["stats"]
    assert stats["zero_bytes"] == image.size - image.data_bytes
    assert stats["requests_put"] >= image.data_bytes // CHUNK  # every new chunk is one request
    assert {"requests_get", "requests_list", "requests_delete", "requests_stat"} <= stats.keys()

    table = cli.ok("snapshots", "--repo", str(cli.repo)).stdout
    lines = [line for line in table.splitlines() if line.strip()]
    assert lines[0].split() == ["id", "name", "time", "size", "stored", "status"]
    assert (
        sid[:8] in lines[1]
        and "h1/vm1" in lines[1]
        and "16.0 MiB" in lines[1]
        and lines[1].split()[-1] == "ok"
    )
    assert len(lines) == 3
    assert [r["id"] for r in cli.snapshots("--name", "nobody")] == []

    out = workdir / "restored.img"
    proc = cli.restore(sid, out, "--json")
    assert proc.returncode == 0, proc.stderr
    restored = json_lines(proc.stdout)
    assert restored[0]["type"] == "start" and restored[-1]["type"] == "result"
    assert restored[-1]["bad_ranges"] == []
    assert_same_content(image.path, out)
    # Holes and zero chunks stay holes: only the data is allocated.
    assert allocated(out) <= image.data_bytes + 64 * KiB, (allocated(out), image.data_bytes)


def test_restore_over_existing_file_needs_force(cli: RepoCli, image: Image, workdir: Path) -> None:
    sid = cli.backup(image.path, "vm")
    target = random_file(workdir / "old.img", 20 * MiB, seed=3)
    before = file_sha256(target)
    proc = cli.restore(sid, target)
    assert proc.returncode == 2
    assert "--force" in one_line_error(proc)
    assert file_sha256(target) == before

    cli.ok("restore", "--repo", str(cli.repo), sid, str(target), "--force")
    assert_same_content(image.path, target)  # truncated to the disk's size, old bytes gone
    assert allocated(target) <= image.data_bytes + 64 * KiB


def test_restore_to_qcow2(cli: RepoCli, image: Image, workdir: Path) -> None:
    sid = cli.backup(image.path, "vm")
    out = workdir / "restored.qcow2"
    cli.ok("restore", "--repo", str(cli.repo), sid, str(out), "--target-format", "qcow2")
    check = qemu_img("check", "-f", "qcow2", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(out), str(image.path))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["virtual-size"] == image.size
    assert info["actual-size"] < image.size  # zero chunks are not allocated


def test_backup_qcow2_chain(cli: RepoCli, workdir: Path) -> None:
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    size = 8 * MiB
    assert (
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(base), str(size)).returncode
        == 0
    )
    io = ["-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 1M", "-c", "write -z 6M 512k"]
    assert (
        subprocess.run(
            ["qemu-io", "-f", "qcow2", *io, str(base)], capture_output=True, check=False
        ).returncode
        == 0
    )
    made = qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    assert made.returncode == 0, made.stderr
    changed = [
        "-c",
        "write -P 0x33 64k 64k",
        "-c",
        "write -P 0x44 2M 192k",
        "-c",
        "write -z 5M 64k",
        "-c",
        "write -P 0x55 7M 64k",
    ]
    assert (
        subprocess.run(
            ["qemu-io", "-f", "qcow2", *changed, str(top)], capture_output=True, check=False
        ).returncode
        == 0
    )

    sid = cli.backup(top, "vm/chain")
    out = workdir / "chain.img"
    cli.ok("restore", "--repo", str(cli.repo), sid, str(out))
    cmp = qemu_img("compare", "-F", "raw", str(top), str(out))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    stats = cli.snapshots()[0]["stats"]
    assert stats["data_bytes"] == 3 * MiB + 1 * MiB - 64 * KiB + 64 * KiB  # base data, one zeroed, one new


def test_backup_from_nbd_and_restore_to_nbd(cli: RepoCli, image: Image, workdir: Path) -> None:
    with qemu_nbd(workdir, image.path, name="source", read_only=True) as peer:
        sid = cli.backup(peer.uri(), "vm/nbd")
    blank = workdir / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(image.size)
    with qemu_nbd(workdir, blank, name="target") as peer:
        proc = cli.restore(sid, peer.uri())
        assert proc.returncode == 0, proc.stderr
    assert_same_content(image.path, blank)
    qemu_img_compare(image.path, blank)


# ---------------------------------------------------------------------------------------------- forget, gc


def test_forget_and_gc(cli: RepoCli, workdir: Path) -> None:
    a = random_file(workdir / "a.img", 4 * MiB, seed=10)
    b = workdir / "b.img"
    shutil.copy(a, b)
    with open(b, "r+b") as f:  # b shares all but its last MiB with a
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    sid_a = cli.backup(a, "vm", "--compression-level", "0")
    sid_b = cli.backup(b, "vm", "--compression-level", "0")
    sid_c = cli.backup(a, "other")

    dry = json.loads(
        cli.ok("forget", "--repo", str(cli.repo), "--keep-last", "1", "--dry-run", "--json").stdout
    )
    assert dry == {"kept": [sid_b, sid_c], "forgotten": [sid_a], "dry_run": True}
    dry = cli.ok("forget", "--repo", str(cli.repo), sid_a[:6], "--dry-run")
    assert dry.stdout.split() == [sid_a]
    assert len(cli.snapshots()) == 3

    # Forget c (by id) and a (by policy); a's chunks that b shares stay, a's last MiB goes.
    cli.ok("forget", "--repo", str(cli.repo), sid_c)
    forgot = json.loads(cli.ok("forget", "--repo", str(cli.repo), "--keep-last", "1", "--json").stdout)
    assert forgot["forgotten"] == [sid_a]
    assert [r["id"] for r in cli.snapshots()] == [sid_b]
    size_before = repo_bytes(cli.repo)
    out = cli.gc()
    assert out["deleted"] == 16 + 1 + 1  # a's 16 unique chunks, its index and refs segments
    assert out["deleted_bytes"] >= MiB
    assert repo_bytes(cli.repo) < size_before - MiB
    assert repo_objects(cli.repo) == referenced_objects(cli.repo)
    cli.assert_restores(sid_b, file_sha256(b), workdir / "out.img")
    assert cli.gc()["deleted"] == 0


def test_forget_bad_requests(cli: RepoCli) -> None:
    for args in ([], ["abcd", "--keep-last", "1"], ["--keep-last", "-1"], ["zzzz"], ["0123456789"]):
        proc = cli.run("forget", "--repo", str(cli.repo), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        one_line_error(proc)


# ---------------------------------------------------------------------------------------------- verify


def test_verify_modes(cli: RepoCli, workdir: Path) -> None:
    src = random_file(workdir / "src.img", 8 * MiB, seed=4)
    cli.backup(src, "vm")
    chunks = 8 * MiB // CHUNK
    code, report = cli.verify()
    assert (code, report["ok"], report["chunks_read"], report["snapshots"]) == (0, True, 0, 1)
    assert report["objects"] == chunks + 2
    code, report = cli.verify("--read-data")
    assert (code, report["ok"], report["chunks_read"]) == (0, True, chunks)
    code, report = cli.verify("--read-data=10")
    assert (code, report["ok"], report["chunks_read"]) == (0, True, round(chunks / 10))
    # Whoever keeps the storage has no passphrase at all.
    env = cli.env()
    del env["COWBACKUP_PASSWORD"]
    proc = cli.run("verify", "--repo", str(cli.repo), "--no-key", "--read-data", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["chunks_read"] == chunks
    proc = cli.run("verify", "--repo", str(cli.repo), "--read-data=0")
    assert proc.returncode == 2


# ---------------------------------------------------------------------------------------------- keys


def test_key_export_import_change_password(cli: RepoCli, workdir: Path) -> None:
    src = random_file(workdir / "src.img", MiB, seed=5)
    sid = cli.backup(src, "vm")
    saved = workdir / "key.json"
    cli.ok("repo", "key", "export", str(cli.repo), str(saved), password="")
    assert saved.read_bytes() == (cli.repo / "keys" / "repokey").read_bytes()
    assert cli.run("repo", "key", "export", str(cli.repo), str(saved)).returncode == 2  # no overwrite

    (cli.repo / "keys" / "repokey").unlink()
    lost = cli.run("snapshots", "--repo", str(cli.repo))
    assert lost.returncode != 0 and "key" in one_line_error(lost)
    wrong = cli.run("repo", "key", "import", str(cli.repo), str(saved), password="not it")
    assert wrong.returncode == 2 and "passphrase" in one_line_error(wrong)
    assert not (cli.repo / "keys" / "repokey").exists()
    cli.ok("repo", "key", "import", str(cli.repo), str(saved))
    cli.assert_restores(sid, file_sha256(src), workdir / "out.img")

    env = cli.env(COWBACKUP_NEW_PASSWORD="new secret")
    cli.ok("repo", "key", "change-password", str(cli.repo), env=env)
    old = cli.run("snapshots", "--repo", str(cli.repo))
    assert old.returncode == 2 and "wrong passphrase" in one_line_error(old)
    assert [
        r["id"]
        for r in json.loads(
            cli.ok("snapshots", "--repo", str(cli.repo), "--json", password="new secret").stdout
        )
    ] == [sid]
    newfile = workdir / "pw.txt"
    newfile.write_text("new secret\n")
    cli.ok("snapshots", "--repo", str(cli.repo), "--password-file", str(newfile), password="")


def test_keyfile_mode_with_keys_dir(workdir: Path) -> None:
    cli = RepoCli(workdir, workdir / "repo")
    repo_id = cli.init("--encryption", "keyfile", "--chunk-size", "64K")["id"]
    keyfile = cli.keys_dir / repo_id
    src = random_file(workdir / "src.img", MiB, seed=6)
    sid = cli.backup(src, "vm")
    saved = workdir / "key.json"
    cli.ok("repo", "key", "export", str(cli.repo), str(saved))
    assert saved.read_bytes() == keyfile.read_bytes()

    other = cli.env(COWBACKUP_KEYS_DIR=str(workdir / "elsewhere"))
    proc = cli.run("snapshots", "--repo", str(cli.repo), env=other)
    assert proc.returncode == 2 and repo_id in one_line_error(proc)
    cli.ok("repo", "key", "import", str(cli.repo), str(saved), env=other)
    assert (workdir / "elsewhere" / repo_id).read_bytes() == saved.read_bytes()
    restored = workdir / "out.img"
    proc = cli.run("restore", "--repo", str(cli.repo), sid, str(restored), env=other)
    assert proc.returncode == 0, proc.stderr
    assert file_sha256(restored) == file_sha256(src)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "command",
    [
        ["snapshots"],
        ["backup", "SRC", "--name", "vm"],
        ["restore", "latest", "OUT"],
        ["forget", "--keep-last", "1"],
        ["verify", "--read-data"],
        ["repo", "key", "change-password"],
    ],
)
def test_wrong_passphrase_writes_nothing(cli: RepoCli, workdir: Path, command: list[str]) -> None:
    src = random_file(workdir / "src.img", MiB, seed=8)
    cli.backup(src, "vm")
    cli.backup(src, "vm")
    args = [a.replace("SRC", str(src)).replace("OUT", str(workdir / "out.img")) for a in command]
    args += [str(cli.repo)] if args[0] == "repo" else ["--repo", str(cli.repo)]
    before = tree_state(cli.repo)
    cache_before = tree_state(cli.cache_dir)
    proc = cli.run(*args, password="wrong", env=None)
    assert proc.returncode == 2, proc.stderr
    assert "wrong passphrase" in one_line_error(proc)
    assert tree_state(cli.repo) == before
    assert tree_state(cli.cache_dir) == cache_before
    assert not (workdir / "out.img").exists()


def test_no_passphrase_without_a_tty(cli: RepoCli) -> None:
    env = cli.env()
    del env["COWBACKUP_PASSWORD"]
    proc = cli.run("snapshots", "--repo", str(cli.repo), env=env)
    assert proc.returncode == 2
    assert "passphrase" in one_line_error(proc)
    empty = cli.workdir / "empty.txt"
    empty.write_text("")
    proc = cli.run("snapshots", "--repo", str(cli.repo), "--password-file", str(empty), env=env)
    assert proc.returncode == 2 and "empty" in one_line_error(proc)


def test_not_a_repository(cli: RepoCli, workdir: Path) -> None:
    for where in (workdir / "nothing-here", workdir):
        proc = cli.run("snapshots", "--repo", str(where))
        assert proc.returncode == 2
        assert str(where) in one_line_error(proc) and "not a cowbackup repository" in proc.stderr
    assert not (workdir / "nothing-here").exists()


def test_newer_format_version(cli: RepoCli) -> None:
    config = cli.repo / "config"
    doc = json.loads(config.read_bytes())
    doc["version"] = 2
    config.write_text(json.dumps(doc))
    proc = cli.run("snapshots", "--repo", str(cli.repo))
    assert proc.returncode == 2
    assert "version 2" in one_line_error(proc)


@contextlib.contextmanager
def damaged(path: Path, how: str) -> Iterator[None]:
    """Truncate ``path`` or flip one byte in its middle; put it back afterwards."""
    original = path.read_bytes()
    path.chmod(0o644)
    if how == "truncate":
        path.write_bytes(original[: len(original) // 2])
    else:
        mid = len(original) // 2
        path.write_bytes(original[:mid] + bytes([original[mid] ^ 0x40]) + original[mid + 1 :])
    try:
        yield
    finally:
        path.write_bytes(original)


def only(directory: Path) -> Path:
    (found,) = (p for p in directory.rglob("*") if p.is_file())
    return found


@pytest.mark.parametrize("how", ["truncate", "alter"])
def test_corrupt_config_manifest_index_are_named(cli: RepoCli, workdir: Path, how: str) -> None:
    src = random_file(workdir / "src.img", MiB, seed=9)
    sid = cli.backup(src, "vm")
    out = workdir / "out.img"

    with damaged(cli.repo / "config", how):
        proc = cli.run("snapshots", "--repo", str(cli.repo))
        assert proc.returncode in (1, 2)
        assert "'config'" in one_line_error(proc)

    manifest = cli.repo / "snapshots" / sid
    with damaged(manifest, how):
        for args in (["snapshots"], ["restore", sid, str(out)]):
            proc = cli.run(*args, "--repo", str(cli.repo))
            assert proc.returncode == 1, proc.stderr
            assert f"snapshots/{sid}" in one_line_error(proc)
        code, report = cli.verify()
        assert code == 1 and report["damaged"] == {sid: [f"snapshots/{sid}"]}
    assert not out.exists()

    index = only(cli.repo / "index")
    name = str(index.relative_to(cli.repo))
    with damaged(index, how):
        proc = cli.restore(sid, out)
        assert proc.returncode == 1
        assert name in one_line_error(proc)
        out.unlink(missing_ok=True)
        code, report = cli.verify("--no-repair")
        assert code == 1 and name in report["bad"] and report["damaged"] == {sid: [name]}


def test_damaged_chunk_restore_fails_and_partial_restores_the_rest(workdir: Path) -> None:
    # Without encryption a chunk's name is the SHA-256 of its data: the test knows which one to damage.
    cli = RepoCli(workdir, workdir / "repo")
    cli.init("--encryption", "none", "--chunk-size", "64K")
    src = random_file(workdir / "src.img", 2 * MiB, seed=11)
    sid = cli.backup(src, "vm")
    data = src.read_bytes()
    third = data[2 * CHUNK : 3 * CHUNK]
    digest = hashlib.sha256(third).hexdigest()
    target_chunk = cli.repo / "chunks" / digest[:2] / digest
    original = target_chunk.read_bytes()
    mid = len(original) // 2
    target_chunk.write_bytes(original[:mid] + bytes([original[mid] ^ 1]) + original[mid + 1 :])

    out = workdir / "out.img"
    proc = cli.restore(sid, out)
    assert proc.returncode == 1
    message = one_line_error(proc)
    assert f"[{2 * CHUNK}, +{CHUNK})" in message and "--partial" in message
    assert str(target_chunk.relative_to(cli.repo)) in message

    out.unlink(missing_ok=True)
    proc = cli.restore(sid, out, "--partial")
    assert proc.returncode == 1
    assert f"zeros at [{2 * CHUNK}, +{CHUNK})" in proc.stderr
    assert out.read_bytes() == data[: 2 * CHUNK] + bytes(CHUNK) + data[3 * CHUNK :]
    assert third not in out.read_bytes()

    # verify quarantines it and marks the snapshot; the next backup of the same data heals it.
    code, report = cli.verify("--read-data")
    assert code == 1 and report["damaged"] == {sid: [str(target_chunk.relative_to(cli.repo))]}
    assert cli.snapshots()[0]["status"] == "damaged"
    cli.backup(src, "vm")
    code, report = cli.verify("--read-data")
    assert code == 0 and report["healed"] == [sid]
    cli.assert_restores(sid, file_sha256(src), out)
