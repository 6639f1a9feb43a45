"""QEMU's command-line option syntax: dotted ``key=value`` lists, or a JSON object.

What qemu-storage-daemon accepts for ``--blockdev``, ``--export``, ``--nbd-server`` and ``--monitor``
(QEMU's util/keyval.c and ``qobject_input_visitor_new_str``), re-created here::

    driver=file,node-name=f0,filename=/x.img    {"driver": "file", "node-name": "f0", "filename": "/x.img"}
    addr.type=unix,addr.path=/s                 {"addr": {"type": "unix", "path": "/s"}}
    a.0=x,a.1=y                                 {"a": ["x", "y"]}       numeric keys make a list
    filename=a,,b                               {"filename": "a,b"}     ",," is a comma inside a value
    file,node-name=f0    (implied key driver)   {"driver": "file", "node-name": "f0"}
    {"driver": "file", ...}                     the argument starts with "{": parsed as JSON

Rules, as QEMU has them:

* a key is one or more fragments joined by ``.``; the first fragment is a name (a letter, then letters,
  digits, ``-`` and ``_``); a later one is a name or a list index (decimal, no leading zero);
* only the first parameter may leave out its key, and only where the option has an implied key;
* a key given twice keeps the last value (QEMU: "the last one wins"), but a key may not be both a value
  and a group (``a=1,a.b=2``), and a group's members may not mix names and indices;
* list indices must run 0, 1, 2, ... without gaps.

Every value is a string (the consumer converts ``on``/``off`` and numbers); JSON keeps its types.  Errors
are :class:`KeyvalError` with QEMU's messages.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["KeyvalError", "format_keyval", "parse_keyval", "parse_option"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"0|[1-9][0-9]*")
#: QEMU's limit on one key fragment (``key_in_cur`` is 128 bytes with its NUL).
_MAX_FRAGMENT = 127


class KeyvalError(ValueError):
    """An option string that is not valid ``key=value`` syntax or JSON; the message is QEMU's."""


def _is_index(fragment: str) -> bool:
    return _INDEX.fullmatch(fragment) is not None


def _split_key(key: str) -> list[str]:
    """The fragments of ``key``; KeyvalError "Invalid parameter 'KEY'" when one is malformed."""
    fragments = key.split(".")
    for i, fragment in enumerate(fragments):
        ok = _NAME.fullmatch(fragment) is not None or (i > 0 and _is_index(fragment))
        if not ok:
            raise KeyvalError(f"Invalid parameter '{key}'")
        if len(fragment) > _MAX_FRAGMENT:
            raise KeyvalError(f"Parameter '{key}' is too long")
    return fragments


def _read_value(text: str, pos: int) -> tuple[str, int]:
    """The value starting at ``pos`` (``,,`` unescaped) and the position after its terminating comma."""
    out: list[str] = []
    while pos < len(text):
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), len(text)
        out.append(text[pos:comma])
        if text.startswith(",,", comma):
            out.append(",")
            pos = comma + 2
            continue
        return "".join(out), comma + 1
    return "".join(out), pos


def _put(root: dict[str, Any], fragments: list[str], value: str) -> None:
    """Store ``value`` under the path ``fragments``, creating groups on the way."""
    cur = root
    for depth, fragment in enumerate(fragments[:-1]):
        old = cur.get(fragment)
        if old is None:
            old = cur[fragment] = {}
        elif not isinstance(old, dict):
            raise KeyvalError(f"Parameters '{'.'.join(fragments[: depth + 1])}.*' used inconsistently")
        cur = old
    if isinstance(cur.get(fragments[-1]), dict):
        raise KeyvalError(f"Parameters '{'.'.join(fragments)}.*' used inconsistently")
    cur[fragments[-1]] = value


def _listify(group: dict[str, Any], path: str) -> dict[str, Any] | list[Any]:
    """Turn every group whose keys are all indices into a list, depth first (QEMU's keyval_listify)."""
    for key, value in group.items():
        if isinstance(value, dict):
            group[key] = _listify(value, f"{path}{key}.")
    indices = [key for key in group if _is_index(key)]
    if not indices:
        return group
    if len(indices) != len(group):
        raise KeyvalError(f"Parameters '{path}*' used inconsistently")
    items: list[Any] = []
    for i in range(len(group)):
        if str(i) not in group:
            raise KeyvalError(f"Parameter '{path}{i}' missing")
        items.append(group[str(i)])
    return items


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse a ``key=value,...`` list into nested dicts (and lists).  KeyvalError on bad syntax."""
    root: dict[str, Any] = {}
    pos = 0
    first = True
    while pos < len(text):
        end = len(text)
        for stop in ("=", ","):
            found = text.find(stop, pos)
            if 0 <= found < end:
                end = found
        key = text[pos:end]
        if first and implied_key is not None and key and (end == len(text) or text[end] != "="):
            # "file,node-name=x": the first parameter is the value of the implied key.
            value, pos = _read_value(text, pos)
            _put(root, [implied_key], value)
            first = False
            continue
        first = False
        fragments = _split_key(key)
        if end == len(text) or text[end] != "=":
            raise KeyvalError(f"Expected '=' after parameter '{key}'")
        value, pos = _read_value(text, end + 1)
        _put(root, fragments, value)
    result = _listify(root, "")
    assert isinstance(result, dict)  # the top level has names only: an index can't be a first fragment
    return result


def parse_option(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """A command-line option's argument: JSON when it starts with ``{``, else a ``key=value`` list."""
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise KeyvalError(f"JSON parse error, {err.msg} at column {err.colno}") from None
        if not isinstance(value, dict):  # pragma: no cover - a "{" that parses is always an object
            raise KeyvalError("JSON object expected")
        return value
    return parse_keyval(text, implied_key)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def format_keyval(options: dict[str, Any]) -> str:
    """The ``key=value`` list that :func:`parse_keyval` reads back as ``options`` (values as strings).

    Nested dicts become dotted keys, lists numeric keys.  Empty groups cannot be written and are left out.
    """
    parts: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            parts.append(f"{key}={_format_value(value)}")

    walk(options, "")
    return ",".join(parts)
