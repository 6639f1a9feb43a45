"""QMP's wire format, sans-I/O: bytes in, requests (or QEMU's error replies) out; replies to bytes.

QEMU reads a monitor stream with a JSON *streamer*, not a line reader: a lexer cuts the bytes into tokens,
and a message ends whenever the brackets balance again (qobject/json-lexer.c, json-streamer.c,
json-parser.c). We do the same, so that every malformed input is answered as qemu-storage-daemon answers
it, and the session goes on::

    bytes --decode--> chars --lex--> tokens --balance--> one message's tokens --parse--> JSON value
                                       |                                        |
                                       +--- stray char: "JSON parse error, stray '@'"   (lexer resets)
                                                                                +--- "JSON parse error, ..."

    JSON value --check_request--> Request(execute, arguments, id)  or  ErrorReply("QMP input ...")

QEMU's JSON dialect accepts single-quoted strings (``'abc'``, with ``\\'``) as well as double-quoted
ones, and refuses duplicate keys; we follow it. Limits are QEMU's: 1024 levels of nesting and 64 MiB
per message; past them the message is refused and the lexer starts over.

Nothing here does I/O: :class:`QMPStreamParser` is fed bytes and returns events; :func:`encode`
turns a reply or an event into bytes. Test it without sockets, whole or one byte at a time.
"""

from __future__ import annotations

import codecs
import enum
import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_NESTING",
    "ErrorReply",
    "Message",
    "ParseError",
    "QMPStreamParser",
    "Request",
    "check_request",
    "encode",
    "error_reply",
    "return_reply",
]

# json-streamer.c: MAX_NESTING and MAX_TOKEN_SIZE.
MAX_NESTING = 1024
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

_WHITESPACE = " \t\r\n"
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class _Tok(enum.Enum):
    LBRACE = "{"
    RBRACE = "}"
    LBRACKET = "["
    RBRACKET = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    NUMBER = "number"
    KEYWORD = "keyword"


@dataclass(frozen=True)
class _Token:
    kind: _Tok
    value: Any  # str for STRING/KEYWORD, int | float for NUMBER, the character otherwise


@dataclass(frozen=True)
class ParseError:
    """Input that is not one JSON value; reply with ``GenericError`` ``desc`` (never with an id)."""

    desc: str


@dataclass(frozen=True)
class Message:
    """One complete JSON value read from the stream (not yet checked to be a request)."""

    value: Any


@dataclass(frozen=True)
class Request:
    """A well-formed command request. ``has_id`` tells ``id: null`` from no id."""

    execute: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False
    oob: bool = False


@dataclass(frozen=True)
class ErrorReply:
    """A request refused before dispatch (``QMP input ...``); ``id`` is echoed when the input had one."""

    desc: str
    id: Any = None
    has_id: bool = False


class _LexState(enum.Enum):
    START = enum.auto()
    STRING = enum.auto()  # inside a string; _quote says which
    ESCAPE = enum.auto()  # after a backslash in a string
    UNICODE = enum.auto()  # inside a backslash-u escape (four hex digits)
    WORD = enum.auto()  # a number or a keyword; ends at the first char that cannot continue it
    RECOVERY = enum.auto()  # after a stray char: skip to a resynchronisation point (_resyncs)


# json-lexer.c IN_RECOVERY: structural characters, control characters but tab, and the bytes 0xFE and
# 0xFF (which can never be UTF-8; clients send them to force a resync) end the recovery.
def _resyncs(ch: str) -> bool:
    return ch in "[]{}:," or (ch < " " and ch != "\t") or ch in "\udcfe\udcff"


def _printable(text: str) -> str:
    """A stray token as QEMU prints it: a C string (cut at NUL); bytes that are not UTF-8 show as U+FFFD."""
    text = text.split("\0", 1)[0]
    return "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)


_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")


class QMPStreamParser:
    """Cuts a QMP input stream into messages, the way QEMU's JSON streamer does.

    ``feed(data)`` returns, in input order, one :class:`Message` per complete JSON value and one
    :class:`ParseError` per malformed one. A number or keyword at the top level is only complete when
    the next character arrives (``1`` could become ``12``), as in QEMU. ``feed(b"")`` is harmless;
    after a stray character the lexer skips to the next structural or control character.
    """

    def __init__(self) -> None:
        # Bytes that are not UTF-8 become lone surrogates (U+DC80..U+DCFF): stray outside strings,
        # "invalid UTF-8 sequence in string" inside, as in QEMU.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._state = _LexState.START
        self._quote = '"'
        self._buf: list[str] = []  # the current string's or word's characters
        self._uni = ""  # hex digits of a \u escape so far
        self._tokens: list[_Token] = []  # the current message's tokens
        self._depth = 0  # open brackets + braces - closed ones in the current message
        self._size = 0  # characters in the current message
        self._out: list[Message | ParseError] = []

    def feed(self, data: bytes) -> list[Message | ParseError]:
        for ch in self._decoder.decode(data):
            self._char(ch)
        out, self._out = self._out, []
        return out

    # -------------------------------------------------------------------------------- lexer

    def _char(self, ch: str) -> None:
        self._size += 1
        if self._size > MAX_MESSAGE_SIZE:
            self._fail("JSON token size limit exceeded")
            return
        state = self._state
        if state is _LexState.RECOVERY:
            if not _resyncs(ch):
                return
            self._state = state = _LexState.START
        if state is _LexState.STRING:
            if ch == self._quote:
                self._state = _LexState.START
                self._token(_Token(_Tok.STRING, "".join(self._buf)))
            elif ch == "\\":
                self._state = _LexState.ESCAPE
            elif ch < " ":
                self._stray(self._quote + "".join(self._buf) + ch)
            else:
                self._buf.append(ch)
            return
        if state is _LexState.ESCAPE:
            if ch == "u":
                self._state, self._uni = _LexState.UNICODE, ""
            elif ch in _ESCAPES:
                self._state = _LexState.STRING
                self._buf.append(_ESCAPES[ch])
            else:
                self._stray(self._quote + "".join(self._buf) + "\\" + ch)
            return
        if state is _LexState.UNICODE:
            if ch not in "0123456789abcdefABCDEF":
                self._stray(self._quote + "".join(self._buf) + "\\u" + self._uni + ch)
                return
            self._uni += ch
            if len(self._uni) == 4:
                self._buf.append(chr(int(self._uni, 16)))
                self._state = _LexState.STRING
            return
        if state is _LexState.WORD:
            if ch in _WORD_CHARS:
                self._buf.append(ch)
                return
            self._state = _LexState.START
            self._word("".join(self._buf))
        # START (or a word just ended on ch)
        if ch in _WHITESPACE:
            return
        if ch in "\"'":
            self._state, self._quote, self._buf = _LexState.STRING, ch, []
        elif ch in _WORD_CHARS:
            self._state, self._buf = _LexState.WORD, [ch]
        elif ch in "{}[]:,":
            self._token(_Token(_Tok(ch), ch))
        else:
            self._stray(ch)

    def _word(self, word: str) -> None:
        if word[0].isalpha():
            self._token(_Token(_Tok.KEYWORD, word))
            return
        number = _number(word)
        if number is None:
            self._stray(word)
        else:
            self._token(_Token(_Tok.NUMBER, number))

    def _stray(self, text: str) -> None:
        self._fail(f"JSON parse error, stray '{_printable(text)}'")
        self._state = _LexState.RECOVERY

    def _fail(self, desc: str) -> None:
        """Refuse the message in progress and start over (json-streamer.c's out_emit on error)."""
        self._out.append(ParseError(desc))
        self._reset()

    def _reset(self) -> None:
        self._state = _LexState.START
        self._buf, self._tokens, self._depth, self._size = [], [], 0, 0

    # -------------------------------------------------------------------------------- streamer

    def _token(self, tok: _Token) -> None:
        self._tokens.append(tok)
        if tok.kind in (_Tok.LBRACE, _Tok.LBRACKET):
            self._depth += 1
            if self._depth > MAX_NESTING:
                self._fail("JSON nesting depth limit exceeded")
            return
        if tok.kind in (_Tok.RBRACE, _Tok.RBRACKET):
            self._depth -= 1
        if self._depth <= 0:
            tokens = self._tokens
            self._reset()
            try:
                self._out.append(Message(_Parser(tokens).parse()))
            except _SyntaxError as err:
                self._out.append(ParseError(f"JSON parse error, {err}"))


def _number(word: str) -> int | float | None:
    """A JSON number as QEMU reads it: an integer when it fits 64 bits, else a double; None if invalid."""
    try:
        value = json.loads(word)
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None  # 1e999: JSON has no infinity, and we could not echo it back
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


class _SyntaxError(Exception):
    pass


@dataclass
class _Frame:
    """An open container while parsing: its value, the key awaiting a value (dicts), and emptiness."""

    container: dict[str, Any] | list[Any]
    key: str | None = None
    empty: bool = True

    @property
    def closer(self) -> _Tok:
        return _Tok.RBRACE if isinstance(self.container, dict) else _Tok.RBRACKET

    def store(self, value: Any) -> None:
        self.empty = False
        if isinstance(self.container, dict):
            assert self.key is not None
            self.container[self.key] = value
            self.key = None
        else:
            self.container.append(value)


class _Parser:
    """Parses one message's tokens, with json-parser.c's error messages.

    Iterative with an explicit stack: MAX_NESTING levels would exceed Python's recursion limit.
    """

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _next(self) -> _Token:
        if self._pos >= len(self._tokens):
            raise _SyntaxError("premature EOI")
        tok = self._tokens[self._pos]
        self._pos += 1
        return tok

    def parse(self) -> Any:
        stack: list[_Frame] = []
        while True:
            value = self._open_or_value(stack)
            if value is _OPENED:
                continue
            # A complete value: store it, then close every container that ends right after it.
            while stack:
                frame = stack[-1]
                frame.store(value)
                tok = self._next()
                if tok.kind is _Tok.COMMA:
                    break
                if tok.kind is not frame.closer:
                    kind = "dict" if isinstance(frame.container, dict) else "list"
                    raise _SyntaxError(f"expected separator in {kind}")
                value = stack.pop().container
            else:
                if self._pos != len(self._tokens):
                    raise _SyntaxError("expecting value")
                return value

    def _open_or_value(self, stack: list[_Frame]) -> Any:
        """Read the next member (or element, or top-level value).

        Returns its value; or ``_OPENED`` after pushing a new container, or after reading an object
        key (the member's value comes next); an empty container just closed is returned as a value.
        """
        frame = stack[-1] if stack else None
        tok = self._next()
        if frame is not None and frame.empty and frame.key is None and tok.kind is frame.closer:
            return stack.pop().container
        if frame is not None and isinstance(frame.container, dict) and frame.key is None:
            # An object key. QEMU parses any value here, then insists on a string.
            if tok.kind is not _Tok.STRING:
                if tok.kind not in (_Tok.LBRACE, _Tok.LBRACKET):
                    self._scalar(tok)
                raise _SyntaxError("key is not a string in object")
            if self._next().kind is not _Tok.COLON:
                raise _SyntaxError("missing : in object pair")
            if tok.value in frame.container:
                raise _SyntaxError("duplicate key")
            frame.key = tok.value
            return _OPENED
        if tok.kind is _Tok.LBRACE:
            stack.append(_Frame({}))
            return _OPENED
        if tok.kind is _Tok.LBRACKET:
            stack.append(_Frame([]))
            return _OPENED
        return self._scalar(tok)

    @staticmethod
    def _scalar(tok: _Token) -> Any:
        if tok.kind is _Tok.STRING:
            if any("\udc80" <= c <= "\udcff" for c in tok.value):
                raise _SyntaxError("invalid UTF-8 sequence in string")
            return tok.value
        if tok.kind is _Tok.NUMBER:
            return tok.value
        if tok.kind is _Tok.KEYWORD:
            try:
                return {"true": True, "false": False, "null": None}[tok.value]
            except KeyError:
                raise _SyntaxError(f"invalid keyword '{tok.value}'") from None
        raise _SyntaxError("expecting value")


_OPENED: Any = object()


def check_request(value: Any, *, oob_enabled: bool = False) -> Request | ErrorReply:
    """Check a message's top level as qmp_dispatch() does, in QEMU's order."""
    if not isinstance(value, dict):
        return ErrorReply("QMP input must be a JSON object")
    has_id = "id" in value
    rid = value.get("id")

    def refuse(desc: str) -> ErrorReply:
        return ErrorReply(desc, rid, has_id)

    for key, member in value.items():
        if key in ("execute", "exec-oob"):
            if key == "exec-oob" and not oob_enabled:
                return refuse(f"QMP input member '{key}' is unexpected")
            if not isinstance(member, str):
                return refuse(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(member, dict):
                return refuse("QMP input member 'arguments' must be an object")
        elif key != "id":
            return refuse(f"QMP input member '{key}' is unexpected")
    if "execute" in value and "exec-oob" in value:
        return refuse("QMP input member 'execute' clashes with 'exec-oob'")
    if "execute" not in value and "exec-oob" not in value:
        return refuse("QMP input lacks member 'execute'")
    oob = "exec-oob" in value
    name = value["exec-oob"] if oob else value["execute"]
    return Request(name, value.get("arguments", {}), rid, has_id, oob)


def return_reply(ret: Any, rid: Any = None, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": ret}
    if has_id:
        reply["id"] = rid
    return reply


def error_reply(
    desc: str, error_class: str = "GenericError", rid: Any = None, has_id: bool = False
) -> dict[str, Any]:
    # QEMU happens to print "id" first in error replies; harmless to mirror, handy for byte diffs.
    reply: dict[str, Any] = {"id": rid} if has_id else {}
    reply["error"] = {"class": error_class, "desc": desc}
    return reply


def encode(message: dict[str, Any]) -> bytes:
    """One reply or event on the wire: compact-ish JSON as QEMU prints it, ASCII only, then a newline."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode() + b"\n"
