"""Errors of the block layer.

Two kinds, split by what the caller can do next::

    BlockError                 configuration or graph error: bad options, unknown node, node busy.
                               Nothing was done; fix the request and try again (QMP: GenericError).
    RequestError(OSError)      an I/O request failed; ``errno`` says why (EIO, ENOSPC, EINVAL, EPERM, ...).
                               Jobs map it to their error policy, NBD to an error reply.

Drivers may also let a plain ``OSError`` from a system call escape: every I/O caller handles ``OSError``.
"""

from __future__ import annotations

import errno as errno_mod
import os


class BlockError(Exception):
    """A block-layer request that cannot be carried out as asked (bad options, graph conflicts)."""


class RequestError(OSError):
    """An I/O request failed; ``errno`` tells the cause, ``strerror`` the human-readable text."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message or os.strerror(err))


def io_error(message: str) -> RequestError:
    return RequestError(errno_mod.EIO, message)


def invalid(message: str) -> RequestError:
    return RequestError(errno_mod.EINVAL, message)
