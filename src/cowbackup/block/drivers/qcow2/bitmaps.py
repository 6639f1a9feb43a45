"""Persistent dirty bitmaps in qcow2: the bitmap directory and bitmap tables (pure: no I/O).

Layout (``docs/interop/qcow2.txt``, "Bitmaps extension" and "Bitmaps")::

    header extension 0x23852875:  nb_bitmaps, 0, bitmap_directory_size, bitmap_directory_offset
                                                                   |
    bitmap directory (contiguous clusters) <-----------------------+
      entry: table_offset, table_size, flags, type, granularity_bits, name_size, extra_data_size,
             extra_data, name, zero padding to 8 bytes
                 |
    bitmap table (contiguous clusters): one u64 per cluster of bitmap data
      0                  the cluster of bitmap data reads as all zeros
      1                  ... as all ones
      offset (bits 9-55) the cluster of bitmap data is stored there

Bitmap data is the bitmap's level 0 with bit ``i`` (granule ``i``) at bit ``i % 8`` of byte ``i // 8``: the
order of :meth:`DirtyBitmap.serialize`.  The extension is trusted only while the ``bitmaps`` autoclear bit
is set (a program that does not know bitmaps clears it when it writes the image).

Limits are QEMU's, so that every image we write QEMU can load, and every image QEMU refuses we refuse too.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from cowbackup.block.bitmap import DirtyBitmap
from cowbackup.block.drivers.qcow2.format import InvalidImage
from cowbackup.block.drivers.qcow2.l2cache import decode_table, encode_table
from cowbackup.block.errors import BlockError
from cowbackup.block.zero import is_zero

#: Directory entry: bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits, name_size,
#: extra_data_size (then extra data, name, padding).
DIR_ENTRY = struct.Struct(">QIIBBHI")

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFF & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE)
BT_DIRTY_TRACKING_BITMAP = 1

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 * 1024 * 1024
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
#: Entries of one bitmap table, and bytes of one bitmap's data (QEMU's bounds on memory use).
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000

#: Bitmap table entry bits.
BTE_ALL_ONES = 1 << 0
BTE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BTE_RESERVED = 0xFF000000000001FE


def _fail(message: str) -> InvalidImage:
    return InvalidImage(f"qcow2: {message}")


@dataclass(slots=True)
class StoredBitmap:
    """A persistent dirty bitmap of a qcow2 image, as the node hands it out and takes it back.

    ``enabled`` is the ``auto`` flag: the bitmap tracks every write to the image.  ``inconsistent`` means
    the image was not closed cleanly while the bitmap was in use (``in_use`` found at open): its bits are
    meaningless (``bitmap`` is left empty); it can only be kept as it is or removed.  ``extra_data`` is
    the entry's extra data when it is marked compatible (unknown to us, kept unchanged).
    """

    name: str
    bitmap: DirtyBitmap
    enabled: bool = True
    inconsistent: bool = False
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity


@dataclass(slots=True)
class DirEntry:
    """One bitmap directory entry as it is (or will be) on disk."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    extra_data: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def usable(self) -> bool:
        """False for extra data we do not know and may not ignore: keep the entry, never use it."""
        return not self.extra_data or bool(self.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)

    def pack(self) -> bytes:
        name = self.name.encode()
        out = DIR_ENTRY.pack(
            self.table_offset,
            self.table_size,
            self.flags,
            BT_DIRTY_TRACKING_BITMAP,
            self.granularity_bits,
            len(name),
            len(self.extra_data),
        )
        out += self.extra_data + name
        return out + bytes(-len(out) % 8)


def pack_directory(entries: list[DirEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def parse_directory(data: bytes, nb_bitmaps: int) -> list[DirEntry]:
    """Parse and check a whole bitmap directory (``bitmap_directory_size`` bytes).

    Checks each entry's fixed fields (flags, type, granularity, name), that names are unique and that
    the ``nb_bitmaps`` entries fill the directory exactly.  Table placement is checked later, against the
    file (:func:`check_table_placement`).  Raises :class:`InvalidImage` naming the bitmap.
    """
    entries: list[DirEntry] = []
    names: set[str] = set()
    pos = 0
    for i in range(nb_bitmaps):
        if pos + DIR_ENTRY.size > len(data):
            raise _fail(f"bitmap directory is too short for {nb_bitmaps} entries (entry {i} is cut)")
        offset, tsize, flags, btype, gbits, name_size, extra_size = DIR_ENTRY.unpack_from(data, pos)
        end = pos + DIR_ENTRY.size + extra_size + name_size
        padded = end + (-end % 8)
        if padded > len(data):
            raise _fail(f"bitmap directory entry {i} runs past the end of the directory")
        extra = bytes(data[pos + DIR_ENTRY.size : pos + DIR_ENTRY.size + extra_size])
        raw_name = bytes(data[end - name_size : end])
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            raise _fail(f"name of bitmap directory entry {i} is not valid UTF-8") from None
        what = f"bitmap '{name}'"
        if name_size == 0 or name_size > MAX_NAME_SIZE:
            raise _fail(f"bitmap directory entry {i} has a name of {name_size} bytes (1 to {MAX_NAME_SIZE})")
        if name in names:
            raise _fail(f"{what} is stored twice in the bitmap directory")
        if any(data[end:padded]):
            raise _fail(f"padding after {what} in the bitmap directory is not zero")
        if flags & BME_RESERVED_FLAGS:
            raise _fail(f"{what} has reserved flags set ({flags:#x})")
        if btype != BT_DIRTY_TRACKING_BITMAP:
            raise _fail(f"{what} has unknown type {btype}")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise _fail(f"{what} has unsupported granularity 2^{gbits}")
        names.add(name)
        entries.append(DirEntry(name, offset, tsize, flags, gbits, extra))
        pos = padded
    if pos != len(data):
        raise _fail(f"bitmap directory is {len(data)} bytes but its {nb_bitmaps} entries take {pos}")
    return entries


def data_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for an image of ``size`` bytes."""
    bits = -(-size >> granularity_bits)
    return -(-bits // 8)


def table_size_for(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table of a bitmap over ``size`` bytes."""
    return -(-data_bytes(size, granularity_bits) // cluster_size)


def check_table_placement(entry: DirEntry, size: int, cluster_size: int, file_size: int) -> None:
    """The table of ``entry`` has the right size and lies, aligned, inside the file."""
    what = f"bitmap '{entry.name}'"
    need = table_size_for(size, entry.granularity_bits, cluster_size)
    if data_bytes(size, entry.granularity_bits) > MAX_PHYS_SIZE:
        raise _fail(f"{what} is too large ({data_bytes(size, entry.granularity_bits)} bytes of data)")
    if entry.table_size < need or entry.table_size > MAX_TABLE_SIZE:
        raise _fail(f"{what} has a bitmap table of {entry.table_size} entries, needs {need}")
    if entry.table_offset == 0 or entry.table_offset % cluster_size:
        raise _fail(f"{what}: bitmap table offset {entry.table_offset:#x} is not cluster aligned or 0")
    if entry.table_offset + entry.table_size * 8 > file_size:
        raise _fail(f"{what}: bitmap table at {entry.table_offset:#x} lies beyond the end of the file")


def parse_table(entry: DirEntry, data: bytes, needed: int, cluster_size: int, file_size: int) -> array[int]:
    """Decode and check a bitmap table: reserved bits, aligned data clusters inside the file, and no
    allocated entry past the ``needed`` ones (those hold no bits)."""
    table = decode_table(data)
    what = f"bitmap '{entry.name}'"
    for i, e in enumerate(table):
        off = e & BTE_OFFSET_MASK
        if e & BTE_RESERVED or (off and e & BTE_ALL_ONES):
            raise _fail(f"{what}: bitmap table entry {i} ({e:#x}) has reserved bits set")
        if off % cluster_size or off + cluster_size > file_size:
            raise _fail(
                f"{what}: bitmap data cluster {i} at {off:#x} is misaligned or beyond the end of file"
            )
        if i >= needed and e:
            raise _fail(f"{what}: bitmap table entry {i} is past the end of the bitmap but not zero")
    return table


def data_clusters(table: array[int]) -> list[int]:
    """Host offsets of the data clusters a bitmap table points at."""
    return [e & BTE_OFFSET_MASK for e in table if e & BTE_OFFSET_MASK]


def split_data(data: bytes, cluster_size: int) -> tuple[list[int], list[bytes]]:
    """Cut serialized bitmap data into clusters: the table entry of each (0 for all zeros, 1 for all
    ones -- full clusters only, as the tail bits of the last must stay zero -- or -1 where a data cluster
    is needed) and the contents of those data clusters, in order."""
    entries: list[int] = []
    chunks: list[bytes] = []
    ones = b"\xff" * cluster_size
    for pos in range(0, len(data), cluster_size):
        chunk = data[pos : pos + cluster_size]
        if is_zero(chunk):
            entries.append(0)
        elif chunk == ones:
            entries.append(BTE_ALL_ONES)
        else:
            entries.append(-1)
            chunks.append(chunk)
    return entries, chunks


def check_new_bitmaps(bitmaps: list[StoredBitmap], size: int, foreign: list[str]) -> None:
    """Refuse a set of bitmaps that cannot be stored (before anything is written).

    ``foreign`` names the entries we keep without using them (their names are taken).  Raises
    BlockError with the reason.
    """
    if len(bitmaps) + len(foreign) > MAX_BITMAPS:
        raise BlockError(f"Cannot store more than {MAX_BITMAPS} bitmaps in a qcow2 image")
    names: set[str] = set(foreign)
    dir_size = 0
    for sb in bitmaps:
        raw = sb.name.encode()
        if not 0 < len(raw) <= MAX_NAME_SIZE:
            raise BlockError(f"Bitmap name '{sb.name}' must be 1 to {MAX_NAME_SIZE} bytes long")
        if sb.name in names:
            raise BlockError(f"Bitmap '{sb.name}' is stored twice")
        names.add(sb.name)
        gbits = sb.granularity.bit_length() - 1
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise BlockError(
                f"Bitmap '{sb.name}': granularity {sb.granularity} is not supported by qcow2 "
                f"(2^{MIN_GRANULARITY_BITS} to 2^{MAX_GRANULARITY_BITS})"
            )
        if sb.bitmap.size != size:
            raise BlockError(f"Bitmap '{sb.name}' covers {sb.bitmap.size} bytes, the image {size}")
        if data_bytes(size, gbits) > MAX_PHYS_SIZE:
            raise BlockError(f"Bitmap '{sb.name}' is too large to be stored (granularity too small)")
        dir_size += DIR_ENTRY.size + len(sb.extra_data) + len(raw) + 8
    if dir_size > MAX_DIRECTORY_SIZE:
        raise BlockError("Bitmap directory would be too large")


def encode_bitmap_table(entries: list[int], cluster_size: int) -> bytes:
    """A bitmap table as it goes on disk, padded to whole clusters."""
    raw = encode_table(array("Q", entries))
    return raw + bytes(-len(raw) % cluster_size)
