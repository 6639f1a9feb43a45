"""Error replies of an NBD server to requests libnbd would normally refuse to send (strict mode off).

Run by ``/usr/bin/python3`` (Debian's python3-libnbd)::

    nbdsh_errors.py URI rw|ro

Sends each request on one handle and records the outcome as an errno name ("EINVAL"...) or "ok", and
whether the same handle still reads the first 512 bytes as before ("usable").  Prints one JSON object
``{case: {"result": ..., "usable": ...}, ...}``; the test decides what is right.
"""

from __future__ import annotations

import errno
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

#: Debian's python3-libnbd, imported by name: to mypy, run over the whole tree, ``nbd`` is tests/unit/nbd.
nbd: Any = importlib.import_module("nbd")

MiB = 1024 * 1024
#: The largest READ/WRITE the server advertises (NBD's "never a denial of service" limit, 2^25).
MAX_PAYLOAD = 32 * MiB


def outcome(err: Any) -> str:
    """``nbd.Error`` as an errno name; libnbd leaves ``errno`` unset only for its own failures."""
    if err.errno is None:
        return f"no errno: {err.string}"
    return errno.errorcode.get(err.errno, str(err.errno))


def main() -> None:
    uri, mode = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.set_strict_mode(0)  # let libnbd send what it would otherwise refuse
    h.connect_uri(uri)
    size = h.get_size()
    first = h.pread(512, 0)
    results: dict[str, dict[str, object]] = {}

    def case(name: str, request: Callable[[], object]) -> None:
        try:
            request()
            result = "ok"
        except nbd.Error as err:
            result = outcome(err)
        try:
            usable: object = h.pread(512, 0) == first
        except nbd.Error as err:
            usable = f"dead: {err.string}"
        results[name] = {"result": result, "usable": usable}

    case("read crossing the end", lambda: h.pread(4096, size - 512))
    case("read beyond the end", lambda: h.pread(512, size + 4096))
    case("trim beyond the end", lambda: h.trim(4096, size))
    case("cache beyond the end", lambda: h.cache(4096, size))
    case("oversized read", lambda: h.pread(MAX_PAYLOAD + 1, 0))
    case("unknown flag 0x80", lambda: h.pread(512, 0, 0x80))
    case("unknown flag 0x8000", lambda: h.pread(512, 0, 0x8000))
    case("REQ_ONE on a read", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
    case("unaligned read", lambda: h.pread(3, 1))
    case("flush", h.flush)
    if mode == "rw":
        case("write crossing the end", lambda: h.pwrite(b"\xee" * 4096, size - 512))
        case("write zeroes beyond the end", lambda: h.zero(4096, size - 1024))
        case("oversized write", lambda: h.pwrite(b"\xee" * (MAX_PAYLOAD + 1), 0))
        case("NO_HOLE on a write", lambda: h.pwrite(b"\xee" * 512, 0, nbd.CMD_FLAG_NO_HOLE))
        case("REQ_ONE on a trim", lambda: h.trim(512, 0, nbd.CMD_FLAG_REQ_ONE))
        case("unaligned write", lambda: h.pwrite(b"abc", 12345))
        results["unaligned write reads back"] = {"result": h.pread(5, 12344) == b"\0abc\0", "usable": True}
        # the written-then-refused bytes did not land anywhere: the tail of the export is untouched
        results["end untouched"] = {"result": h.pread(4096, size - 4096) == bytes(4096), "usable": True}
    else:
        case("write", lambda: h.pwrite(b"\xee" * 512, 0))
        case("trim", lambda: h.trim(512, 0))
        case("write zeroes", lambda: h.zero(512, 0))
    h.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
