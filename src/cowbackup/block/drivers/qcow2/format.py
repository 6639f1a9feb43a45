"""qcow2 on-disk layout: the header, its extensions and the bit layout of table entries.

Everything here is pure (bytes in, values out): no I/O.  Names follow QEMU's ``docs/interop/qcow2.txt``
(https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt); all integers are big-endian.

Parsing validates every field it returns; a bad one raises :class:`InvalidImage` (a ``BlockError``) with a
message that names the field, so that a broken image is refused at open with a clear reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cowbackup.block.errors import BlockError

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

#: Header fields common to versions 2 and 3 (72 bytes):
#: magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
#: l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
#: Version 3 additions (bytes 72..103): incompatible_features, compatible_features, autoclear_features,
#: refcount_order, header_length.
HEADER_V3_EXTRA = struct.Struct(">QQQII")
#: Byte 104 (when header_length > 104): compression_type; the header is padded to 112 bytes.
V3_HEADER_LENGTH = 112
COMPRESSION_TYPE_OFFSET = 104
#: Byte offset of refcount_table_offset (u64) and refcount_table_clusters (u32), updated together.
REFTABLE_FIELDS_OFFSET = 48
REFTABLE_FIELDS = struct.Struct(">QI")
#: Byte offset of incompatible_features (v3).
INCOMPAT_OFFSET = 72
AUTOCLEAR_OFFSET = 88

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
#: Extension header: type, length (the data follows, padded to 8 bytes).
EXT_HEADER = struct.Struct(">II")
#: Feature name table entry: type (0 incompatible, 1 compatible, 2 autoclear), bit number, name[46].
FEATURE_ENTRY = struct.Struct(">BB46s")
#: Bitmaps extension data: nb_bitmaps, reserved (0), bitmap_directory_size, bitmap_directory_offset.
BITMAPS_EXT = struct.Struct(">IIQQ")

# Limits (QEMU's, so that images QEMU refuses are refused here too).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_NAME = 1023
MAX_IMAGE_SIZE = 1 << 61  # guest sizes beyond this overflow QEMU's 64-bit offset arithmetic

# L1/L2/refcount-table entry bits.
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: host offset of a table or standard cluster
L1E_RESERVED = 0x7F000000000001FF
L2E_COPIED = 1 << 63  # refcount is exactly one: may be written in place
L2E_COMPRESSED = 1 << 62
L2E_ZERO = 1 << 0  # v3: the cluster reads as zeros
L2E_STD_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x1FF


class InvalidImage(BlockError):
    """The image's header or tables are not valid qcow2 (or use a feature we do not implement)."""


def _fail(message: str) -> InvalidImage:
    return InvalidImage(f"qcow2: {message}")


@dataclass(slots=True)
class Header:
    """The parsed header and extensions of a qcow2 image."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2.size
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    #: (type, bit) -> name, from the feature name table (for error messages).
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: The bitmaps extension: (nb_bitmaps, directory_size, directory_offset), when present.
    bitmaps_ext: tuple[int, int, int] | None = None
    #: Extensions we do not know, (type, data) in file order: written back unchanged with the header.
    unknown_exts: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    def pack(self) -> bytes:
        """The fixed header (v2: 72 bytes; v3: ``header_length`` bytes)."""
        out = HEADER_V2.pack(
            QCOW_MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return out
        out += HEADER_V3_EXTRA.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        if self.header_length > COMPRESSION_TYPE_OFFSET:
            out += bytes([self.compression_type])
        return out.ljust(self.header_length, b"\0")


def pack_extension(ext_type: int, data: bytes) -> bytes:
    """One header extension, padded to a multiple of 8 bytes."""
    padded = data + bytes(-len(data) % 8)
    return EXT_HEADER.pack(ext_type, len(data)) + padded


def l2_entries_needed(size: int, cluster_bits: int) -> int:
    """Number of L1 entries that cover ``size`` guest bytes."""
    per_l2 = (1 << cluster_bits) * ((1 << cluster_bits) // 8)
    return -(-size // per_l2)


def _feature_list(bits: int, ftype: int, names: dict[tuple[int, int], str]) -> str:
    out = []
    for bit in range(64):
        if bits >> bit & 1:
            out.append(names.get((ftype, bit), f"Unknown incompatible feature: {1 << bit:x}"))
    return ", ".join(out)


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``buf`` (the image's first cluster, or less if the file is short).

    ``file_size`` bounds every table offset.  Raises :class:`InvalidImage` naming the bad field.
    """
    if len(buf) < HEADER_V2.size:
        raise _fail(f"image is truncated: {len(buf)} bytes is shorter than the header")
    fields = HEADER_V2.unpack_from(buf)
    if fields[0] != QCOW_MAGIC:
        raise _fail("image is not in qcow2 format (bad magic)")
    hdr = Header(*fields[1:])
    if hdr.version not in (2, 3):
        raise _fail(f"unsupported qcow2 version {hdr.version}")
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(f"unsupported cluster size: 2^{hdr.cluster_bits}")
    if hdr.version == 3:
        if len(buf) < HEADER_V2.size + HEADER_V3_EXTRA.size:
            raise _fail("image is truncated inside the version 3 header")
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = HEADER_V3_EXTRA.unpack_from(buf, HEADER_V2.size)
        if hdr.header_length < 104 or hdr.header_length % 8:
            raise _fail(f"invalid header_length {hdr.header_length}")
        if hdr.header_length > min(len(buf), hdr.cluster_size):
            raise _fail("header_length is larger than the header cluster")
        if hdr.header_length > COMPRESSION_TYPE_OFFSET:
            hdr.compression_type = buf[COMPRESSION_TYPE_OFFSET]
    cs = hdr.cluster_size
    _parse_extensions(buf, hdr)
    _check_features(hdr)
    if hdr.crypt_method:
        raise _fail("encrypted images are not supported")
    if hdr.refcount_order > 6:
        raise _fail(f"invalid refcount_order {hdr.refcount_order} (at most 6: 64-bit refcounts)")
    if hdr.size > MAX_IMAGE_SIZE:
        raise _fail(f"image size {hdr.size} is too large")
    if hdr.l1_size * 8 > MAX_L1_BYTES:
        raise _fail(f"active L1 table of {hdr.l1_size} entries is too large")
    if hdr.l1_size < l2_entries_needed(hdr.size, hdr.cluster_bits):
        raise _fail(f"L1 table of {hdr.l1_size} entries is too short for image size {hdr.size}")
    _check_table(hdr.l1_table_offset, hdr.l1_size * 8, cs, file_size, "L1 table")
    if hdr.refcount_table_clusters == 0 or hdr.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _fail(f"invalid refcount table size of {hdr.refcount_table_clusters} clusters")
    _check_table(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, cs, file_size, "refcount table")
    if hdr.nb_snapshots:
        _check_table(hdr.snapshots_offset, 1, cs, file_size, "snapshot table")
    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME or hdr.backing_file_size == 0:
            raise _fail(f"backing file name of {hdr.backing_file_size} bytes is invalid")
        end = hdr.backing_file_offset + hdr.backing_file_size
        if end > min(len(buf), cs):
            raise _fail("backing file name lies outside the header cluster")
        try:
            hdr.backing_file = buf[hdr.backing_file_offset : end].decode()
        except UnicodeDecodeError:
            raise _fail("backing file name is not valid UTF-8") from None
        if "\0" in hdr.backing_file:
            raise _fail("backing file name contains a NUL byte")
    return hdr


def _check_table(offset: int, length: int, cs: int, file_size: int, what: str) -> None:
    if offset % cs:
        raise _fail(f"{what} offset {offset:#x} is not aligned to the cluster size")
    if offset == 0 and length:
        raise _fail(f"{what} overlaps the header")
    if offset + length > file_size:
        raise _fail(f"{what} at {offset:#x} ({length} bytes) lies beyond the end of the file ({file_size})")


def _check_features(hdr: Header) -> None:
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise _fail(f"unsupported features: {_feature_list(unknown, 0, hdr.feature_names)}")
    if hdr.incompatible_features & INCOMPAT_DATA_FILE:
        raise _fail("images with an external data file are not supported")
    if hdr.incompatible_features & INCOMPAT_EXTL2:
        raise _fail("images with extended L2 entries (subclusters) are not supported")
    compression_flag = bool(hdr.incompatible_features & INCOMPAT_COMPRESSION)
    if hdr.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise _fail(f"unknown compression type {hdr.compression_type}")
    if compression_flag != (hdr.compression_type != COMPRESSION_DEFLATE):
        raise _fail("compression_type and the compression type feature bit disagree")


def _parse_extensions(buf: bytes, hdr: Header) -> None:
    """Read the header extensions that follow the fixed header, up to the end marker."""
    pos = hdr.header_length
    limit = min(len(buf), hdr.cluster_size)
    if hdr.backing_file_offset:
        limit = min(limit, hdr.backing_file_offset)
    while True:
        if pos + EXT_HEADER.size > limit:
            raise _fail("header extensions run past the header cluster (no end marker)")
        ext_type, length = EXT_HEADER.unpack_from(buf, pos)
        pos += EXT_HEADER.size
        if ext_type == EXT_END:
            return
        if pos + length > limit:
            raise _fail(f"header extension {ext_type:#x} of {length} bytes runs past the header cluster")
        data = bytes(buf[pos : pos + length])
        pos += length + (-length % 8)
        if ext_type == EXT_BACKING_FORMAT:
            try:
                hdr.backing_format = data.decode()
            except UnicodeDecodeError:
                raise _fail("backing format extension is not valid UTF-8") from None
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(length // FEATURE_ENTRY.size):
                ftype, bit, name = FEATURE_ENTRY.unpack_from(data, i * FEATURE_ENTRY.size)
                hdr.feature_names[(ftype, bit)] = name.rstrip(b"\0").decode(errors="replace")
        elif ext_type == EXT_BITMAPS:
            if hdr.version < 3:
                continue  # v2 has no autoclear bit to vouch for it: the extension is stale by definition
            if length != BITMAPS_EXT.size:
                raise _fail(f"bitmaps extension has {length} bytes, not {BITMAPS_EXT.size}")
            nb, reserved, dsize, doff = BITMAPS_EXT.unpack(data)
            if reserved:
                raise _fail("reserved field of the bitmaps extension is not zero")
            hdr.bitmaps_ext = (nb, dsize, doff)
        elif ext_type == EXT_DATA_FILE:
            raise _fail("images with an external data file are not supported")
        elif ext_type == EXT_CRYPTO:
            raise _fail("encrypted images are not supported")
        else:
            # Unknown extensions are kept, so that rewriting the header preserves them (as the spec asks).
            hdr.unknown_exts.append((ext_type, data))


def build_header_cluster(hdr: Header, cluster_size: int) -> bytes:
    """The whole header cluster: fixed header, extensions (backing format, feature names, bitmaps), end
    marker, then the backing file name.  Sets ``hdr.backing_file_offset``/``size`` accordingly.

    Raises InvalidImage if it all does not fit in one cluster.
    """
    exts = b""
    if hdr.version == 3:
        # The bitmaps extension goes first, right after the fixed header: it is what changes when bitmaps
        # are stored, and there it stays inside the first 512-byte sector and nothing else moves while it
        # exists (QEMU puts it after the feature table; the order is free).
        if hdr.bitmaps_ext is not None:
            nb, dsize, doff = hdr.bitmaps_ext
            exts += pack_extension(EXT_BITMAPS, BITMAPS_EXT.pack(nb, 0, dsize, doff))
        if hdr.backing_format:
            exts += pack_extension(EXT_BACKING_FORMAT, hdr.backing_format.encode())
    for ext_type, data in hdr.unknown_exts:
        exts += pack_extension(ext_type, data)
    name = hdr.backing_file.encode() if hdr.backing_file else b""
    fixed_len = hdr.header_length if hdr.version == 3 else HEADER_V2.size
    if len(name) > MAX_BACKING_NAME:
        raise _fail("backing file name is too long")
    table = pack_extension(EXT_FEATURE_TABLE, _FEATURE_TABLE)
    # The feature name table only helps error messages: it is left out where it does not fit (512-byte
    # clusters with bitmaps or a backing file).
    if hdr.version == 3 and fixed_len + len(exts) + len(table) + EXT_HEADER.size + len(name) <= cluster_size:
        exts += table
    exts += EXT_HEADER.pack(EXT_END, 0)
    hdr.backing_file_offset = fixed_len + len(exts) if name else 0
    hdr.backing_file_size = len(name)
    out = hdr.pack() + exts + name
    if len(out) > cluster_size:
        raise _fail("header and extensions do not fit in one cluster")
    return out.ljust(cluster_size, b"\0")


_FEATURE_TABLE = b"".join(
    FEATURE_ENTRY.pack(ftype, bit, name.encode())
    for ftype, bit, name in (
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    )
)
