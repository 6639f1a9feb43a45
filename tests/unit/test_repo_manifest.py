"""A manifest whose text cannot be put in canonical form is a corrupt object, named as such."""

from __future__ import annotations

import json

import pytest

from cowbackup.repo import manifest
from cowbackup.repo.errors import CorruptObject

SID = "a9bf49fdc1b12f1043fd80bb5c11ff46"


def stored(host: str) -> bytes:
    body = {
        "id": SID,
        "repository": "82672793bf9e6cba3594af93cd8cdf36",
        "name": "a/b",
        "time": "2026-12-05T06:44:33.574Z",
        "host": host,
        "tags": [],
        "parent": None,
        "disks": [{"name": "disk0", "size": 0, "chunk_size": 65536, "segment_entries": 4, "segments": []}],
    }
    doc = {"format": manifest.FORMAT_NAME, "version": 1, "manifest": body, "mac": "sha256:00"}
    return json.dumps(doc).encode()  # ensure_ascii: a lone surrogate is written as a \ud800 escape


def test_a_well_formed_manifest_decodes() -> None:
    parsed, canonical, _mac = manifest.decode(stored("vm"), f"snapshots/{SID}")
    assert parsed.host == "vm"
    assert b'"host":"vm"' in canonical


def test_a_lone_surrogate_is_a_corrupt_manifest() -> None:
    with pytest.raises(CorruptObject, match=f"snapshots/{SID}"):
        manifest.decode(stored("\ud800"), f"snapshots/{SID}")
