"""Fast detection of all-zero buffers.

A memoryview compares element by element (slow); ``bytes == bytes`` is a memcmp.  We reject data early
by its first and last bytes and a small head, then compare in 1 MiB pieces against a shared zero block.
"""

from __future__ import annotations

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_HEAD = 4096
_ZERO_HEAD = bytes(_HEAD)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte of ``data`` is zero."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        return True
    if view[0] or view[n - 1]:
        return False
    head = min(n, _HEAD)
    if view[:head].tobytes() != _ZERO_HEAD[:head]:
        return False
    pos = head
    while pos < n:
        size = min(_CHUNK, n - pos)
        zeros = _ZEROS if size == _CHUNK else bytes(size)
        if view[pos : pos + size].tobytes() != zeros:
            return False
        pos += size
    return True
