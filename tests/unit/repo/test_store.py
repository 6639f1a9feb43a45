"""The Store contract, one suite for every backend, and object-name checking.

A backend joins the suite by adding a factory to :data:`BACKENDS` (the S3 backend of a later issue: a
factory that starts a local S3 server fixture and returns a store on a fresh bucket).  Tests only use
the :class:`Store` interface, never a backend's files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowbackup.repo.errors import MissingObject, RepoUsageError
from cowbackup.repo.store import Store, check_name
from cowbackup.repo.store_local import LocalStore

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "local": lambda path: LocalStore(str(path), "none"),
    "local-sync-file": lambda path: LocalStore(str(path), "file"),
    "local-sync-filesystem": lambda path: LocalStore(str(path), "filesystem"),
}


@pytest.fixture(params=list(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    backend = BACKENDS[request.param](tmp_path / "store")
    yield backend
    backend.close()


def names(store: Store, prefix: str) -> list[str]:
    return sorted(info.name for info in store.list(prefix))


def test_put_get_and_replace(store: Store) -> None:
    store.put("a/b/c", b"one")
    assert store.get("a/b/c") == b"one"
    store.put("a/b/c", bytearray(b"two, longer"), durable=False)
    assert store.get("a/b/c") == b"two, longer"
    store.put("empty", memoryview(b""))
    assert store.get("empty") == b""


def test_missing_objects(store: Store) -> None:
    with pytest.raises(MissingObject) as caught:
        store.get("chunks/00/nothing")
    assert caught.value.name == "chunks/00/nothing"
    with pytest.raises(MissingObject):
        store.get_range("chunks/00/nothing", 0, 10)
    assert store.stat("chunks/00/nothing") is None
    assert names(store, "chunks/") == []
    store.delete(["chunks/00/nothing"])  # not an error


def test_get_range(store: Store) -> None:
    store.put("obj", bytes(range(100)))
    assert store.get_range("obj", 10, 5) == bytes(range(10, 15))
    assert store.get_range("obj", 95, 10) == bytes(range(95, 100))  # fewer only at the end
    assert store.get_range("obj", 100, 10) == b""
    assert store.get_range("obj", 0, 0) == b""


def test_put_if_absent(store: Store) -> None:
    assert store.put_if_absent("x/y", b"first") is True
    assert store.put_if_absent("x/y", b"second") is False
    assert store.put_if_absent("x/y", b"third", durable=False) is False
    assert store.get("x/y") == b"first"


def _race(store: Store, name: str, contenders: int) -> list[bytes]:
    """``contenders`` threads put_if_absent ``name`` at once; the payloads of those told they won."""
    start = threading.Barrier(contenders)
    won: list[bytes] = []
    lock = threading.Lock()

    def contend(payload: bytes) -> None:
        start.wait()
        if store.put_if_absent(name, payload):
            with lock:
                won.append(payload)

    threads = [threading.Thread(target=contend, args=(bytes([i]) * 1000,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return won


def test_put_if_absent_racing_threads_one_wins(store: Store) -> None:
    for round_ in range(5):
        won = _race(store, f"race/{round_}", 8)
        assert len(won) == 1
        assert store.get(f"race/{round_}") == won[0]
    assert names(store, "race/") == [f"race/{i}" for i in range(5)]


def test_list_by_prefix(store: Store) -> None:
    wanted = ["chunks/00/" + "00" * 32, "chunks/00/" + "01" * 32, "chunks/ff/" + "ff" * 32]
    for name in wanted:
        store.put(name, b"c" * 3)
    store.put("index/00/" + "00" * 32, b"i")
    store.put("config", b"{}")
    assert names(store, "chunks/") == sorted(wanted)
    assert names(store, "chunks/ff/") == [wanted[2]]
    assert names(store, "index/") == ["index/00/" + "00" * 32]
    assert names(store, "snapshots/") == []
    assert names(store, "") == sorted([*wanted, "index/00/" + "00" * 32, "config"])
    sizes = {info.name: info.size for info in store.list("chunks/")}
    assert set(sizes.values()) == {3}


def test_delete_batched(store: Store) -> None:
    for i in range(2500):
        store.put(f"d/{i:04d}", b"x", durable=False)
    store.delete(f"d/{i:04d}" for i in range(0, 2500, 2))  # any iterable, here a generator
    store.delete([f"d/{i:04d}" for i in range(0, 10)])  # half of them already gone
    left = names(store, "d/")
    assert left == [f"d/{i:04d}" for i in range(11, 2500, 2)]


def test_stat(store: Store) -> None:
    before = time.time()
    store.put("s/t", b"12345")
    info = store.stat("s/t")
    assert info is not None
    assert (info.name, info.size) == ("s/t", 5)
    assert before - 5 <= info.mtime <= time.time() + 5


def test_sync_and_close_twice(store: Store) -> None:
    store.put("a", b"1", durable=False)
    store.sync()
    store.sync()
    store.close()
    store.close()


BAD_NAMES = [
    "",
    "..",
    ".",
    "../config",
    "a/../../b",
    "a/./b",
    "/etc/passwd",
    "a//b",
    "a/",
    "/",
    "a\\b",
    "a\x00b",
    "a b",
    ".hidden",
    "a/.tmp-x",
    "é",
    "x" * 201,
    "/".join(["a"] * 600),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(RepoUsageError):
        check_name(name)
    with pytest.raises(RepoUsageError):
        store.put(name, b"x")
    with pytest.raises(RepoUsageError):
        store.put_if_absent(name, b"x")
    with pytest.raises(RepoUsageError):
        store.get(name)
    with pytest.raises(RepoUsageError):
        store.get_range(name, 0, 1)
    with pytest.raises(RepoUsageError):
        store.stat(name)
    with pytest.raises(RepoUsageError):
        store.delete([name])
    assert names(store, "") == []


@pytest.mark.parametrize("prefix", ["../", "/", "/etc/", "a/../", "./"])
def test_bad_prefixes_are_refused(store: Store, prefix: str) -> None:
    with pytest.raises(RepoUsageError):
        list(store.list(prefix))


def test_good_names() -> None:
    for name in ("config", "keys/repokey", "gc/0000000001.done", "a/b-c_d.e/F9", "x" * 200):
        assert check_name(name) == name


def test_local_store_hides_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), "none")
    store.put("chunks/00/a", b"x")
    (tmp_path / "chunks" / "00" / ".tmp-0123").write_bytes(b"half-written")
    assert names(store, "") == ["chunks/00/a"]


def test_unknown_sync_level(tmp_path: Path) -> None:
    with pytest.raises(RepoUsageError, match="sync level"):
        LocalStore(str(tmp_path), "sometimes")
