"""The value types of the block-node interface: request flags, block status, extents and driver limits.

They are what callers pass to a :class:`~cowbackup.block.node.BlockNode` and what it answers: plain values
that do no I/O, so any module can use them without the request path.  :mod:`cowbackup.block.node` exports
them too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

#: Any buffer the block layer accepts for data (a memoryview of it is taken, never a copy).
Buffer = bytes | bytearray | memoryview

#: Default upper bound of one driver request when the driver sets none.
DEFAULT_MAX_TRANSFER = 32 * 1024 * 1024
#: Default upper bound of one write-zeroes or discard request handed to a driver.
DEFAULT_MAX_ZEROES = 1 << 30


class Status(enum.IntFlag):
    """Block status flags of an extent (QEMU's BDRV_BLOCK_DATA / ZERO / ALLOCATED).

    ``DATA``: the driver stores data there (reads are not known to be zero).
    ``ZERO``: reads return zeros.
    ``ALLOCATED``: the range is allocated in this layer (not inherited from a backing file).
    A hole of a sparse file is ``ZERO`` and not ``DATA``; "unknown" is reported as ``DATA | ALLOCATED``.
    """

    DATA = 1
    ZERO = 2
    ALLOCATED = 4


class RequestFlags(enum.IntFlag):
    """Per-request flags (QEMU's BdrvRequestFlags)."""

    #: Force unit access: the write is on stable storage when the request completes.
    FUA = 1
    #: write_zeroes may deallocate (punch a hole) instead of writing zeros.
    MAY_UNMAP = 2
    #: write_zeroes must fail with ENOTSUP rather than fall back to writing zero buffers.
    NO_FALLBACK = 4
    #: The write does not change the data (copy-before-write need not save the old contents).
    WRITE_UNCHANGED = 8
    #: Store whole clusters compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED).  Only for nodes whose
    #: ``supports_compressed_writes`` is true; others ignore the flag and write normally.
    WRITE_COMPRESSED = 16


#: The default of every ``flags`` argument.
NO_FLAGS = RequestFlags(0)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one block status."""

    offset: int
    length: int
    flags: Status

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & Status.ZERO)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & Status.DATA)

    @property
    def is_allocated(self) -> bool:
        return bool(self.flags & Status.ALLOCATED)


@dataclass(slots=True)
class Limits:
    """What a driver can take in one request.

    ``request_alignment``: offsets and lengths given to the driver are multiples of this (power of two).
    ``max_transfer``: longest read/write given to the driver (a multiple of the alignment).
    ``max_zeroes``, ``max_discard``: the same for write-zeroes and discard.
    ``cluster_size``: the allocation unit of a format with clusters (0 when there is none).
    """

    request_alignment: int = 1
    max_transfer: int = DEFAULT_MAX_TRANSFER
    max_zeroes: int = DEFAULT_MAX_ZEROES
    max_discard: int = DEFAULT_MAX_ZEROES
    cluster_size: int = 0


#: Called with (offset, length) after every write, write-zeroes or discard on a node completes.
WriteObserver = Callable[[int, int], None]
