"""QEMU's ``key=value`` option syntax (cli/keyval.py): results and error messages as QEMU gives them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowbackup.cli.keyval import KeyvalError, format_keyval, parse_keyval, parse_option


@pytest.mark.parametrize(
    ("text", "implied", "expected"),
    [
        ("", None, {}),
        (
            "driver=file,node-name=f0,filename=/x.img",
            None,
            {"driver": "file", "node-name": "f0", "filename": "/x.img"},
        ),
        ("addr.type=unix,addr.path=/s", None, {"addr": {"type": "unix", "path": "/s"}}),
        ("a.0=x,a.1=y", None, {"a": ["x", "y"]}),
        ("a.1=y,a.0=x", None, {"a": ["x", "y"]}),
        ("x.0.a=1,x.0.b=2,x.1.a=3", None, {"x": [{"a": "1", "b": "2"}, {"a": "3"}]}),
        ("filename=a,,b", None, {"filename": "a,b"}),
        ("filename=a,,,,b,c=d", None, {"filename": "a,,b", "c": "d"}),
        ("filename=,,", None, {"filename": ","}),
        ("a=", None, {"a": ""}),
        ("a=1,", None, {"a": "1"}),
        ("a=x=y", None, {"a": "x=y"}),
        ("a=1,a=2", None, {"a": "2"}),  # QEMU: the last one wins
        ("a.b=1,a.c=2", None, {"a": {"b": "1", "c": "2"}}),
        ("file,node-name=f0", "driver", {"driver": "file", "node-name": "f0"}),
        ("socket,id=m", "backend", {"backend": "socket", "id": "m"}),
        ("nbd", "type", {"type": "nbd"}),
        ("a,,b,c=d", "driver", {"driver": "a,b", "c": "d"}),
        ("mon0", "chardev", {"chardev": "mon0"}),
        ("driver=file", "driver", {"driver": "file"}),
        ("[1]", "driver", {"driver": "[1]"}),
    ],
)
def test_parse(text: str, implied: str | None, expected: dict[str, Any]) -> None:
    assert parse_keyval(text, implied) == expected


@pytest.mark.parametrize(
    ("text", "implied", "message"),
    [
        ("=x", None, "Invalid parameter ''"),
        (",a=1", None, "Invalid parameter ''"),
        ("a=1,=x", "driver", "Invalid parameter ''"),
        ("foo", None, "Expected '=' after parameter 'foo'"),
        ("a=1,foo", "driver", "Expected '=' after parameter 'foo'"),
        ("a=1,foo,b=2", None, "Expected '=' after parameter 'foo'"),
        ("a=1,a.b=2", None, "Parameters 'a.*' used inconsistently"),
        ("a.b=2,a=1", None, "Parameters 'a.*' used inconsistently"),
        ("a.b.c=1,a.b=2", None, "Parameters 'a.b.*' used inconsistently"),
        ("a.0=1,a.x=2", None, "Parameters 'a.*' used inconsistently"),
        ("a.1=x", None, "Parameter 'a.0' missing"),
        ("a.0=x,a.2=y", None, "Parameter 'a.1' missing"),
        ("0=x", None, "Invalid parameter '0'"),
        ("a..b=1", None, "Invalid parameter 'a..b'"),
        ("a.=1", None, "Invalid parameter 'a.'"),
        ("a.01=1", None, "Invalid parameter 'a.01'"),
        ("1a=1", None, "Invalid parameter '1a'"),
        ("a b=1", None, "Invalid parameter 'a b'"),
        ("x" * 128 + "=1", None, f"Parameter '{'x' * 128}' is too long"),
    ],
)
def test_errors(text: str, implied: str | None, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval(text, implied)
    assert str(info.value) == message


def test_option_json() -> None:
    assert parse_option('{"driver": "file", "read-only": true, "cache": {"direct": false}}', "driver") == {
        "driver": "file",
        "read-only": True,
        "cache": {"direct": False},
    }


def test_option_keyval_when_not_an_object() -> None:
    # Only "{" switches to JSON (as QEMU): anything else is key=value, here the implied key's value.
    assert parse_option("[1]", "driver") == {"driver": "[1]"}


@pytest.mark.parametrize("text", ['{"driver":"file",', "{", '{"a": 1} x'])
def test_option_bad_json(text: str) -> None:
    with pytest.raises(KeyvalError, match=r"^JSON parse error, "):
        parse_option(text)


def test_format() -> None:
    options = {"driver": "file", "cache": {"direct": True}, "l": ["a,b", "c"]}
    text = format_keyval(options)
    assert text == "driver=file,cache.direct=on,l.0=a,,b,l.1=c"
    assert parse_keyval(text) == {"driver": "file", "cache": {"direct": "on"}, "l": ["a,b", "c"]}


# ---------------------------------------------------------------------------------- properties

_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True)
_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_trees: st.SearchStrategy[Any] = st.recursive(
    _values,
    lambda children: (
        st.dictionaries(_names, children, min_size=1, max_size=4) | st.lists(children, min_size=1, max_size=3)
    ),
    max_leaves=12,
)


@given(st.dictionaries(_names, _trees, max_size=5))
def test_round_trip(options: dict[str, Any]) -> None:
    """format_keyval then parse_keyval gives back the same tree (every leaf is a string here)."""
    assert parse_keyval(format_keyval(options)) == options


@given(st.text(st.sampled_from("ab0.=,{}x"), max_size=30))
def test_parse_never_fails_otherwise(text: str) -> None:
    """Any input parses or raises KeyvalError: never another exception."""
    try:
        result = parse_option(text, "driver")
    except KeyvalError:
        return
    assert isinstance(result, dict)
