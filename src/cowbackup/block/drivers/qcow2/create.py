"""Create an empty qcow2 image (version 3, 16-bit refcounts, lazy refcounts off, no preallocation).

Layout, in clusters (as ``qemu-img create`` lays it out)::

    | header | refcount table (R) | refcount blocks (B) | L1 table (L) |
      0        1                    1+R                   1+R+B

B and R are the smallest that cover all of it; every cluster has refcount 1.  The file ends with the L1
table (zeros, left sparse).
"""

from __future__ import annotations

import os
from array import array

from cowbackup.block.drivers.qcow2.format import (
    COMPRESSION_DEFLATE,
    COMPRESSION_ZSTD,
    INCOMPAT_COMPRESSION,
    MAX_CLUSTER_BITS,
    MAX_IMAGE_SIZE,
    MIN_CLUSTER_BITS,
    V3_HEADER_LENGTH,
    Header,
    build_header_cluster,
    l2_entries_needed,
)
from cowbackup.block.drivers.qcow2.refcount import encode_block
from cowbackup.block.errors import BlockError
from cowbackup.block.threadpool import run_blocking

REFCOUNT_ORDER = 4
DEFAULT_CLUSTER_SIZE = 65536


def _layout(cluster_size: int, l1_clusters: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) covering the fixed metadata."""
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    reftable, blocks = 1, 1
    while True:
        total = 1 + reftable + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, reftable):
            return reftable, blocks
        blocks, reftable = max(blocks, need_blocks), max(reftable, need_table)


def create_image(
    path: str,
    size: int,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compression_type: str = "zlib",
) -> None:
    """Create (or replace) ``path`` as an empty qcow2 image of ``size`` guest bytes.

    Blocking: call it from a thread (:func:`create`) or before an event loop runs.  ``backing_file`` is
    stored as given (relative names are resolved against the image's directory when it is opened).
    Raises BlockError for bad parameters or when the file cannot be written.
    """
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise BlockError(f"Cluster size must be a power of two between 512 and 2M, not {cluster_size}")
    if size < 0 or size > MAX_IMAGE_SIZE:
        raise BlockError(f"Image size {size} is out of range")
    if backing_fmt is not None and backing_file is None:
        raise BlockError("Backing format cannot be used without backing file")
    ctypes = {"zlib": COMPRESSION_DEFLATE, "zstd": COMPRESSION_ZSTD}
    if compression_type not in ctypes:
        raise BlockError(f"Unknown compression type '{compression_type}'")
    l1_size = l2_entries_needed(size, cluster_bits)
    l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
    reftable, blocks = _layout(cluster_size, l1_clusters)
    total = 1 + reftable + blocks + l1_clusters
    hdr = Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + reftable + blocks) * cluster_size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=reftable,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=REFCOUNT_ORDER,
        header_length=V3_HEADER_LENGTH,
        compression_type=ctypes[compression_type],
        backing_file=backing_file,
        backing_format=backing_fmt,
    )
    if hdr.compression_type != COMPRESSION_DEFLATE:
        hdr.incompatible_features |= INCOMPAT_COMPRESSION
    header = build_header_cluster(hdr, cluster_size)
    table = b"".join(((1 + reftable + i) * cluster_size).to_bytes(8, "big") for i in range(blocks))
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    refs = bytearray()
    for b in range(blocks):
        block = array("H", [1 if b * per_block + i < total else 0 for i in range(per_block)])
        refs += encode_block(block, REFCOUNT_ORDER)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise BlockError(f"Could not create '{path}': {err.strerror}") from err
    try:
        os.pwrite(fd, header, 0)
        os.pwrite(fd, table, cluster_size)
        os.pwrite(fd, bytes(refs), (1 + reftable) * cluster_size)
        os.ftruncate(fd, total * cluster_size)
        os.fsync(fd)
    except OSError as err:
        raise BlockError(f"Could not write '{path}': {err.strerror}") from err
    finally:
        os.close(fd)


async def create(
    path: str,
    size: int,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    compression_type: str = "zlib",
) -> None:
    """:func:`create_image` in the I/O thread pool."""
    await run_blocking(create_image, path, size, cluster_size, backing_file, backing_fmt, compression_type)
