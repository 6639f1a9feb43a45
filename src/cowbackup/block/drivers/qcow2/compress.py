"""Compressed clusters: raw deflate (QEMU: zlib with a 4 KiB window, no header) or zstd frames.

A compressed cluster's stored length is rounded up to whole 512-byte sectors, so the data read back may
have garbage after the end of the stream; both decoders stop once a cluster's worth of output is there.
"""

from __future__ import annotations

import sys
import zlib

from cowbackup.block.drivers.qcow2.format import COMPRESSION_DEFLATE, COMPRESSION_ZSTD

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

#: QEMU compresses with a 4 KiB window (wbits -12); any raw deflate stream decodes with the largest one.
DEFLATE_WBITS = -12
INFLATE_WBITS = -15


class CompressedDataError(ValueError):
    """A compressed cluster does not decode to exactly one cluster."""


def compress(data: bytes | memoryview, ctype: int) -> bytes | None:
    """Compress one cluster; None when that would not save space (QEMU then writes it uncompressed)."""
    if ctype == COMPRESSION_ZSTD:
        out = zstd.compress(data)
    else:
        comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, DEFLATE_WBITS)
        out = comp.compress(data) + comp.flush()
    return out if len(out) < len(data) else None


def decompress(data: bytes, ctype: int, cluster_size: int) -> bytes:
    """Decode one cluster.  Raises :class:`CompressedDataError` when the result is not a full cluster."""
    try:
        if ctype == COMPRESSION_DEFLATE:
            out = zlib.decompressobj(INFLATE_WBITS).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = zstd.ZstdDecompressor().decompress(data, cluster_size)
        else:
            raise CompressedDataError(f"unknown compression type {ctype}")
    except (zlib.error, zstd.ZstdError) as err:
        raise CompressedDataError(f"compressed cluster does not decode: {err}") from err
    if len(out) != cluster_size:
        raise CompressedDataError(f"compressed cluster decodes to {len(out)} bytes, not {cluster_size}")
    return out
