"""Errors of the NBD layer, grouped by what the caller can do next (as qemu.qmp's error.py)::

    NBDError                  root of every NBD error
     +-- ProtocolError        the peer broke the protocol (bad magic, absurd length, unknown cookie,
     |                        EOF in the middle of a message, ...): drop the connection, never retry on it
     +-- OptionError          the server refused an option (an NBD_REP_ERR_* reply): the connection is
     |                        fine; try another option or export, upgrade to TLS, or send NBD_OPT_ABORT
     +-- RequestError         a transmission request failed (an NBD error value): the connection is fine;
     |                        ``errno`` says why, as a system errno (it is also an ``OSError``)
     +-- StateError           a method was called in a state that does not allow it: a bug in the caller
                              (the asyncio shell), never caused by the peer

The sans-I/O cores (:mod:`cowbackup.nbd.server`, :mod:`cowbackup.nbd.client`) never raise for bad input
from the peer: they *return* a :class:`ProtocolError` (and the client an :class:`OptionError`) from
``next_event()``, and the shell may raise it.  Because they travel as events, these errors compare by
value (type and arguments), like the dataclass events next to them.
"""

from __future__ import annotations

import os

from cowbackup.nbd.constants import error_name, nbd_to_errno, opt_name, rep_name

__all__ = ["NBDError", "OptionError", "ProtocolError", "RequestError", "StateError"]


class NBDError(Exception):
    """Root of the NBD errors.  Instances compare equal when their type and ``args`` are equal."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, NBDError)
        return self.args == other.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class ProtocolError(NBDError):
    """The peer violated the protocol, or the connection ended in the middle of a message.

    The connection is unusable: close it (a hard disconnect, in the spec's words).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ProtocolError({self.message!r})"


class OptionError(NBDError):
    """The server answered option ``option`` with the error reply ``reply_type`` (``NBD_REP_ERR_*``).

    ``message`` is the server's text (may be empty).  The handshake can go on.
    """

    def __init__(self, option: int, reply_type: int, message: str = "") -> None:
        super().__init__(option, reply_type, message)
        self.option = option
        self.reply_type = reply_type
        self.message = message

    def __str__(self) -> str:
        text = f"{opt_name(self.option)} failed: {rep_name(self.reply_type)}"
        return f"{text}: {self.message}" if self.message else text

    def __repr__(self) -> str:
        return f"OptionError({opt_name(self.option)}, {rep_name(self.reply_type)}, {self.message!r})"


class RequestError(NBDError, OSError):
    """A transmission request failed with NBD error value ``nbd_error``; the connection is fine.

    ``errno`` is the matching system errno (:func:`~cowbackup.nbd.constants.nbd_to_errno`), so callers
    that handle ``OSError`` handle this too; ``strerror`` is the server's message or the errno's text.
    """

    def __init__(self, nbd_error: int, message: str = "") -> None:
        err = nbd_to_errno(nbd_error)
        OSError.__init__(self, err, message or os.strerror(err))
        self.nbd_error = nbd_error

    def __str__(self) -> str:
        return f"{error_name(self.nbd_error)}: {self.strerror}"


class StateError(NBDError):
    """A method was called in a state that does not allow it (a bug in the caller, not the peer)."""
