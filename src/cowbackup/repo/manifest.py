"""Snapshot manifests: the one object that makes a snapshot exist.

``snapshots/<snapshot id>`` holds UTF-8 JSON::

    {"format": "cowbackup-snapshot", "version": 1, "manifest": {...}, "mac": "hmac-sha256:<hex>"}

``mac`` authenticates the canonical form of ``manifest`` (``json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``, UTF-8) with the repository's MAC key (``sha256:<hex>``, a
plain checksum, in a repository without encryption).  The manifest is readable without the key, which
lets ``verify --no-key`` and ``gc`` work for whoever keeps the storage.  It is written last, with
put-if-absent, after every object it references is durable; it is never changed afterwards.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cowbackup.repo.errors import CorruptObject

FORMAT_NAME = "cowbackup-snapshot"
FORMAT_VERSION = 1
MAX_MANIFEST_SIZE = 64 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
_DISK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
MAX_NAME = 256


def is_snapshot_id(text: str) -> bool:
    return bool(_SNAPSHOT_ID.fullmatch(text))


def check_snapshot_name(name: str) -> str:
    """A backup's ``--name``: printable text of 1-256 characters without leading or trailing space."""
    if not name or len(name) > MAX_NAME or not name.isprintable() or name.strip() != name:
        raise ValueError(f"invalid name {name!r}: 1-{MAX_NAME} printable characters")
    return name


def check_disk_name(name: str) -> str:
    if not _DISK_NAME.fullmatch(name):
        raise ValueError(f"invalid disk name {name!r}: letters, digits, '.', '_', '-' (at most 64)")
    return name


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One index segment of a disk and its refs segment, with their stored sizes and checksums."""

    entries: int
    index_id: bytes
    index_size: int
    index_sha256: bytes
    refs_id: bytes
    refs_size: int
    refs_sha256: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "index": self.index_id.hex(),
            "index_size": self.index_size,
            "index_sha256": self.index_sha256.hex(),
            "refs": self.refs_id.hex(),
            "refs_size": self.refs_size,
            "refs_sha256": self.refs_sha256.hex(),
        }


@dataclass(slots=True)
class DiskRecord:
    name: str
    size: int
    chunk_size: int
    segment_entries: int
    segments: list[SegmentRef]
    #: How the changes were found: {"method": "full"} or {"method": "bitmap", ...} (live backups).
    changes: dict[str, Any] = field(default_factory=lambda: {"method": "full"})
    stats: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def positions(self) -> int:
        return -(-self.size // self.chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "segment_entries": self.segment_entries,
            "segments": [s.to_json() for s in self.segments],
            "changes": self.changes,
            "stats": self.stats,
            "source": self.source,
        }


@dataclass(slots=True)
class Manifest:
    id: str
    repository: str
    name: str
    time: str
    host: str
    tags: list[str]
    parent: str | None
    disks: list[DiskRecord]
    stats: dict[str, int] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "repository": self.repository,
            "name": self.name,
            "time": self.time,
            "host": self.host,
            "tags": self.tags,
            "parent": self.parent,
            "disks": [d.to_json() for d in self.disks],
            "stats": self.stats,
        }

    def disk(self, name: str | None) -> DiskRecord:
        """The disk called ``name``, or the only disk when ``name`` is None.  KeyError if there is none."""
        if name is None:
            if len(self.disks) != 1:
                raise KeyError(f"snapshot {self.id[:8]} has {len(self.disks)} disks; name one with SNAP:DISK")
            return self.disks[0]
        for disk in self.disks:
            if disk.name == name:
                return disk
        raise KeyError(f"snapshot {self.id[:8]} has no disk '{name}'")


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(manifest: Manifest, mac: str) -> bytes:
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "manifest": manifest.body(), "mac": mac}
    return json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n"


def decode(raw: bytes, name: str) -> tuple[Manifest, bytes, str]:
    """``(manifest, canonical bytes, mac)`` of a stored manifest, every field checked.

    CorruptObject naming ``name`` for anything malformed: a hostile manifest cannot carry a disk name
    with ``/``, a negative size, a segment count that does not match the disk, or ids that are not hex.
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise CorruptObject(name, "too large for a manifest")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptObject(name, f"not JSON ({err})") from None
    except RecursionError:
        # Arrays nested a hundred thousand deep: the parser gives up, and so do we.
        raise CorruptObject(name, "not JSON (nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptObject(name, "not a snapshot manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise CorruptObject(name, f"manifest version {doc.get('version')!r} is not {FORMAT_VERSION}")
    body, mac = doc.get("manifest"), doc.get("mac")
    if not isinstance(body, dict) or not isinstance(mac, str):
        raise CorruptObject(name, "no manifest body or mac")
    try:
        manifest = _parse_body(body)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptObject(name, f"malformed manifest: {err}") from None
    if name.rpartition("/")[2] != manifest.id:
        raise CorruptObject(name, f"holds snapshot {manifest.id}, not the one its name says")
    try:
        return manifest, canonical(body), mac
    except UnicodeEncodeError:
        # A "\ud800" escape parses to a lone surrogate, which has no UTF-8 (so no canonical form).
        raise CorruptObject(name, "holds text that is not valid Unicode") from None


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what}: {value!r} is not an integer from {low} to {high}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: not a string")
    return value


def _time(value: Any) -> str:
    """An ISO 8601 time with a time zone (``2026-12-05T07:00:00.123Z``): forget compares them."""
    text = _str(value, "time")
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"time: {text!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"time: {text!r} has no time zone")
    return text


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"{what}: not 64 hex digits")
    return bytes.fromhex(value)


def _parse_body(body: dict[str, Any]) -> Manifest:
    sid = _str(body["id"], "id")
    if not is_snapshot_id(sid):
        raise ValueError("id: not 32 hex digits")
    parent = body.get("parent")
    if parent is not None and not (isinstance(parent, str) and is_snapshot_id(parent)):
        raise ValueError("parent: not a snapshot id")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("tags: not a list of strings")
    disks_json = body["disks"]
    if not isinstance(disks_json, list) or not disks_json:
        raise ValueError("disks: not a non-empty list")
    disks = [_parse_disk(d) for d in disks_json]
    if len({d.name for d in disks}) != len(disks):
        raise ValueError("disks: two disks with one name")
    return Manifest(
        id=sid,
        repository=_str(body["repository"], "repository"),
        name=check_snapshot_name(_str(body["name"], "name")),
        time=_time(body["time"]),
        host=_str(body.get("host", ""), "host"),
        tags=tags,
        parent=parent,
        disks=disks,
        stats=_stats(body.get("stats", {})),
    )


def _stats(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("stats: not an object")
    return {str(k): _int(v, f"stats.{k}") for k, v in value.items()}


def _parse_disk(d: Any) -> DiskRecord:
    if not isinstance(d, dict):
        raise ValueError("disk: not an object")
    chunk_size = _int(d["chunk_size"], "chunk_size", 1 << 16, 1 << 24)
    if chunk_size & (chunk_size - 1):
        raise ValueError("chunk_size: not a power of two")
    per_segment = _int(d["segment_entries"], "segment_entries", 1, 1 << 20)
    disk = DiskRecord(
        name=check_disk_name(_str(d["name"], "disk name")),
        size=_int(d["size"], "size"),
        chunk_size=chunk_size,
        segment_entries=per_segment,
        segments=[],
        changes=d.get("changes", {"method": "full"}) if isinstance(d.get("changes"), dict) else {},
        stats=_stats(d.get("stats", {})),
        source=_str(d.get("source", ""), "source"),
    )
    segments = d["segments"]
    if not isinstance(segments, list):
        raise ValueError("segments: not a list")
    expected = -(-disk.positions // per_segment)
    if len(segments) != expected:
        raise ValueError(f"disk '{disk.name}' has {len(segments)} segments, its size needs {expected}")
    for i, s in enumerate(segments):
        count = min(per_segment, disk.positions - i * per_segment)
        disk.segments.append(
            SegmentRef(
                entries=_int(s["entries"], "entries", count, count),
                index_id=_hex(s["index"], "index"),
                index_size=_int(s["index_size"], "index_size", 1, 1 << 40),
                index_sha256=_hex(s["index_sha256"], "index_sha256"),
                refs_id=_hex(s["refs"], "refs"),
                refs_size=_int(s["refs_size"], "refs_size", 1, 1 << 40),
                refs_sha256=_hex(s["refs_sha256"], "refs_sha256"),
            )
        )
    return disk
