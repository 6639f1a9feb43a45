"""manifest.decode on hostile input: CorruptObject naming the object, never another exception."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.repo import manifest
from cowbackup.repo.errors import CorruptObject
from cowbackup.repo.manifest import DiskRecord, Manifest, SegmentRef

SID = "0123456789abcdef" * 2
NAME = f"snapshots/{SID}"
CHUNK = 64 * 1024


def segment(entries: int) -> SegmentRef:
    return SegmentRef(entries, b"\x01" * 32, 100, b"\x02" * 32, b"\x03" * 32, 50, b"\x04" * 32)


def valid_doc() -> dict[str, Any]:
    """A well-formed stored manifest: one disk of 5 chunk positions in segments of 2 (3 segments)."""
    disk = DiskRecord("disk0", 5 * CHUNK - 7, CHUNK, 2, [segment(2), segment(2), segment(1)])
    snap = Manifest(SID, "f" * 32, "host/vm", "2026-01-01T00:00:00Z", "h", ["t"], None, [disk])
    doc: dict[str, Any] = json.loads(manifest.encode(snap, "sha256:" + "0" * 64))
    return doc


def decode(doc: Any) -> None:
    manifest.decode(json.dumps(doc).encode(), NAME)


def test_the_valid_document_decodes() -> None:
    parsed, canonical, mac = manifest.decode(json.dumps(valid_doc()).encode(), NAME)
    assert parsed.disks[0].positions == 5 and len(parsed.disks[0].segments) == 3
    assert canonical == manifest.canonical(parsed.body()) and mac.startswith("sha256:")


def _disk(doc: dict[str, Any]) -> dict[str, Any]:
    disk: dict[str, Any] = doc["manifest"]["disks"][0]
    return disk


def _set_disk(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _disk(doc).__setitem__(field, value)


def _set_body(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["manifest"].__setitem__(field, value)


def _set_segment(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _disk(doc)["segments"][0].__setitem__(field, value)


HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "disk name with a slash": _set_disk("name", "a/b"),
    "disk name ..": _set_disk("name", ".."),
    "disk name .": _set_disk("name", "."),
    "disk name empty": _set_disk("name", ""),
    "disk name absolute": _set_disk("name", "/etc/passwd"),
    "disk name too long": _set_disk("name", "d" * 65),
    "disk name not a string": _set_disk("name", 7),
    "negative size": _set_disk("size", -1),
    "size as a string": _set_disk("size", "327673"),
    "size as a bool": _set_disk("size", True),
    "size as a float": _set_disk("size", 327673.0),
    "huge size": _set_disk("size", 1 << 80),
    "size needing 2^26 segments": _set_disk("size", 1 << 62),
    "one segment too few": lambda doc: _disk(doc)["segments"].pop(),
    "one segment too many": lambda doc: _disk(doc)["segments"].append(_disk(doc)["segments"][0]),
    "segments not a list": _set_disk("segments", {"0": 1}),
    "entries not matching": _set_segment("entries", 1),
    "entries huge": _set_segment("entries", 1 << 40),
    "chunk size not a power of two": _set_disk("chunk_size", 3 * CHUNK),
    "chunk size too small": _set_disk("chunk_size", 4096),
    "chunk size huge": _set_disk("chunk_size", 1 << 40),
    "segment_entries zero": _set_disk("segment_entries", 0),
    "segment_entries huge": _set_disk("segment_entries", 1 << 40),
    "index id not hex": _set_segment("index", "zz" * 32),
    "index id upper-case": _set_segment("index", "AB" * 32),
    "index id short": _set_segment("index", "ab" * 31),
    "refs id a path": _set_segment("refs", "../../../../etc/passwd"),
    "checksum not a string": _set_segment("index_sha256", 5),
    "index size zero": _set_segment("index_size", 0),
    "refs size negative": _set_segment("refs_size", -5),
    "segment not an object": lambda doc: _disk(doc)["segments"].__setitem__(0, []),
    "disk not an object": _set_body("disks", ["disk0"]),
    "no disks": _set_body("disks", []),
    "two disks with one name": lambda doc: doc["manifest"]["disks"].append(copy.deepcopy(_disk(doc))),
    "stats not integers": _set_body("stats", {"chunks": "many"}),
    "disk stats negative": _set_disk("stats", {"chunks": -1}),
    "tags not strings": _set_body("tags", [1, 2]),
    "tags not a list": _set_body("tags", "t"),
    "parent not an id": _set_body("parent", "../x"),
    "id not an id": _set_body("id", "../../config"),
    "id of another snapshot": _set_body("id", "f" * 32),
    "name empty": _set_body("name", ""),
    "name with a newline": _set_body("name", "a\nb"),
    "name too long": _set_body("name", "n" * 257),
    "repository not a string": _set_body("repository", None),
    "time missing": lambda doc: doc["manifest"].pop("time"),
    "disks missing": lambda doc: doc["manifest"].pop("disks"),
    "body not an object": lambda doc: doc.__setitem__("manifest", [1]),
    "mac not a string": lambda doc: doc.__setitem__("mac", None),
    "newer version": lambda doc: doc.__setitem__("version", 2),
    "another format": lambda doc: doc.__setitem__("format", "cowbackup-key"),
}


@pytest.mark.parametrize("change", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_fields_are_corrupt_objects(change: str) -> None:
    doc = valid_doc()
    HOSTILE[change](doc)
    with pytest.raises(CorruptObject) as caught:
        decode(doc)
    assert caught.value.name == NAME


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"null",
        b"[]",
        b'"a string"',
        b"{",
        b"[" * 100_000,  # nested deeper than the parser's recursion limit
        b'{"a":' * 100_000,
        b" " * (manifest.MAX_MANIFEST_SIZE + 1),
    ],
    ids=["empty", "not utf-8", "null", "list", "string", "truncated", "deep list", "deep object", "huge"],
)
def test_hostile_documents_are_corrupt_objects(raw: bytes) -> None:
    with pytest.raises(CorruptObject) as caught:
        manifest.decode(raw, NAME)
    assert caught.value.name == NAME


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_field_replaced_by_any_json_decodes_or_is_corrupt(draw: st.DataObject) -> None:
    doc: Any = valid_doc()
    path = draw.draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw.draw(JSON_VALUES)
    problem: CorruptObject | None = None
    try:
        decode(doc)
    except CorruptObject as err:
        problem = err
    assert problem is None or problem.name == NAME
