"""Fast detection of all-zero buffers.

``bytearray == memoryview`` is a memcmp through the buffer protocol, without copying; a memoryview
compared with anything goes element by element (slow), and ``tobytes()`` copies.  So we compare slices
of the data against zeroed ``bytearray`` objects of the same length (left operand the bytearray), after
rejecting most data by its first and last bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

_CHUNK = 1 << 20
#: Zeroed bytearrays by length.  Lengths are few in practice (chunk and cluster multiples); the cache is
#: bounded so that odd lengths cannot grow it without limit.
_zeros: dict[int, bytearray] = {}
_MAX_CACHED = 32


def _zeros_of(size: int) -> bytearray:
    zeros = _zeros.get(size)
    if zeros is None:
        zeros = bytearray(size)
        if len(_zeros) < _MAX_CACHED:
            _zeros[size] = zeros
    return zeros


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte of ``data`` is zero."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        return True
    if view[0] or view[n - 1]:
        return False
    pos = 0
    while pos < n:
        size = min(_CHUNK, n - pos)
        if _zeros_of(size) != view[pos : pos + size]:
            return False
        pos += size
    return True


def zero_runs(data: bytes | bytearray | memoryview, granularity: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``data`` into maximal runs of whole ``granularity`` blocks: ``(offset, length, is_zero)``.

    The last block may be shorter.  Used to keep a target sparse where a data extent holds zero blocks.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    start = 0
    current: bool | None = None
    for pos in range(0, n, granularity):
        zero = is_zero(view[pos : pos + granularity])
        if current is None:
            current = zero
        elif zero != current:
            yield start, pos - start, current
            start, current = pos, zero
    if current is not None:
        yield start, n - start, current
