"""Typed access to QEMU-style node options (``blockdev-add`` arguments).

Options arrive as JSON from QMP (typed values, nested objects) or as QEMU's dotted ``key=value`` lists
from the command line (every value a string).  :class:`Options` accepts both, converts, and remembers what
was consumed so that :meth:`Options.finish` can refuse anything a driver does not know -- an option is
never silently dropped.  Messages follow QEMU's wording.
"""

from __future__ import annotations

from collections.abc import Mapping
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
