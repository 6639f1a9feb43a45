"""A bounded thread pool for blocking system calls (pread/pwrite, fsync, fallocate, lseek).

The event loop never blocks: drivers hand every system call that may sleep to :func:`run_blocking`.
The pool is bounded so that a slow device cannot make us spawn threads without limit; requests beyond
the bound queue in the executor.  These calls release the GIL, so the copy engine's workers overlap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_THREADS = 16

_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(DEFAULT_THREADS, thread_name_prefix="cowbackup-io")
    return _pool


async def run_blocking(func: Callable[..., T], *args: object) -> T:
    """Run ``func(*args)`` in the I/O thread pool and return its result (or raise its exception)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(func, *args))
