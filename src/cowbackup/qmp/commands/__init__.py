"""The QMP command registry and the argument helpers every command module uses.

A command module registers handlers with :func:`command`::

    @command("block-job-pause")
    async def block_job_pause(ctx: QMPContext, args: dict[str, Any]) -> Any:
        no_extra(args, {"device"})
        ...
        return {}

A handler gets the session's :class:`QMPContext` and the ``arguments`` object (``{}`` when absent) and
returns the ``return`` value. It refuses a request by raising :class:`QMPError`; the server also maps
``BlockError`` to ``GenericError`` and ``JobError`` to its ``qmp_class`` (:func:`to_qmp_error`), so
handlers let those escape.

The argument helpers reproduce QEMU's QAPI input-visitor messages, word for word, because clients (and
our differential tests) compare them::

    missing          Parameter 'device' is missing
    wrong JSON type  Invalid parameter type for 'device', expected: string
    bad enum value   Parameter 'sync' does not accept value 'x'
    unknown member   Parameter 'x' is unexpected

Nested members are named with their path, as QEMU does (``x-perf.max-workers``): pass ``prefix``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cowbackup.block.errors import BlockError
from cowbackup.jobs.states import JobError

if TYPE_CHECKING:
    from cowbackup.daemon import Daemon

__all__ = [
    "COMMANDS",
    "CommandSpec",
    "Handler",
    "QMPContext",
    "QMPError",
    "arg_bool",
    "arg_enum",
    "arg_int",
    "arg_list",
    "arg_obj",
    "arg_str",
    "command",
    "load_all",
    "no_extra",
    "to_qmp_error",
]


class QMPError(Exception):
    """A command refused; becomes ``{"error": {"class": error_class, "desc": desc}}``.

    ``error_class`` is one of QEMU's ErrorClass names: ``GenericError``, ``CommandNotFound``,
    ``DeviceNotActive``, ``DeviceNotFound``, ``KVMMissingCap``.
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class QMPContext:
    """What a handler may reach: the daemon, the monitor session that sent the command, the server.

    ``session`` and ``server`` are typed loosely so that this module does not depend on the server;
    commands that need them (``quit``) use the attributes the server documents.
    """

    daemon: Daemon
    session: object = None
    server: object = None


Handler = Callable[[QMPContext, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class CommandSpec:
    """One registered command.

    ``allow_before_caps``: may run before ``qmp_capabilities`` (only ``qmp_capabilities`` itself);
    ``allow_oob``: may be sent with ``exec-oob`` (advertised in ``query-commands``; we run OOB
    commands in order like any other, which is allowed for a monitor without the ``oob`` capability).
    """

    name: str
    handler: Handler
    allow_before_caps: bool = False
    allow_oob: bool = False
    module: str = field(default="", compare=False)


# Registered commands by name; filled at import time of the command modules (see load_all()).
COMMANDS: dict[str, CommandSpec] = {}

_H = TypeVar("_H", bound=Handler)


def command(name: str, *, allow_before_caps: bool = False, allow_oob: bool = False) -> Callable[[_H], _H]:
    """Decorator: register ``handler`` as the QMP command ``name``.

    Raises ``ValueError`` when ``name`` is already registered by another handler (two modules
    fighting over one command is a bug that must not be decided by import order).
    """

    def register(handler: _H) -> _H:
        old = COMMANDS.get(name)
        # Re-importing the same module (reload) replaces silently; another module may not.
        if old is not None and old.module != handler.__module__:
            raise ValueError(f"QMP command {name!r} registered twice")
        COMMANDS[name] = CommandSpec(
            name,
            handler,
            allow_before_caps=allow_before_caps,
            allow_oob=allow_oob,
            module=handler.__module__,
        )
        return handler

    return register


def load_all() -> None:
    """Import every module of this package so that their ``@command`` decorators run. Idempotent."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def to_qmp_error(err: Exception) -> QMPError | None:
    """The QMP error for an exception a handler let escape, or ``None`` if it is not a refusal.

    ``BlockError`` -> ``GenericError``; ``JobError`` -> its ``qmp_class``. Anything else is a bug
    the server logs and still answers with ``GenericError`` (QEMU would abort; a daemon should not).
    """
    if isinstance(err, QMPError):
        return err
    if isinstance(err, JobError):
        return QMPError(str(err), err.qmp_class)
    if isinstance(err, BlockError):
        return QMPError(str(err), "GenericError")
    return None


# ---------------------------------------------------------------------------------- argument helpers

_MISSING: Any = object()


def _name(key: str, prefix: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _get(args: Mapping[str, Any], key: str, default: Any, prefix: str) -> Any:
    if key in args:
        return args[key]
    if default is _MISSING:
        raise QMPError(f"Parameter '{_name(key, prefix)}' is missing")
    return default


def _wrong_type(key: str, prefix: str, expected: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{_name(key, prefix)}', expected: {expected}")


def arg_str(args: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """``args[key]`` as a string; ``default`` (any value, e.g. ``None``) when absent and optional."""
    value = _get(args, key, default, prefix)
    if key in args and not isinstance(value, str):
        raise _wrong_type(key, prefix, "string")
    return value


def arg_int(args: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """``args[key]`` as an integer (JSON number without fraction; ``true`` is not an integer)."""
    value = _get(args, key, default, prefix)
    if key in args and (isinstance(value, bool) or not isinstance(value, int)):
        raise _wrong_type(key, prefix, "integer")
    return value


def arg_bool(args: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """``args[key]`` as a boolean."""
    value = _get(args, key, default, prefix)
    if key in args and not isinstance(value, bool):
        raise _wrong_type(key, prefix, "boolean")
    return value


def arg_obj(args: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """``args[key]`` as a JSON object (``dict``)."""
    value = _get(args, key, default, prefix)
    if key in args and not isinstance(value, dict):
        raise _wrong_type(key, prefix, "object")
    return value


def arg_list(args: Mapping[str, Any], key: str, default: Any = _MISSING, *, prefix: str = "") -> Any:
    """``args[key]`` as a JSON array (``list``)."""
    value = _get(args, key, default, prefix)
    if key in args and not isinstance(value, list):
        raise _wrong_type(key, prefix, "array")
    return value


def arg_enum(
    args: Mapping[str, Any],
    key: str,
    choices: Collection[str],
    default: Any = _MISSING,
    *,
    prefix: str = "",
) -> Any:
    """``args[key]``, a string that must be one of ``choices``."""
    value = arg_str(args, key, default, prefix=prefix)
    if key in args and value not in choices:
        raise QMPError(f"Parameter '{_name(key, prefix)}' does not accept value '{value}'")
    return value


def no_extra(args: Mapping[str, Any], allowed: Collection[str], *, prefix: str = "") -> None:
    """Refuse any member of ``args`` not in ``allowed`` (QEMU checks this after the known members)."""
    for key in args:
        if key not in allowed:
            raise QMPError(f"Parameter '{_name(key, prefix)}' is unexpected")
