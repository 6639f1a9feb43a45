"""Typed access to QEMU-style node options (``blockdev-add`` arguments).

Options arrive as JSON from QMP (typed values, nested objects) or as QEMU's dotted ``key=value`` lists
from the command line (every value a string).  :class:`Options` accepts both, converts, and remembers what
was consumed so that :meth:`Options.finish` can refuse anything a driver does not know -- an option is
never silently dropped.  Messages follow QEMU's wording.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cowbackup.block.errors import BlockError

_MISSING: Any = object()

#: A reference to a node: its name, or an inline definition (QEMU's BlockdevRef).
NodeRef = str | dict[str, Any]


class Options:
    """A view of one option dictionary, consumed key by key."""

    def __init__(self, options: Mapping[str, Any], prefix: str = "") -> None:
        self._opts = dict(options)
        self._prefix = prefix
        #: The options every node has, once the registry has taken them out (:func:`parse_base`).
        self.base = BaseOptions()

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self._opts

    def peek(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` without consuming it."""
        return self._opts.get(key, default)

    def discard(self, key: str) -> None:
        """Consume ``key`` if present, ignoring its value."""
        self._opts.pop(key, None)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self._opts:
            return self._opts.pop(key)
        if default is _MISSING:
            raise BlockError(f"Parameter '{self._name(key)}' is missing")
        return default

    def get_str(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise BlockError(f"Invalid parameter type for '{self._name(key)}', expected: string")
        return value

    def get_int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except ValueError:
                raise BlockError(f"Parameter '{self._name(key)}' expects a number") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise BlockError(f"Invalid parameter type for '{self._name(key)}', expected: integer")
        if minimum is not None and value < minimum:
            raise BlockError(f"Parameter '{self._name(key)}' expects a value of at least {minimum}")
        return value

    def get_bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            if value in ("on", "true", "yes"):
                return True
            if value in ("off", "false", "no"):
                return False
            raise BlockError(f"Parameter '{self._name(key)}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise BlockError(f"Invalid parameter type for '{self._name(key)}', expected: boolean")
        return value

    def get_enum(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.get_str(key, default)
        if value is default and default is not _MISSING:
            return value
        if value not in choices:
            raise BlockError(f"Parameter '{self._name(key)}' does not accept value '{value}'")
        return value

    def get_dict(self, key: str) -> Options:
        """A nested option group (``cache``, ``server``); absent means empty."""
        value = self.raw(key, {})
        if not isinstance(value, Mapping):
            raise BlockError(f"Invalid parameter type for '{self._name(key)}', expected: object")
        return Options(value, prefix=f"{self._name(key)}.")

    def get_ref(self, key: str, default: Any = _MISSING) -> Any:
        """A node reference: a node name or an inline definition."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str | Mapping):
            raise BlockError(f"Invalid parameter type for '{self._name(key)}', expected: BlockdevRef")
        return value if isinstance(value, str) else dict(value)

    def finish(self) -> None:
        """Refuse every option nobody consumed."""
        for key in self._opts:
            raise BlockError(f"Parameter '{self._name(key)}' is unexpected")


#: QEMU's BlockdevDiscardOptions and BlockdevDetectZeroesOptions.  ``discard`` is a QAPI enum for
#: ``blockdev-add`` and ``--blockdev``: the ``on``/``off`` spellings of ``-drive`` are refused there.
DISCARD_VALUES = ("ignore", "unmap")
DETECT_ZEROES_VALUES = ("off", "on", "unmap")


@dataclass(frozen=True)
class BaseOptions:
    """The options of every node, whatever its driver (QEMU's BlockdevOptionsBase).

    ``discard_unmap``: ``discard=unmap``; a node without it drops the discards sent to it (QEMU's
    BDRV_O_UNMAP, tested in bdrv_co_pdiscard).  ``cache_direct``/``cache_no_flush``: ``cache.direct``
    and ``cache.no-flush``, acted on by the ``file`` driver and passed on to inline children.
    ``auto_read_only``: a ``file`` node that cannot be opened read-write opens read-only.
    ``force_share``: accepted (read-only nodes only, as QEMU) and without effect: we take no QEMU-style
    image locks to share.
    """

    read_only: bool = False
    auto_read_only: bool = False
    force_share: bool = False
    discard_unmap: bool = False
    cache_direct: bool = False
    cache_no_flush: bool = False
    detect_zeroes: str = "off"


def parse_base(opts: Options) -> BaseOptions:
    """Take the options every node has out of ``opts`` and check them, with QEMU's messages."""
    discard = opts.get_enum("discard", DISCARD_VALUES, "ignore")
    cache = opts.get_dict("cache")
    direct = cache.get_bool("direct", False)
    no_flush = cache.get_bool("no-flush", False)
    cache.finish()
    base = BaseOptions(
        read_only=opts.get_bool("read-only", False),
        auto_read_only=opts.get_bool("auto-read-only", False),
        force_share=opts.get_bool("force-share", False),
        discard_unmap=discard == "unmap",
        cache_direct=direct,
        cache_no_flush=no_flush,
        detect_zeroes=opts.get_enum("detect-zeroes", DETECT_ZEROES_VALUES, "off"),
    )
    if base.force_share and not base.read_only:
        raise BlockError("force-share=on can only be used with read-only images")
    if base.detect_zeroes == "unmap" and not base.discard_unmap:
        raise BlockError(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        )
    return base


def inherit(parent: BaseOptions, child: Mapping[str, Any], *, cow: bool = False) -> dict[str, Any]:
    """The options of an inline child of a node with ``parent``'s base options (QEMU's
    bdrv_inherited_options): what the child does not set itself.

    ``cache.direct``, ``cache.no-flush`` and ``force-share`` come from the parent; ``read-only`` and
    ``auto-read-only`` too, except for a backing file (``cow``), which is read-only by default; and
    ``discard`` is ``unmap`` -- the parent drops the discards it ignores before they reach the child, so
    the child may execute every one it gets.  ``detect-zeroes`` is never inherited.  A child given by
    name keeps its own options: this applies to inline definitions only.
    """
    out = dict(child)
    cache = out.get("cache", {})
    if isinstance(cache, Mapping):
        out["cache"] = {"direct": parent.cache_direct, "no-flush": parent.cache_no_flush, **cache}
    if parent.force_share:
        out.setdefault("force-share", True)
    if cow:
        out.setdefault("read-only", True)
        out.setdefault("auto-read-only", False)
    else:
        out.setdefault("read-only", parent.read_only)
        out.setdefault("auto-read-only", parent.auto_read_only)
    out.setdefault("discard", "unmap")
    return out


_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64k``, ``100M``, ``1.5G``, ``2T`` (binary units, as QEMU) into bytes.

    Raises ValueError for anything else, including negative values.
    """
    s = text.strip().lower()
    if s.endswith("ib"):
        s = s[:-2]
    elif s.endswith("b") and len(s) > 1 and not s[-2].isdigit():
        s = s[:-1]
    unit = s[-1:] if s[-1:].isalpha() else ""
    if unit not in _SUFFIXES:
        raise ValueError(f"invalid size '{text}'")
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise ValueError(f"invalid size '{text}'") from None
    result = int(value * _SUFFIXES[unit])
    if result < 0 or (isinstance(value, float) and value * _SUFFIXES[unit] != result):
        raise ValueError(f"invalid size '{text}'")
    return result
