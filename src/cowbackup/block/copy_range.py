"""Copy offloading with ``os.copy_file_range`` between two local files (``x-perf.use-copy-range``).

Only a ``file`` node, or a ``raw`` node over one, has a host file descriptor; anything else makes the
copy engine fall back to buffered copies for good.  The kernel copies without passing data through user
space, and on filesystems with reflinks may share blocks instead of copying them.
"""

from __future__ import annotations

import errno
import os

from cowbackup.block.node import BlockNode, FilterNode
from cowbackup.block.threadpool import run_blocking


def host_file(node: BlockNode) -> tuple[int, int] | None:
    """(fd, offset of the node's byte 0 in that file) for a local-file-backed node, else None.

    Follows raw nodes (adding their offset) and filters whose reads pass unchanged.
    """
    if isinstance(node, FilterNode):
        return host_file(node.child) if node.reads_unchanged else None
    if node.driver_name in ("file", "host_device"):
        fd = getattr(node, "fd", None)
        if isinstance(fd, int) and not getattr(node, "direct", False):
            return fd, 0
        return None
    if node.driver_name == "raw" and "file" in node.children:
        inner = host_file(node.children["file"].node)
        if inner is not None:
            return inner[0], inner[1] + int(getattr(node, "offset", 0))
    return None


def _copy_all(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        if n == 0:
            raise OSError(errno.EIO, "copy_file_range: unexpected end of the source file")
        src_off += n
        dst_off += n
        length -= n


async def copy_file_range(source: BlockNode, target: BlockNode, offset: int, length: int) -> bool:
    """Copy ``[offset, offset+length)`` from ``source`` to ``target`` in the kernel.

    Returns False without copying when either node is not a local file or the kernel cannot do it
    (EXDEV, ENOSYS, EOPNOTSUPP, EINVAL); raises ``OSError`` for real I/O errors.
    """
    src = host_file(source)
    dst = host_file(target)
    if src is None or dst is None:
        return False
    try:
        await run_blocking(_copy_all, src[0], src[1] + offset, dst[0], dst[1] + offset, length)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True
