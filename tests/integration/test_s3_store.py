"""The storage backend contract over both backends (a directory, and S3 on a real Ceph RADOS Gateway),
the S3 backend's errors, and the repository commands end to end on S3.

The contract tests run unchanged over :class:`LocalStore` and :class:`S3Store`: whatever the repository
relies on must hold for both.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cowbackup.repo.errors import MissingObject, RepoUsageError, StoreError
from cowbackup.repo.repository import Repository
from cowbackup.repo.store import REQUEST_KINDS, RequestCounts, Store
from cowbackup.repo.store_local import LocalStore
from cowbackup.repo.store_s3 import S3Store

from .ceph_fixtures import TOOL, Ceph
from .conftest import MiB, RunCli, assert_same_content, random_file
from .s3_proxy import FaultProxy

WRONG_SECRET = "wrong-Zq8v3-key"


@pytest.fixture(scope="session")
def contract_bucket(ceph: Ceph) -> str:
    return ceph.new_bucket("contract")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each backend (S3: a new prefix in a shared bucket)."""
    s: Store
    if request.param == "local":
        s = LocalStore(str(tmp_path / "store"), "none")
    else:
        request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("contract_bucket")
        s = S3Store(f"s3://{bucket}/{uuid.uuid4().hex[:12]}", max_connections=16)
    try:
        yield s
    finally:
        s.close()


def names(store: Store, prefix: str = "") -> set[str]:
    return {info.name for info in store.list(prefix)}


# -- the contract ------------------------------------------------------------------------------------


def test_put_get_and_ranges(store: Store) -> None:
    data = bytes(range(256)) * 40
    store.put("chunks/ab/one", data)
    assert store.get("chunks/ab/one") == data
    assert store.get_range("chunks/ab/one", 100, 50) == data[100:150]
    assert store.get_range("chunks/ab/one", len(data) - 10, 50) == data[-10:]
    assert store.get_range("chunks/ab/one", len(data) + 5, 50) == b""
    assert store.get_range("chunks/ab/one", 0, 0) == b""
    store.put("chunks/ab/one", b"replaced", durable=False)
    assert store.get("chunks/ab/one") == b"replaced"
    store.put("empty", b"")
    assert store.get("empty") == b""
    store.sync()


def test_missing_objects(store: Store) -> None:
    with pytest.raises(MissingObject, match="'nothing/here'"):
        store.get("nothing/here")
    with pytest.raises(MissingObject):
        store.get_range("nothing/here", 0, 10)
    with pytest.raises(MissingObject):
        store.get_range("nothing/here", 0, 0)
    assert store.stat("nothing/here") is None
    assert names(store, "nothing/") == set()
    store.delete(["nothing/here"])  # not an error


@pytest.mark.parametrize("bad", ["", "../x", "a/../b", "a//b", "/a", "a/", ".hidden", "a b", "a/./b"])
def test_names_are_checked(store: Store, bad: str) -> None:
    with pytest.raises(RepoUsageError, match="invalid object name"):
        store.put(bad, b"x")
    with pytest.raises(RepoUsageError):
        store.get(bad)
    with pytest.raises(RepoUsageError):
        store.stat(bad)


def test_stat_size_and_store_time(store: Store) -> None:
    before = time.time()
    store.put("snapshots/s1", b"12345")
    info = store.stat("snapshots/s1")
    assert info is not None
    assert (info.name, info.size) == ("snapshots/s1", 5)
    # S3 times are whole seconds; Ceph's clock is this machine's.
    assert before - 1.0 <= info.mtime <= time.time() + 1.0
    (listed,) = list(store.list("snapshots/"))
    assert (listed.name, listed.size, listed.mtime) == (info.name, info.size, info.mtime)


def test_put_if_absent(store: Store) -> None:
    assert store.put_if_absent("config", b"first") is True
    assert store.put_if_absent("config", b"second") is False
    assert store.get("config") == b"first"


def test_put_if_absent_race_has_one_winner(store: Store) -> None:
    for round_ in range(3):
        name = f"gc/{round_:010d}.condemned"
        barrier = threading.Barrier(8)

        def racer(i: int, name: str = name, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return store.put_if_absent(name, f"writer {i}".encode())

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(racer, range(8)))
        assert results.count(True) == 1, results
        assert store.get(name) == f"writer {results.index(True)}".encode()


def test_list_and_delete_past_one_page(store: Store) -> None:
    wanted = {f"chunks/{i % 7:02x}/{i:064x}" for i in range(1100)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: store.put(n, n[-8:].encode(), durable=False), wanted))
    store.put("index/00/" + "0" * 64, b"not a chunk")
    before = store.requests.snapshot()
    assert names(store, "chunks/") == wanted
    assert sent(store, before) == {"list": 2}  # 1,100 names: two pages
    assert names(store, "chunks/03/") == {n for n in wanted if n.startswith("chunks/03/")}
    assert names(store) == wanted | {"index/00/" + "0" * 64}
    assert {i.size for i in store.list("chunks/")} == {8}
    before = store.requests.snapshot()
    store.delete([*sorted(wanted), "chunks/00/missing"])
    assert sent(store, before) == {"delete": 2}  # 1,101 names: two batches
    assert names(store, "chunks/") == set()
    assert names(store) == {"index/00/" + "0" * 64}


def sent(store: Store, before: dict[str, int]) -> dict[str, int]:
    """The requests ``store`` sent since ``before``, the kinds it sent none of left out."""
    return {k: n for k, n in RequestCounts.since(before, store.requests.snapshot()).items() if n}


def test_requests_are_counted_as_billed(store: Store) -> None:
    before = store.requests.snapshot()
    store.put("a/x", b"1")
    assert store.put_if_absent("a/x", b"2") is False
    assert store.put_if_absent("a/y", b"2") is True
    store.get("a/x")
    store.get_range("a/x", 0, 1)
    assert store.stat("a/x") is not None and store.stat("a/none") is None
    assert len(list(store.list("a/"))) == 2
    assert list(store.list("empty/")) == []
    store.delete(["a/x", "a/y", "a/none"])
    store.delete([])
    assert sent(store, before) == {"put": 3, "get": 2, "stat": 2, "list": 2, "delete": 1}


# -- S3 only -----------------------------------------------------------------------------------------


def test_multipart_objects(s3_env: dict[str, str], contract_bucket: str) -> None:
    s = S3Store(
        f"s3://{contract_bucket}/mp-{uuid.uuid4().hex[:8]}", multipart_threshold=5 * MiB, part_size=5 * MiB
    )
    big = random_file_bytes(11 * MiB + 3)
    before = s.requests.snapshot()
    s.put("index/aa/big", big)
    assert sent(s, before) == {"put": 5}  # create, three parts, complete
    assert s.get("index/aa/big") == big
    assert s.get_range("index/aa/big", 6 * MiB - 1, 2) == big[6 * MiB - 1 : 6 * MiB + 1]
    # put_if_absent of a large object is emulated (a HEAD, then the upload).
    assert s.put_if_absent("index/aa/big", big[:-1]) is False
    assert s.put_if_absent("index/aa/new", big) is True
    assert s.get("index/aa/new") == big
    info = s.stat("index/aa/new")
    assert info is not None and info.size == len(big)
    s.close()


def random_file_bytes(n: int) -> bytes:
    return uuid.uuid4().bytes * (n // 16) + b"x" * (n % 16)


def test_wrong_secret_is_a_usage_error(
    s3_env: dict[str, str], contract_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    with pytest.raises(RepoUsageError) as caught:
        S3Store(f"s3://{contract_bucket}/x")
    message = str(caught.value)
    assert "access denied" in message and contract_bucket in message and "from env" in message
    assert WRONG_SECRET not in message and s3_env["AWS_SECRET_ACCESS_KEY"] not in message


def test_missing_bucket_endpoint_and_credentials(
    s3_env: dict[str, str], ceph: Ceph, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RepoUsageError, match=r"bucket 'no-such-bucket' at .* does not exist"):
        S3Store("s3://no-such-bucket/x")
    with pytest.raises(RepoUsageError, match="not a valid bucket name"):
        S3Store("s3://ab/x")
    began = time.monotonic()
    with pytest.raises(RepoUsageError, match=r"cannot connect .*http://127\.0\.0\.1:1\b"):
        S3Store("s3://whatever/x", endpoint_url="http://user:pw@127.0.0.1:1")
    assert time.monotonic() - began < 15
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RepoUsageError, match="no S3 credentials"):
        S3Store("s3://whatever/x")


def test_credentials_from_a_profile(
    s3_env: dict[str, str], contract_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[ceph]\naws_access_key_id = {s3_env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3_env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "ceph")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s = S3Store(f"s3://{contract_bucket}/profile")
    s.put("config", b"x")
    assert s.get("config") == b"x"
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(RepoUsageError, match="nope"):
        S3Store(f"s3://{contract_bucket}/profile")


def test_truncated_bodies_are_retried_then_refused(
    s3_env: dict[str, str], contract_bucket: str, fault_proxy: FaultProxy
) -> None:
    prefix = f"cut-{uuid.uuid4().hex[:8]}"
    s = S3Store(
        f"s3://{contract_bucket}/{prefix}",
        endpoint_url=f"http://127.0.0.1:{fault_proxy.port}",
        retry_budget=3,
    )
    data = random_file_bytes(256 * 1024)
    s.put("chunks/aa/victim", data)
    fault_proxy.truncate = {"victim"}
    fault_proxy.budget = 2
    assert s.get("chunks/aa/victim") == data
    assert s.get_range("chunks/aa/victim", 1000, 5000) == data[1000:6000]
    assert fault_proxy.cut == 2 and s.retries >= 2
    fault_proxy.budget = -1
    with pytest.raises(StoreError, match=r"cannot read 'chunks/aa/victim'.*gave up"):
        s.get("chunks/aa/victim")
    s.close()


# -- the repository commands on S3 -------------------------------------------------------------------


@pytest.fixture
def repo_env(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COWBACKUP_PASSWORD", "correct horse")
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(tmp_path / "keys"))


def _json(proc_stdout: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(proc_stdout.strip().splitlines()[-1])
    return doc


def test_commands_end_to_end(repo_env: None, ceph: Ceph, run_cli: RunCli, workdir: Path) -> None:
    bucket = ceph.new_bucket("e2e")
    repo = f"s3://{bucket}/hosts/r1"
    disk = random_file(workdir / "disk.img", 6 * MiB + 4096, seed=14)
    p = run_cli("repo", "init", repo, "--chunk-size", "1M")
    assert p.returncode == 0, p.stderr
    keys = ceph.keys(bucket)
    assert set(keys) == {"hosts/r1/config", "hosts/r1/keys/repokey"}
    p = run_cli("repo", "init", repo)
    assert p.returncode == 2 and "already holds a repository" in p.stderr

    p = run_cli("backup", str(disk), "--repo", repo, "--name", "h1/vm1", "--json")
    assert p.returncode == 0, p.stderr
    first = _json(p.stdout)
    stats = first["stats"]
    assert isinstance(stats, dict) and stats["new_chunks"] == 7
    assert len(ceph.keys(bucket, "hosts/r1/chunks/")) == 7

    p = run_cli("snapshots", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(p.stdout)
    assert row["id"] == first["snapshot"]
    assert row["stats"]["requests_put"] == stats["requests_put"] == 7 + 3  # chunks, segments, session

    p = run_cli("restore", "--repo", repo, "latest", str(workdir / "out.img"))
    assert p.returncode == 0, p.stderr
    assert_same_content(disk, workdir / "out.img")

    p = run_cli("verify", "--repo", repo, "--read-data", "--json")
    assert p.returncode == 0, p.stdout + p.stderr

    p = run_cli("forget", "--repo", repo, str(first["snapshot"]))
    assert p.returncode == 0, p.stderr
    p = run_cli("gc", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    assert ceph.keys(bucket, "hosts/r1/chunks/") == []
    assert ceph.keys(bucket, "hosts/r1/snapshots/") == []
    assert ceph.keys(bucket, "hosts/r1/index/") == []


def test_requests_of_a_backup(
    repo_env: None, ceph: Ceph, run_cli: RunCli, workdir: Path, fault_proxy: FaultProxy
) -> None:
    """A backup of N new chunks costs N chunk PUTs and a fixed few more; a second one of the same data
    costs no chunk request at all (the cache knows them).  What the command reports is what the server
    received (the proxy counts every request)."""
    bucket = ceph.new_bucket("cache")
    repo = f"s3://{bucket}"
    via_proxy = f"http://127.0.0.1:{fault_proxy.port}"
    disk = random_file(workdir / "disk.img", 8 * MiB, seed=3)
    assert run_cli("repo", "init", repo, "--chunk-size", "1M").returncode == 0
    runs = []
    for _ in range(2):
        fault_proxy.requests.clear()
        p = run_cli(
            "backup", str(disk), "--repo", repo, "--name", "h/d", "--json", "--endpoint-url", via_proxy
        )
        assert p.returncode == 0, p.stderr
        result = _json(p.stdout)
        requests, stats = result["requests"], result["stats"]
        assert isinstance(requests, dict) and isinstance(stats, dict)
        assert sum(requests[k] for k in REQUEST_KINDS) == len(fault_proxy.requests), fault_proxy.requests
        assert requests["retries"] == 0
        runs.append((stats, [r for r in fault_proxy.requests if "/chunks/" in r[1] or "chunks%2F" in r[1]]))
    (first, first_chunks), (second, second_chunks) = runs
    assert first["new_chunks"] == 8 and second["new_chunks"] == 0
    # The first: the session record (PUT, HEAD), gc/ listed (1 page), chunks/ listed (an empty cache
    # is rebuilt), the snapshots listed; 8 chunk PUTs, the index and refs segments (2 PUTs).
    assert {k: first[f"requests_{k}"] for k in REQUEST_KINDS} == {
        "put": 8 + 3, "get": 0, "stat": 1, "list": 3, "delete": 0,
    }  # fmt: skip
    assert len(first_chunks) == 8 + 1  # the PUTs and the listing
    # The second: no request names a chunk, not even a listing of them (the cache knew them all).  The
    # first snapshot's manifest is read (the parent); the index and refs segments are the same, so each
    # PUT-if-absent finds its object there, which is read to check it before it is adopted.
    assert second_chunks == []
    assert {k: second[f"requests_{k}"] for k in REQUEST_KINDS} == {
        "put": 3, "get": 1 + 2, "stat": 1, "list": 2, "delete": 0,
    }  # fmt: skip
    assert len(ceph.keys(bucket, "chunks/")) == 8


def test_snapshots_read_each_manifest_once(
    repo_env: None, ceph: Ceph, run_cli: RunCli, workdir: Path, fault_proxy: FaultProxy
) -> None:
    """200 manifests on S3: the first ``snapshots`` reads every one, the next reads none (one listing),
    a backup of one name finds its parent without reading any, and then only the new one is read."""
    bucket = ceph.new_bucket("manifests")
    location = f"s3://{bucket}"
    disk = random_file(workdir / "disk.img", MiB, seed=21)
    assert run_cli("repo", "init", location, "--chunk-size", "1M").returncode == 0
    assert run_cli("backup", str(disk), "--repo", location, "--name", "vm0").returncode == 0
    repo = Repository.open(S3Store(location), lambda: b"correct horse")
    repo.manifest_cache = None  # the commands below start cold
    try:
        first = repo.resolve("latest")
        for n in range(1, 200):
            repo.commit(dataclasses.replace(first, id=uuid.uuid4().hex, name=f"vm{n % 10}"))
    finally:
        repo.store.close()

    def manifest_requests(*args: str) -> tuple[int, int]:
        """(manifest GETs, listings of snapshots/) of one command, as the server received them."""
        fault_proxy.requests.clear()
        p = run_cli(*args, "--repo", location, "--endpoint-url", f"http://127.0.0.1:{fault_proxy.port}")
        assert p.returncode == 0, p.stderr
        gets = sum(1 for method, path in fault_proxy.requests if method == "GET" and "/snapshots/" in path)
        return gets, sum(1 for _, path in fault_proxy.requests if "snapshots%2F" in path)

    assert manifest_requests("snapshots", "--json") == (200, 1)
    assert manifest_requests("snapshots", "--json") == (0, 1)
    assert manifest_requests("backup", str(disk), "--name", "vm3") == (0, 1)
    assert manifest_requests("snapshots", "--json") == (1, 1)


def test_ceph_tool_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [str(TOOL), "start", str(tmp_path / "c"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert p.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in p.stderr
    assert not (tmp_path / "c").exists()
