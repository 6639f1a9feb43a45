"""The repository's ``config`` object: what every reader must know before reading anything else.

Plain JSON (UTF-8), written once by ``repo init``::

    {"format": "cowbackup-repository", "version": 1, "id": "<32 hex digits>",
     "chunk_size": 4194304, "segment_entries": 16384,
     "compression": {"algorithm": "zstd", "level": 3},
     "encryption": "repokey" | "keyfile" | "none", "created": "2026-12-05T07:00:00Z"}
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from cowbackup.repo.errors import CorruptObject, NotARepository, RepoUsageError, UnsupportedFormat
from cowbackup.repo.store import Store

CONFIG_NAME = "config"
FORMAT_NAME = "cowbackup-repository"
FORMAT_VERSION = 1

MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
DEFAULT_SEGMENT_ENTRIES = 16384
MAX_SEGMENT_ENTRIES = 1 << 20
DEFAULT_LEVEL = 3
MAX_LEVEL = 22
ENCRYPTION_MODES = ("repokey", "keyfile", "none")
#: The largest config we read: a hostile one cannot make us parse megabytes.
MAX_CONFIG_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class RepoConfig:
    id: str
    chunk_size: int
    segment_entries: int
    level: int
    encryption: str
    created: str

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "segment_entries": self.segment_entries,
            "compression": {"algorithm": "zstd", "level": self.level},
            "encryption": self.encryption,
            "created": self.created,
        }
        return json.dumps(doc, indent=1).encode() + b"\n"


def check_chunk_size(size: int) -> int:
    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise RepoUsageError(f"chunk size must be a power of two from 64K to 16M, not {size}")
    return size


def check_level(level: int) -> int:
    if not 0 <= level <= MAX_LEVEL:
        raise RepoUsageError(f"compression level must be 0 (none) to {MAX_LEVEL}, not {level}")
    return level


def new_config(chunk_size: int, encryption: str, level: int, created: str) -> RepoConfig:
    if encryption not in ENCRYPTION_MODES:
        raise RepoUsageError(f"unknown encryption '{encryption}' (choose from {', '.join(ENCRYPTION_MODES)})")
    return RepoConfig(
        id=secrets.token_hex(16),
        chunk_size=check_chunk_size(chunk_size),
        segment_entries=DEFAULT_SEGMENT_ENTRIES,
        level=check_level(level),
        encryption=encryption,
        created=created,
    )


def load_config(store: Store) -> RepoConfig:
    """Read and check ``config``.  NotARepository if absent; CorruptObject / UnsupportedFormat otherwise."""
    info = store.stat(CONFIG_NAME)
    if info is None:
        raise NotARepository(f"'{store.location}' is not a cowbackup repository (no config object)")
    if info.size > MAX_CONFIG_SIZE:
        raise CorruptObject(CONFIG_NAME, f"{info.size} bytes, more than a config can be")
    raw = store.get(CONFIG_NAME, limit=MAX_CONFIG_SIZE)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptObject(CONFIG_NAME, f"not JSON ({err})") from None
    except RecursionError:
        raise CorruptObject(CONFIG_NAME, "not JSON (nested too deeply)") from None
    return parse_config(doc)


def parse_config(doc: Any) -> RepoConfig:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptObject(CONFIG_NAME, "not a cowbackup repository config")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptObject(CONFIG_NAME, f"format version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"the repository has format version {version}; this cowbackup reads up to {FORMAT_VERSION}"
        )
    try:
        repo_id = doc["id"]
        chunk_size = doc["chunk_size"]
        entries = doc["segment_entries"]
        compression = doc["compression"]
        level = compression["level"]
        encryption = doc["encryption"]
        created = doc.get("created", "")
    except (KeyError, TypeError) as err:
        raise CorruptObject(CONFIG_NAME, f"field {err} missing or malformed") from None
    if not (
        isinstance(repo_id, str) and len(repo_id) == 32 and all(c in "0123456789abcdef" for c in repo_id)
    ):
        raise CorruptObject(CONFIG_NAME, "bad repository id")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise CorruptObject(CONFIG_NAME, "bad chunk_size")
    try:
        check_chunk_size(chunk_size)
    except RepoUsageError as err:
        raise CorruptObject(CONFIG_NAME, str(err)) from None
    if not isinstance(entries, int) or not 1 <= entries <= MAX_SEGMENT_ENTRIES:
        raise CorruptObject(CONFIG_NAME, "bad segment_entries")
    if compression.get("algorithm") != "zstd" or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise CorruptObject(CONFIG_NAME, "bad compression")
    if encryption not in ENCRYPTION_MODES:
        raise UnsupportedFormat(f"the repository uses encryption '{encryption}', unknown to this cowbackup")
    return RepoConfig(repo_id, chunk_size, entries, level, encryption, str(created))
