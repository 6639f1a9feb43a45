"""The config object and wrapped keys on hostile input, newer formats, wrong passphrases, foreign keys."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cowbackup.repo import keys
from cowbackup.repo.config import CONFIG_NAME, MAX_CONFIG_SIZE, load_config
from cowbackup.repo.errors import (
    CorruptObject,
    NotARepository,
    RepoError,
    RepoUsageError,
    UnsupportedFormat,
    WrongPassphrase,
)
from cowbackup.repo.repository import Repository
from cowbackup.repo.store_local import LocalStore

from .helpers import PASSPHRASE, new_repo, reopen

REPO_ID = "0123456789abcdef" * 2


def config_doc() -> dict[str, Any]:
    return {
        "format": "cowbackup-repository",
        "version": 1,
        "id": REPO_ID,
        "chunk_size": 65536,
        "segment_entries": 16384,
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": "none",
        "created": "2026-01-01T00:00:00Z",
    }


def store_with_config(tmp_path: Path, raw: bytes) -> LocalStore:
    store = LocalStore(str(tmp_path / "repo"), "none")
    store.put(CONFIG_NAME, raw)
    return store


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(field, value)


CORRUPT_CONFIGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "another format": _set("format", "cowbackup-snapshot"),
    "version missing": lambda doc: doc.pop("version"),
    "version a string": _set("version", "1"),
    "id missing": lambda doc: doc.pop("id"),
    "id a path": _set("id", "../../../../../../etc/pas"),
    "id upper-case": _set("id", REPO_ID.upper()),
    "id short": _set("id", REPO_ID[:-1]),
    "chunk size a string": _set("chunk_size", "65536"),
    "chunk size a bool": _set("chunk_size", True),
    "chunk size not a power of two": _set("chunk_size", 65537),
    "chunk size too large": _set("chunk_size", 1 << 30),
    "chunk size negative": _set("chunk_size", -65536),
    "segment entries zero": _set("segment_entries", 0),
    "segment entries huge": _set("segment_entries", 1 << 40),
    "compression a string": _set("compression", "zstd"),
    "compression a list": _set("compression", ["level"]),
    "compression empty": _set("compression", {}),
    "compression level huge": _set("compression", {"algorithm": "zstd", "level": 99}),
    "compression another algorithm": _set("compression", {"algorithm": "lz4", "level": 1}),
}


@pytest.mark.parametrize("change", list(CORRUPT_CONFIGS), ids=list(CORRUPT_CONFIGS))
def test_hostile_configs_are_corrupt_objects(tmp_path: Path, change: str) -> None:
    doc = config_doc()
    CORRUPT_CONFIGS[change](doc)
    with pytest.raises(CorruptObject) as caught:
        load_config(store_with_config(tmp_path, json.dumps(doc).encode()))
    assert caught.value.name == CONFIG_NAME


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b"[]", b"null", b"{", b"[" * 50_000, b" " * (MAX_CONFIG_SIZE + 1)],
    ids=["empty", "not utf-8", "list", "null", "truncated", "deep", "huge"],
)
def test_hostile_config_documents_are_corrupt_objects(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(CorruptObject) as caught:
        load_config(store_with_config(tmp_path, raw))
    assert caught.value.name == CONFIG_NAME


def test_a_newer_version_or_encryption_is_unsupported(tmp_path: Path) -> None:
    doc = config_doc()
    doc["version"] = 2
    with pytest.raises(UnsupportedFormat, match="version 2"):
        load_config(store_with_config(tmp_path / "a", json.dumps(doc).encode()))
    doc = config_doc()
    doc["encryption"] = "quantum"
    with pytest.raises(UnsupportedFormat, match="quantum"):
        load_config(store_with_config(tmp_path / "b", json.dumps(doc).encode()))


def test_no_config_is_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(NotARepository):
        Repository.open(LocalStore(str(tmp_path / "empty"), "none"), None)


def test_the_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(store_with_config(tmp_path, json.dumps(config_doc()).encode()))
    assert (config.id, config.chunk_size, config.level) == (REPO_ID, 65536, 3)


# -- keys -------------------------------------------------------------------------------------------


def test_a_wrong_passphrase_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    before = sorted(info.name for info in repo.store.list(""))
    with pytest.raises(WrongPassphrase) as caught:
        Repository.open(LocalStore(repo.store.location, "none"), lambda: b"not it")
    assert caught.value.exit_code == 2
    assert sorted(info.name for info in repo.store.list("")) == before
    assert reopen(repo).keys == repo.keys


def test_keyfile_mode_and_a_missing_key_file(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo", "keyfile")
    assert repo.store.stat(keys.REPOKEY_NAME) is None
    assert reopen(repo).keys == repo.keys
    Path(keys.keyfile_path(repo.config.id)).unlink()
    with pytest.raises(RepoUsageError, match="no key file"):
        reopen(repo)


def test_a_key_of_another_repository_is_refused(tmp_path: Path) -> None:
    ours, theirs = new_repo(tmp_path / "ours"), new_repo(tmp_path / "theirs")
    foreign = theirs.export_key()
    with pytest.raises(RepoUsageError, match="belongs to repository"):
        ours.import_key(foreign, PASSPHRASE)
    # Relabelled as ours, it still does not open: the repository id is authenticated with the key.
    relabelled = json.loads(foreign)
    relabelled["repository"] = ours.config.id
    with pytest.raises(WrongPassphrase):
        ours.import_key(json.dumps(relabelled).encode(), PASSPHRASE)
    assert reopen(ours).keys == ours.keys


def test_a_missing_repokey_names_the_remedy(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    saved = repo.export_key()
    repo.store.delete([keys.REPOKEY_NAME])
    with pytest.raises(RepoError, match="repo key import"):
        reopen(repo)
    repo.import_key(saved, PASSPHRASE)
    assert reopen(repo).keys == repo.keys


def test_change_passphrase(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.change_passphrase(b"new one")
    with pytest.raises(WrongPassphrase):
        reopen(repo)
    again = Repository.open(LocalStore(repo.store.location, "none"), lambda: b"new one")
    assert again.keys == repo.keys


def key_doc(repo: Repository) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(repo.export_key())
    return doc


def _kdf(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["kdf"].__setitem__(field, value)


BAD_KEYS: dict[str, Callable[[dict[str, Any]], None]] = {
    "scrypt n too large": _kdf("n", 1 << 21),
    "scrypt n not a power of two": _kdf("n", 3 << 10),
    "scrypt n one": _kdf("n", 1),
    "scrypt n zero": _kdf("n", 0),
    "scrypt n negative": _kdf("n", -(1 << 15)),
    "scrypt n a word": _kdf("n", "many"),
    "scrypt n null": _kdf("n", None),
    "scrypt r zero": _kdf("r", 0),
    "scrypt r huge": _kdf("r", 1 << 30),
    "scrypt p zero": _kdf("p", 0),
    "scrypt p huge": _kdf("p", 1 << 30),
    "another kdf": _kdf("name", "pbkdf2"),
    "salt not base64": _kdf("salt", "***"),
    "kdf not an object": lambda doc: doc.__setitem__("kdf", "scrypt"),
    "nonce short": lambda doc: doc.__setitem__("nonce", "AAAA"),
    "wrapped short": lambda doc: doc.__setitem__("wrapped", "AAAA"),
    "wrapped missing": lambda doc: doc.pop("wrapped"),
    "another format": lambda doc: doc.__setitem__("format", "cowbackup-repository"),
}


@pytest.mark.parametrize("change", list(BAD_KEYS), ids=list(BAD_KEYS))
def test_hostile_key_objects_are_corrupt(tmp_path: Path, change: str) -> None:
    repo = new_repo(tmp_path / "repo")
    doc = key_doc(repo)
    BAD_KEYS[change](doc)
    repo.store.put(keys.REPOKEY_NAME, json.dumps(doc).encode())
    with pytest.raises(CorruptObject) as caught:
        reopen(repo)
    assert caught.value.name == keys.REPOKEY_NAME


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff", b"[]", b'"key"', b"[" * 10_000, b" " * (keys.MAX_KEY_SIZE + 1)],
    ids=["empty", "not utf-8", "list", "string", "deep", "huge"],
)
def test_hostile_key_documents_are_corrupt(tmp_path: Path, raw: bytes) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.store.put(keys.REPOKEY_NAME, raw)
    with pytest.raises(CorruptObject) as caught:
        reopen(repo)
    assert caught.value.name == keys.REPOKEY_NAME


# -- unwrapped key files (backup --qmp --repo hands one to the daemon's target node) --------------------


def test_an_unwrapped_key_file_opens_the_repository_without_scrypt(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")
    again = Repository.open_with_master(LocalStore(repo.store.location, "none"), repo.dump_master(), "f")
    assert again.keys == repo.keys and again.has_key


def test_an_unwrapped_key_file_of_another_repository_is_refused(tmp_path: Path) -> None:
    ours, theirs = new_repo(tmp_path / "ours"), new_repo(tmp_path / "theirs")
    with pytest.raises(RepoUsageError, match="belongs to repository"):
        Repository.open_with_master(ours.store, theirs.dump_master(), "f")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"secret passphrase\n",
        b'{"format": "cowbackup-master-key", "version": 2}',
        b'{"format": "cowbackup-key", "version": 1, "repository": "x", "master": "AAAA"}',
        b"[" * 100000,
    ],
)
def test_a_malformed_unwrapped_key_file_is_refused_without_quoting_it(tmp_path: Path, raw: bytes) -> None:
    repo = new_repo(tmp_path / "r")
    with pytest.raises(RepoUsageError) as info:
        Repository.open_with_master(repo.store, raw, "the-file")
    assert "the-file" in str(info.value) and "passphrase" not in str(info.value)


def test_an_unwrapped_key_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")
    doc = json.loads(repo.dump_master())
    doc["master"] = "AAAA"
    with pytest.raises(RepoUsageError, match="wrong size"):
        Repository.open_with_master(repo.store, json.dumps(doc).encode(), "f")


def test_no_unwrapped_key_for_a_plain_repository_or_without_the_key(tmp_path: Path) -> None:
    plain = new_repo(tmp_path / "plain", "none")
    with pytest.raises(RepoUsageError, match="not encrypted"):
        Repository.open_with_master(plain.store, b"{}", "f")
    with pytest.raises(RepoUsageError, match="not open with its key"):
        reopen(new_repo(tmp_path / "r"), key=False).dump_master()
